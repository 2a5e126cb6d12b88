"""Reading configs: YAML plus dotted command-line overrides, validated into the typed configs of `lmforge.config`.

`load_config(PretrainConfig, "configs/tiny.yaml", ["train.lr=1e-3"])` validates every key and
value; an unknown key names the closest valid one, a wrong type names the key and the value.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from lmforge.errors import ConfigError, one_line
from lmforge.io import read_utf8

C = TypeVar("C", bound=BaseModel)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{key}' is not a section")
    node[leaf] = value


def _model_classes(annotation: Any) -> list[type[BaseModel]]:
    """The config classes a field holds: itself, or each member of a (discriminated) union."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType, typing.Annotated):
        return []  # a container (`dict[str, DataSource]`) is one value, set whole
    return [c for arg in typing.get_args(annotation) for c in _model_classes(arg)]


def config_keys(model: type[BaseModel], prefix: str = "", leaves_only: bool = False) -> list[str]:
    """Every dotted key of `model` (`train`, `train.lr`, ...; a union's members' keys once each); with
    `leaves_only`, just the keys that hold values rather than sections."""
    keys = []
    for name, field in model.model_fields.items():
        sections = _model_classes(field.annotation)
        if not (leaves_only and sections):
            keys.append(prefix + name)
        for sub in sections:
            keys += [k for k in config_keys(sub, prefix + name + ".", leaves_only) if k not in keys]
    return keys


_ARCH_TAGS = {"decoder", "encoder", "encdec"}


def validation_summary(err: ValidationError, cls: type[BaseModel] | None = None, prefix: str = "") -> str:
    """One line naming each bad key and value: `train.lr: Input should be a valid number, ..., got 'abc'; unknown key
    'model.n_layers' (did you mean 'model.n_layer'?)`. `prefix` is where the validated section sits (e.g. "model.");
    with `cls`, an unknown key is given the closest valid one."""
    parts = []
    for e in err.errors():
        # a discriminated union puts the chosen arch into the location: model.decoder.n_layer -> model.n_layer
        loc = [str(p) for i, p in enumerate(e["loc"]) if not ((i > 0 or prefix) and p in _ARCH_TAGS)]
        key = prefix + ".".join(loc) if loc else prefix.rstrip(".")
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, config_keys(cls), n=1, cutoff=0.5) if cls is not None else []
            parts.append(f"unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            continue
        message = one_line(e["msg"].removeprefix("Value error, "))
        value = e.get("input")
        got = "" if isinstance(value, (dict, list)) or e["type"] == "missing" else f", got {_short_repr(value)}"
        parts.append(f"{key}: {message}{got}" if key else f"{message}{got}")
    return "; ".join(parts)


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML parse error in one line: `line 3, column 12: mapping values are not allowed here`."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or problem is None:
        return one_line(exc)
    text = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        text += f" ({context} from line {context_mark.line + 1}, column {context_mark.column + 1})"
    return one_line(text)


def load_config(cls: type[C], path: str | Path | None = None,
                overrides: Mapping[str, Any] | None = None) -> C:
    """Build `cls` from a YAML file (optional) and dotted overrides (`{"train.lr": 1e-3}`, as the command line
    passes them parsed), with clear errors."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(read_utf8(path, ConfigError)) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        source = str(path)
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    if overrides:
        source += " + command-line overrides"
    try:
        return cls.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"{source}: {validation_summary(err, cls)}") from None


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
