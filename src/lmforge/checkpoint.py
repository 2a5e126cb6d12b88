"""Checkpoint directories: safetensors weights + config.yaml + tokenizer.json (+ training state).

A run directory holds `checkpoints/step_NNNNNNNN/` dirs and a `latest` file naming the newest
complete one. A checkpoint is written into a hidden temp dir of its own, every file fsynced, then
renamed into place, and only then does `latest` move (atomically): a crash at any moment leaves the
previous checkpoint as the latest, whole; a full disk removes the partial temp dir and says so in
one line. Nothing is pickled; torch.load uses weights_only=True.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ValidationError
from safetensors.torch import load_file, save_file

from lmforge.config import PeftConfig
from lmforge.config_loading import dump_config, validation_summary, yaml_problem
from lmforge.errors import CheckpointError, one_line
from lmforge.io import (
    atomic_write_text,
    disk_full_guard,
    is_inside,
    read_utf8,
    remove_dead_temps,
    replace_dir,
    unique_temp_path,
)
from lmforge.manifest import CheckpointManifest
from lmforge.model import HEAD_TASKS, build_model, build_task_model
from lmforge.tokenizer import TOKENIZER_FILE, Tokenizer

CONFIG_FILE, WEIGHTS_FILE = "config.yaml", "model.safetensors"
OPTIMIZER_FILE, STATE_FILE, RNG_FILE = "optimizer.pt", "trainer_state.json", "rng.pt"
SHARDED_DIR = "sharded"  # an FSDP checkpoint's DCP shards of the model and optimizer (lmforge.sharded)
LATEST_FILE = "latest"


def _unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each shared (tied) tensor stored once, as safetensors requires."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict().items():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out[name] = t.detach().contiguous()
    return out


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a (nested) dict/list/tuple: the size of a checkpoint's state, about."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def write_model_files(directory: Path, model: torch.nn.Module | dict[str, torch.Tensor] | None,
                      tokenizer: Tokenizer | None, config: BaseModel) -> None:
    """Write config.yaml (`config`: a CheckpointManifest, or a config that dumps to one, such as PretrainConfig),
    model.safetensors (the model's weights, or the given tensors; none if None) and tokenizer.json into
    `directory` (not atomic alone)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(dump_config(config))
    if model is not None:
        weights = _unique_state_dict(model) if isinstance(model, torch.nn.Module) else model
        save_file(weights, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        (directory / TOKENIZER_FILE).write_text(tokenizer.backend.to_str())


def check_replaceable(path: Path) -> None:
    """Refuse to write a model dir over anything but an earlier saved model (lmforge, Hugging Face or peft): a
    run, a training checkpoint and a directory of other files are never replaced."""
    if not path.exists():
        return
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; give a new or empty directory as the output")
    names = sorted(p.name for p in path.iterdir())
    state = [n for n in names if n in (LATEST_FILE, OPTIMIZER_FILE, STATE_FILE, "checkpoints")]
    if state:
        raise CheckpointError(f"{path} holds a training run or checkpoint ({', '.join(state)}); writing a model "
                              "there would replace it: pick a new or empty output directory")
    if names and not any(n in names for n in (CONFIG_FILE, "config.json", "adapter_config.json")):
        raise CheckpointError(f"{path} already holds files that are not a saved model (e.g. {names[0]}); lmforge "
                              "replaces only an earlier model dir: pick a new or empty output directory")


def write_dir(path: str | Path, write: Callable[[Path], None], bytes_needed: int) -> Path:
    """Call `write(tmp)` on a fresh temp dir of its own and rename it to `path` (replacing an earlier model dir,
    never anything else); a full disk raises DiskFullError and leaves `path` as it was."""
    path = Path(path)
    check_replaceable(path)
    tmp = unique_temp_path(path)
    remove_dead_temps(path)  # left by a save that was killed
    with disk_full_guard(path.parent, bytes_needed, path.name,
                         cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True), kept=f"{path} was left as it was"):
        tmp.mkdir(parents=True)
        write(tmp)
        replace_dir(tmp, path)
    return path


def write_model_dir(path: Path, model: torch.nn.Module, tokenizer: Tokenizer | None, config: BaseModel) -> Path:
    """Write config.yaml, model.safetensors and tokenizer.json as the dir `path`, atomically (`write_dir`)."""
    return write_dir(path, lambda tmp: write_model_files(tmp, model, tokenizer, config),
                     tensor_bytes(_unique_state_dict(model)))


def save(model: torch.nn.Module, tokenizer: Tokenizer | None, path: str | Path,
         peft: PeftConfig | None = None, run_config: CheckpointManifest | None = None) -> Path:
    """Save a model (and tokenizer) as an lmforge checkpoint dir, atomically; `peft` records the method a
    parameter-efficient model carries, so that loading rebuilds it. `run_config` (which records its own `peft`)
    replaces it as config.yaml, recording how the model was trained too (e.g. its chat template)."""
    return write_model_dir(Path(path), model, tokenizer, run_config or CheckpointManifest(model=model.cfg, peft=peft))


def sharded_temp_dir(run_dir: Path, step: int) -> Path:
    """Where every rank of an FSDP run writes the shards of checkpoint `step` before rank 0 moves them into it
    (the same path on every rank; a dead run's is removed by `remove_stale_temp_dirs`)."""
    return run_dir / "checkpoints" / f".step_{step:08d}.sharded.tmp"


def write_training_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module | dict[str, torch.Tensor] | None,
    tokenizer: Tokenizer | None,
    config: BaseModel,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    rng: dict[str, list[torch.Tensor]],
    keep: int,
    sharded: Path | None = None,
) -> Path:
    """Write checkpoints/step_N atomically, point `latest` at it, prune all but `keep` newest.

    `rng` holds each process's RNG states in rank order (one entry in a single-process run). Under FSDP,
    `sharded` is the DCP dir of the model and optimizer the ranks wrote (moved in as `sharded/`, in place of
    optimizer.pt) and `model` the gathered weights for model.safetensors, or None between the first and last
    step. A full disk raises DiskFullError; the partial checkpoint is removed and `latest` still names the
    previous one."""
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step_{step:08d}"
    tmp = unique_temp_path(final)
    latest = run_dir / LATEST_FILE
    pointer = final.relative_to(run_dir).as_posix()
    previous = _latest_pointer(run_dir)
    opt_state = optimizer.state_dict() if optimizer is not None else {}
    weights = _unique_state_dict(model) if isinstance(model, torch.nn.Module) else model or {}

    def remove_partial() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        if _latest_pointer(run_dir) != pointer:
            shutil.rmtree(final, ignore_errors=True)  # renamed into place, but `latest` never named it

    kept = (f"{latest} still names {previous}, which is intact; free some space, then continue with --resume"
            if previous else "no checkpoint of this run was kept; free some space, then start it again")
    needed = tensor_bytes(weights) + tensor_bytes(opt_state) + tensor_bytes(rng)
    with disk_full_guard(ckpt_root, needed, f"checkpoint {final.name}", cleanup=remove_partial, kept=kept):
        write_model_files(tmp, weights or None, tokenizer, config)
        if sharded is None:
            torch.save(opt_state, tmp / OPTIMIZER_FILE)
        else:
            sharded.replace(tmp / SHARDED_DIR)
        torch.save(rng, tmp / RNG_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=1))
        replace_dir(tmp, final)
        atomic_write_text(latest, pointer + "\n")
    for old in [d for d in sorted(ckpt_root.glob("step_*")) if d.name < final.name][: -keep + 1 or None]:
        shutil.rmtree(old, ignore_errors=True)  # older than this one, beyond the `keep` newest
    return final


