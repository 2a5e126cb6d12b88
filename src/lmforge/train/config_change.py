"""`--resume` with a config that differs from the checkpoint's: which changes keep the run exact.

Keys that do not change the trajectory so far (how long to train, how often to log, evaluate and save,
how many checkpoints to keep, progress output, where the run dir lives) may change freely. Any other
changed key breaks the exact continuation: it is refused, naming the key, unless the user accepts it;
an accepted change is printed as a diff and appended to RUN/config_changes.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from lmforge.checkpoint import read_manifest
from lmforge.config_loading import dump_config
from lmforge.errors import ConfigError
from lmforge.io import append_line
from lmforge.manifest import CheckpointManifest
from lmforge.train.console import report

CHANGES_FILE = "config_changes.jsonl"
FREE_TRAIN_KEYS = frozenset({"max_steps", "eval_every", "eval_batches", "save_every", "log_every",
                             "keep_checkpoints", "progress", "tensorboard", "out_dir",
                             "early_stopping_patience", "early_stopping_min_delta"})  # when to stop, not how
_ABSENT = "(absent)"


def config_diff(old: Any, new: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) for every value that differs; mappings are compared key by key."""
    if isinstance(old, dict) and isinstance(new, dict):
        diff: dict[str, tuple[Any, Any]] = {}
        for key in [*old, *(k for k in new if k not in old)]:
            diff.update(config_diff(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{prefix}{key}."))
        return diff
    return {} if old == new else {prefix.removesuffix("."): (old, new)}


def is_free(key: str) -> bool:
    """A train-loop key that does not change the trajectory so far (`train.*`, `sft.train.*`, ...)."""
    *parents, name = key.split(".")
    return parents[-1:] == ["train"] and name in FREE_TRAIN_KEYS


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def check_resume_config(ckpt: Path, run_config: BaseModel, run_dir: Path, accept: bool) -> dict[str, tuple]:
    """The changes from `ckpt`'s config.yaml to `run_config` that are not free; ConfigError naming each of them
    unless `accept`."""
    # both in the manifest's normal form (the form of today's files, whichever version wrote the saved one)
    current = CheckpointManifest.model_validate(yaml.safe_load(dump_config(run_config)))
    run_type = run_config._run_type if isinstance(run_config, CheckpointManifest) else type(run_config)
    saved = read_manifest(ckpt).with_run_defaults(run_type).model_dump(mode="json")
    current = current.model_dump(mode="json")
    changes = {k: v for k, v in config_diff(saved, current).items() if not is_free(k)}
    if changes and not accept:
        listed = ", ".join(f"{k} {_show(old)} -> {_show(new)}" for k, (old, new) in changes.items())
        raise ConfigError(f"--resume: the config differs from the one {ckpt} was trained with: {listed}; a resumed "
                          "run with other settings is no longer the same run. Restore the old values, or pass "
                          "--accept-config-change to continue with the new ones (recorded in "
                          f"{run_dir / CHANGES_FILE})")
    return changes


def record_config_change(run_dir: Path, ckpt: Path, step: int, changes: dict[str, tuple]) -> None:
    """Show accepted changes as a diff and append them to RUN/config_changes.jsonl."""
    record = {"step": step, "checkpoint": ckpt.name,
              "changes": {k: {"old": old, "new": new} for k, (old, new) in changes.items()}}
    append_line(run_dir / CHANGES_FILE, json.dumps(record))
    lines = [f"resuming {ckpt} with an accepted config change (recorded in {run_dir / CHANGES_FILE}):"]
    for key, (old, new) in changes.items():
        lines += [f"-{key}: {_show(old)}", f"+{key}: {_show(new)}"]
    report("\n".join(lines))
