"""A Hugging Face directory's safetensors weights, whole (model.safetensors) or sharded (model-0000i-of-0000n
.safetensors + model.safetensors.index.json), read and written as `save_pretrained` lays them out."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from lmforge.errors import CheckpointError, one_line
from lmforge.io import atomic_write, atomic_write_text, is_inside

WEIGHTS_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


def read_hf_weights(path: Path, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Every tensor of a dir's safetensors (sharded or not), each converted to `dtype` as it is read (None: kept)."""
    files = [path / WEIGHTS_FILE]
    if not files[0].is_file():
        index = path / INDEX_FILE
        if not index.is_file():
            raise CheckpointError(f"{path}: no {WEIGHTS_FILE} or {INDEX_FILE} (safetensors only)")
        files = shard_files(path, index)
    weights: dict[str, Tensor] = {}
    for file in files:
        try:
            if dtype is None:
                weights.update(load_file(file))
                continue
            with safe_open(file, framework="pt") as f:
                weights.update((name, f.get_tensor(name).to(dtype)) for name in f.keys())  # noqa: SIM118
        except (OSError, SafetensorError) as err:
            raise CheckpointError(f"{file}: cannot read safetensors weights: {one_line(err)}") from None
    return weights


def write_hf_weights(weights: dict[str, Tensor], path: Path, max_shard_bytes: int | None = None) -> None:
    """model.safetensors, or with `max_shard_bytes` the shards model-0000i-of-0000n.safetensors (each at most that
    size unless one tensor is larger) and model.safetensors.index.json, as `save_pretrained(max_shard_size=...)`
    writes them; the other layout's files are removed, since readers prefer model.safetensors."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in weights.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if max_shard_bytes is None:
        atomic_write(path / WEIGHTS_FILE, lambda p: save_file(weights, str(p), metadata={"format": "pt"}))
        (path / INDEX_FILE).unlink(missing_ok=True)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        atomic_write(path / name, lambda p, shard=shard: save_file(shard, str(p), metadata={"format": "pt"}))
        weight_map |= dict.fromkeys(shard, name)
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_text(path / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    (path / WEIGHTS_FILE).unlink(missing_ok=True)


def shard_files(path: Path, index: Path) -> list[Path]:
    """The safetensors files a sharded dir's index names, each checked to lie inside `path`: a name that leaves it
    (absolute, `..`, or through a symlinked folder) is refused. The file itself may be a symlink, as every file in
    the Hugging Face hub cache is."""
    refit = "re-save the model with save_pretrained"
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError and invalid UTF-8 alike
        raise CheckpointError(f"{index}: not valid JSON ({one_line(err)}); {refit}") from None
    if not isinstance(data, dict) or "weight_map" not in data:
        raise CheckpointError(f"{index}: no 'weight_map' (tensor name -> shard file) in it; {refit}")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: 'weight_map' is a {type(weight_map).__name__}, not a mapping of tensor "
                              f"name -> shard file; {refit}")
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{index}: weight_map[{tensor!r}] is {name!r}, not a file name; {refit}")
        parts = PurePosixPath(name).parts
        if PurePosixPath(name).is_absolute() or ".." in parts or not is_inside((path / name).parent, path):
            raise CheckpointError(f"{index}: weight_map[{tensor!r}] = {name!r} lies outside {path}; shard files must "
                                  f"be inside the model's directory")
    return [path / name for name in sorted(set(weight_map.values()))]
