"""Checkpoint directories: safetensors weights + config.yaml + tokenizer.json (+ training state).

A run directory holds `checkpoints/step_NNNNNNNN/` dirs and a `latest` file naming the newest
complete one. A checkpoint is written into a hidden temp dir, every file fsynced, then renamed
into place, and only then does `latest` move (atomically): a crash at any moment leaves the
previous checkpoint as the latest, whole. Nothing is pickled; torch.load uses weights_only=True.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ValidationError
from safetensors.torch import load_file, save_file

from lmforge.config import AnyModelConfig, PeftConfig, dump_config
from lmforge.errors import CheckpointError
from lmforge.io import atomic_write_text, fsync_dir
from lmforge.model import HEAD_TASKS, build_model, build_task_model, model_config_from_dict
from lmforge.tokenizer import TOKENIZER_FILE, Tokenizer

CONFIG_FILE, WEIGHTS_FILE = "config.yaml", "model.safetensors"
OPTIMIZER_FILE, STATE_FILE, RNG_FILE = "optimizer.pt", "trainer_state.json", "rng.pt"
LATEST_FILE = "latest"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each shared (tied) tensor stored once, as safetensors requires."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict().items():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out[name] = t.detach().contiguous()
    return out


def write_model_files(directory: Path, model: torch.nn.Module, tokenizer: Tokenizer | None, config: BaseModel) -> None:
    """Write config.yaml, model.safetensors and tokenizer.json into `directory` (not atomic alone)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(dump_config(config))
    save_file(_unique_state_dict(model), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        (directory / TOKENIZER_FILE).write_text(tokenizer.backend.to_str())


def publish_dir(tmp: Path, final: Path) -> None:
    """fsync every file of `tmp`, then rename it to `final` (replacing an older one)."""
    for f in tmp.iterdir():
        _fsync_file(f)
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


class _ModelOnly(BaseModel):
    model: AnyModelConfig
    peft: PeftConfig | None = None


def save(model: torch.nn.Module, tokenizer: Tokenizer | None, path: str | Path,
         peft: PeftConfig | None = None) -> Path:
    """Save a model (and tokenizer) as an lmforge checkpoint dir, atomically; `peft` records the method a
    parameter-efficient model carries, so that loading rebuilds it."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_model_files(tmp, model, tokenizer, _ModelOnly(model=model.cfg, peft=peft))
    publish_dir(tmp, path)
    return path


def write_training_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    tokenizer: Tokenizer | None,
    config: BaseModel,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    rng: dict[str, list[torch.Tensor]],
    keep: int,
) -> Path:
    """Write checkpoints/step_N atomically, point `latest` at it, prune all but `keep` newest.

    `rng` holds each process's RNG states in rank order (one entry in a single-process run)."""
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".step_{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_model_files(tmp, model, tokenizer, config)
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    torch.save(rng, tmp / RNG_FILE)
    (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=1))
    publish_dir(tmp, final)
    atomic_write_text(run_dir / LATEST_FILE, final.relative_to(run_dir).as_posix() + "\n")
    for old in [d for d in sorted(ckpt_root.glob("step_*")) if d.name < final.name][: -keep + 1 or None]:
        shutil.rmtree(old, ignore_errors=True)  # older than this one, beyond the `keep` newest
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir itself, or a run dir whose `latest` file names one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    latest = path / LATEST_FILE
    if latest.is_file():
        target = path / latest.read_text().strip()
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
        tree = yaml.safe_load(f.read_text())
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{f} is corrupt: {exc}") from None
    if not isinstance(tree, dict) or "model" not in tree:
        raise CheckpointError(f"{f} has no 'model' section; is this an lmforge checkpoint?")
    return tree


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    f = require_hf_value(ckpt, WEIGHTS_FILE)
    try:
        tensors = load_file(str(f))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{f} is corrupt or truncated: {exc}") from None
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = set(model.state_dict()) - set(_unique_state_dict(model))  # stored once, under the first name
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(f"{f} does not match the model: missing {missing}, unexpected {unexpected}")


def load_checkpoint(path: str | Path) -> tuple[torch.nn.Module, Tokenizer | None]:
    """Load model (eval mode) and tokenizer from an lmforge checkpoint or run dir."""
    ckpt = resolve_checkpoint(path)
    tree = read_config_tree(ckpt)
    try:
        model = build_model(model_config_from_dict(tree["model"]))
    except ValidationError as err:
        raise CheckpointError(f"{ckpt / CONFIG_FILE}: invalid model section: {err}") from None
    if tree.get("task") in HEAD_TASKS:  # a fine-tuned task model: backbone + head
        model = build_task_model(tree["task"], model, tree.get("num_labels"))
    if tree.get("peft"):  # parameter-efficient weights: rebuild the same modules before loading them
        from lmforge.config import PeftConfig
        from lmforge.peft.config import apply_peft_to_task_model

        apply_peft_to_task_model(model, PeftConfig.model_validate(tree["peft"]), initialise=False)
    if tree.get("quant"):  # weight-only int8/int4: QuantLinear shells before their codes are loaded
        from lmforge.infer.quant import apply_quant_from_config

        apply_quant_from_config(model, tree)
    load_weights(model, ckpt)
    tok_file = ckpt / TOKENIZER_FILE
    tokenizer = Tokenizer.from_file(tok_file) if tok_file.is_file() else None
    return model.eval(), tokenizer


def read_training_state(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(trainer state, optimizer state dict, rng states) of a training checkpoint, validated."""
    f = require_hf_value(ckpt, STATE_FILE)
    try:
        state = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{f} is corrupt: {exc}") from None
    loaded = []
    for name in (OPTIMIZER_FILE, RNG_FILE):
        g = require_hf_value(ckpt, name)
        try:
            loaded.append(torch.load(g, weights_only=True, map_location="cpu"))
        except Exception as exc:
            raise CheckpointError(f"{g} is corrupt or truncated: {exc}") from None
    return state, loaded[0], loaded[1]
