"""Data parallelism through PyTorch's own engine: `torchrun --nproc_per_node N -m lmforge.cli pretrain ...`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; we join the process group (NCCL on CUDA, gloo on CPU) and the
trainer wraps the model in DistributedDataParallel (`train.parallel: ddp`) or shards it with FSDP2's
`fully_shard` (`train.parallel: fsdp`: each rank holds a 1/N shard of every parameter, gradient and AdamW
state). A single process is world size 1; FSDP always runs under torchrun, even as one process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from lmforge.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device, parallel: str = "ddp") -> DistContext:
    """Join the torchrun process group if there is one (idempotent); else a single-process context. FSDP joins
    it at world size 1 too, and refuses to run outside torchrun."""
    if parallel == "fsdp" and not {"RANK", "WORLD_SIZE"} <= set(os.environ):
        raise ConfigError("train.parallel: fsdp shards the model over torchrun's processes, and this process was not "
                          "started by torchrun; launch it as `torchrun --nproc_per_node N -m lmforge.cli VERB ...` "
                          "(N = processes on this machine; see the README's Scale section), or set "
                          "train.parallel: ddp")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and parallel != "fsdp":
        return DistContext()
    ctx = DistContext(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend=backend)
    return ctx


def shutdown_distributed() -> None:
    """Leave the process group, if this process joined one (PyTorch asks every rank to, once its work is done)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def sum_across_ranks(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The elementwise sum of a tensor over all ranks (the value itself in a single process)."""
    if not ctx.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def gather_objects(obj: object, ctx: DistContext) -> list[object]:
    """Every rank's `obj`, in rank order (collective: all ranks must call it)."""
    if not ctx.enabled:
        return [obj]
    out: list[object] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def _blocks(module: nn.Module) -> Iterator[nn.Module]:
    """The elements of every ModuleList (a model's stacks of blocks) not inside another one's element."""
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            yield from child
        else:
            yield from _blocks(child)


def shard_model(model: nn.Module, device: torch.device, ctx: DistContext) -> None:
    """FSDP2 in place: each block its own unit (gathered for its forward and backward only), then the rest of
    the model (embeddings, head, tied weights) as the root unit."""
    mesh = init_device_mesh(device.type, (ctx.world_size,))
    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def gradient_sync_off(model: nn.Module):
    """A context in which backward accumulates gradients on each rank without reducing them across ranks (an
    accumulation micro-batch that is not the step's last), under DDP or FSDP."""
    if isinstance(model, FSDPModule):
        return _fsdp_sync_off(model)
    return model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) else nullcontext()


@contextmanager
def _fsdp_sync_off(model: FSDPModule) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def grad_accum_at(grad_accum: int, launch_world_size: int, ctx: DistContext, ckpt: Path) -> int:
    """The accumulation steps that keep a resumed run's global batch (train.grad_accum micro-batches on each of
    the `launch_world_size` ranks the run was launched with) at this run's world size."""
    micro_batches = grad_accum * launch_world_size
    if micro_batches % ctx.world_size:
        fits = [n for n in range(1, micro_batches + 1) if micro_batches % n == 0]
        raise ConfigError(f"--resume: {ckpt} trains on {micro_batches} micro-batches per step (train.grad_accum="
                          f"{grad_accum} x {launch_world_size} ranks), which {ctx.world_size} ranks cannot share "
                          f"evenly; resume with a world size that divides it ({', '.join(map(str, fits))})")
    return micro_batches // ctx.world_size