def _latest_pointer(run_dir: Path) -> str | None:
    latest = run_dir / LATEST_FILE
    return latest.read_text().strip() if latest.is_file() else None


def remove_stale_temp_dirs(run_dir: Path) -> None:
    """Remove the temp dirs of checkpoints whose writer was killed (call it holding the run dir's lock)."""
    for pattern in (".step_*.tmp", ".step_*.old"):  # being written; replaced (see io.replace_dir)
        for tmp in (run_dir / "checkpoints").glob(pattern):
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir itself, or a run dir whose `latest` file names one inside it (symlinks followed)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    latest = path / LATEST_FILE
    if latest.is_file():
        name = latest.read_text(encoding="utf-8", errors="replace").strip()
        target = path / name
        if not is_inside(target, path):
            raise CheckpointError(f"{latest} names {name!r}, which is outside {path}; a run's latest must name one of "
                                  "its own checkpoints (e.g. checkpoints/step_00000100)")
        if not target.is_dir():
            raise CheckpointError(f"{latest} names {target}, which does not exist; the run dir is damaged")
        return target
    return path


def require_hf_value(ckpt: Path, name: str) -> Path:
    f = ckpt / name
    if not f.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is missing {name}; it cannot be loaded or resumed from")
    return f


def read_config_tree(ckpt: Path) -> dict[str, Any]:
    f = require_hf_value(ckpt, CONFIG_FILE)
    try:
        tree = yaml.safe_load(read_utf8(f, CheckpointError))
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{f} is corrupt: {yaml_problem(exc)}") from None
    if not isinstance(tree, dict) or "model" not in tree:
        raise CheckpointError(f"{f} has no 'model' section; is this an lmforge checkpoint?")
    return tree


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """The checkpoint's model.safetensors into `model`, or, where an FSDP run saved only its shards, those
    gathered in this process."""
    if not (ckpt / WEIGHTS_FILE).is_file() and (ckpt / SHARDED_DIR).is_dir():
        from lmforge.sharded import load_sharded_weights

        load_sharded_weights(model, ckpt / SHARDED_DIR)
        return
    f = require_hf_value(ckpt, WEIGHTS_FILE)
    try:
        tensors = load_file(str(f))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{f} is corrupt or truncated: {one_line(exc)}") from None
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = set(model.state_dict()) - set(_unique_state_dict(model))  # stored once, under the first name
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(f"{f} does not match the model: missing {missing}, unexpected {unexpected}")


