"""Sharded training state: a checkpoint's `sharded/` dir in `torch.distributed.checkpoint` (DCP) format.

Under FSDP every rank writes its own shards of the weights and the AdamW state, and DCP records each tensor's
global shape and offsets, so the same dir loads at any world size (DCP reshards) or, in one process, into a plain
model (`lmforge.load`, `lmforge export`). The model and optimizer state dicts come from
`torch.distributed.checkpoint.state_dict`, keyed by parameter name, never by position. An optimizer that has not
stepped yet has no state, and none is saved: asking for it would make AdamW take a step of lr 0 to create it.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lmforge.errors import CheckpointError, one_line


def save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Write the model's and optimizer's shards into the fresh dir `directory` (collective: every rank calls it
    with the same path; rank 0 first empties it of what a killed run left)."""
    if dist.get_rank() == 0:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
    dist.barrier()
    state = {"model": get_model_state_dict(model)}
    if optimizer.state:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=directory)


def _metadata(directory: Path) -> Metadata:
    try:
        return dcp.FileSystemReader(directory).read_metadata()
    except Exception as exc:  # a missing or damaged .metadata
        raise CheckpointError(f"{directory} is not a readable sharded checkpoint: {one_line(exc)}") from None


def check_shapes(model_state: dict[str, torch.Tensor], directory: Path) -> None:
    """CheckpointError naming the first tensor whose name or (global) shape differs between the dir and the model,
    before anything is loaded."""
    saved = {key.removeprefix("model."): meta.size for key, meta in _metadata(directory).state_dict_metadata.items()
             if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    for name, tensor in model_state.items():
        if name not in saved:
            problem = f"has no tensor {name}, which this model has"
        elif saved[name] != tensor.shape:
            problem = f"holds {name} of shape {list(saved[name])}, this model's is {list(tensor.shape)}"
        else:
            continue
        raise CheckpointError(f"{directory} {problem}: it was saved from another model config; load or resume it "
                              "with the model section of its checkpoint's config.yaml")
    extra = sorted(set(saved) - set(model_state))
    if extra:
        raise CheckpointError(f"{directory} holds {extra[0]}, which this model lacks: it was saved from another "
                              "model config; load or resume it with the model section of its checkpoint's config.yaml")


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Load weights and optimizer state from `directory` into a model sharded over this run's ranks, whatever the
    world size that wrote it (collective)."""
    state = {"model": get_model_state_dict(model)}
    check_shapes(state["model"], directory)
    if any(key.startswith("optim.") for key in _metadata(directory).state_dict_metadata):
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=directory)
    set_model_state_dict(model, state["model"])
    if "optim" in state:
        set_optimizer_state_dict(model, optimizer, state["optim"])


def load_sharded_weights(model: torch.nn.Module, directory: Path) -> None:
    """Gather the weights in `directory` into a plain (unsharded) model, in this process alone."""
    state = model.state_dict()
    check_shapes(state, directory)
    with warnings.catch_warnings():  # DCP warns that it loads in one process, which is what this asks for
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load({"model": state}, checkpoint_id=directory, no_dist=True)
    model.load_state_dict(state)


def gathered_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full weights of a sharded model on rank 0 (on the CPU; {} on the other ranks), each tied tensor once,
    under the first name the model gives it, as `lmforge.save` writes them (collective)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return {}
    seen: set[int] = set()
    kept = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            kept.append(name)
    return {name: full[name].contiguous() for name in kept}