def read_manifest(ckpt: Path) -> CheckpointManifest:
    """The checkpoint's config.yaml, validated (CheckpointError naming each bad key)."""
    tree = read_config_tree(ckpt)
    try:
        return CheckpointManifest.model_validate(tree)
    except ValidationError as err:
        raise CheckpointError(f"{ckpt / CONFIG_FILE}: {validation_summary(err, CheckpointManifest)}") from None


def build_for_manifest(manifest: CheckpointManifest) -> torch.nn.Module:
    """The model a manifest describes, with every module its weights need, ready for them to load."""
    model = build_model(manifest.model)
    if manifest.task in HEAD_TASKS:  # a fine-tuned task model: backbone + head
        model = build_task_model(manifest.task, model, manifest.num_labels)
    if manifest.peft is not None:  # parameter-efficient weights: rebuild the same modules before loading them
        from lmforge.peft.config import apply_peft_to_task_model

        apply_peft_to_task_model(model, manifest.peft, initialise=False)
    if manifest.quant is not None:  # weight-only int8/int4: QuantLinear shells before their codes are loaded
        from lmforge.infer.quant import apply_quant_from_config

        apply_quant_from_config(model, manifest.quant)
    return model


def load_checkpoint(path: str | Path) -> tuple[torch.nn.Module, Tokenizer | None]:
    """Load model (eval mode) and tokenizer from an lmforge checkpoint or run dir."""
    ckpt = resolve_checkpoint(path)
    model = build_for_manifest(read_manifest(ckpt))
    load_weights(model, ckpt)
    tok_file = ckpt / TOKENIZER_FILE
    tokenizer = Tokenizer.from_file(tok_file) if tok_file.is_file() else None
    return model.eval(), tokenizer


def read_training_state(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
    """(trainer state, optimizer state dict, rng states) of a training checkpoint, validated; the optimizer state
    is None in an FSDP checkpoint, whose `sharded/` dir holds it."""
    f = require_hf_value(ckpt, STATE_FILE)
    try:
        state = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{f} is corrupt: {exc}") from None
    sharded = (ckpt / SHARDED_DIR).is_dir()
    loaded = []
    for name in (RNG_FILE,) if sharded else (OPTIMIZER_FILE, RNG_FILE):
        g = require_hf_value(ckpt, name)
        try:
            loaded.append(torch.load(g, weights_only=True, map_location="cpu"))
        except Exception as exc:  # torch's message can span many lines (weights_only refusals)
            raise CheckpointError(f"{g} is corrupt or truncated: {one_line(exc)}") from None
    return state, None if sharded else loaded[0], loaded[-1]
