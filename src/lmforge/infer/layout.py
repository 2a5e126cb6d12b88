"""Weight layout for inference: Linear weights stored column-major, which CPU matmuls stream faster from memory.

`nn.Linear` keeps W as [out, in] row-major and computes x @ W.T. When the weights come from DRAM, MKL multiplies a few
rows faster if W.T is the contiguous one: each input element scales one contiguous weight row into an output that
stays in cache, instead of one dot product per output. Weights that stay in the last-level cache read faster
row-major when several threads share a matmul (each thread reads one contiguous half); one thread alone multiplies a
few rows faster from columns at any size (as the serve engine's process runs on 2 cores). benchmarks/decode_speed.py
times both layouts.

The rule, decided on the machine that runs the model: Linear weights of at least the CPU's last-level cache size
(read from the OS) stream from DRAM every decode step, so they go column-major, and so do weights of any size that
one intra-op thread will multiply; smaller ones under several threads stay as they are. CUDA (and any non-CPU)
weights are never converted. Values and shapes stay the same, only the strides change.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

# Used when the OS does not report its caches (not Linux, or a sandbox without sysfs): a common server/desktop LLC.
FALLBACK_CACHE_BYTES = 32 * 2**20
CPU0_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")
_SIZE_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}


def _parse_size(text: str) -> int:
    """sysfs cache sizes: '48K', '307200K', '32M' or plain bytes."""
    text = text.strip().upper()
    return int(text[:-1]) * _SIZE_UNITS[text[-1]] if text[-1] in _SIZE_UNITS else int(text)


def largest_cache_bytes(cache_dir: Path) -> int:
    """Size of the highest-level data or unified cache in a Linux sysfs cache folder (`index*/level`, `type`, `size`,
    as under `CPU0_CACHES`); `FALLBACK_CACHE_BYTES` when the folder is missing, unreadable or lists no such cache."""
    best: tuple[int, int] | None = None  # (level, bytes)
    try:
        for index in cache_dir.glob("index*"):
            if (index / "type").read_text().strip() == "Instruction":
                continue
            entry = (int((index / "level").read_text()), _parse_size((index / "size").read_text()))
            best = entry if best is None else max(best, entry)
    except (OSError, ValueError, IndexError):
        return FALLBACK_CACHE_BYTES
    return best[1] if best is not None and best[1] > 0 else FALLBACK_CACHE_BYTES


@functools.cache
def last_level_cache_bytes() -> int:
    """This machine's last-level cache size: CPU 0's largest cache as Linux reports it in sysfs; on any other system,
    or when sysfs is missing or unreadable, `FALLBACK_CACHE_BYTES`."""
    return largest_cache_bytes(CPU0_CACHES)


def is_column_major(weight: torch.Tensor) -> bool:
    """True when a 2-D weight [out, in] is stored as its transpose [in, out], each column contiguous (alone, or as
    rows of a larger column-major buffer, as attention's shared q|k|v)."""
    return weight.dim() == 2 and weight.stride(0) == 1 and weight.stride(1) >= weight.shape[0] > 1


def linear_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights of `model`'s plain `nn.Linear` layers, a tied weight once."""
    return list({id(m.weight): m.weight for m in model.modules() if type(m) is nn.Linear}.values())


@torch.no_grad()
def column_major_linears(model: nn.Module, min_bytes: int | None = None, threads: int | None = None) -> nn.Module:
    """Store every plain `nn.Linear` weight of `model` column-major, in place, one matrix at a time (peak memory grows
    by one matrix), when all are on the CPU and hold at least `min_bytes` together (default: this machine's
    `last_level_cache_bytes()`, or 0 when `threads`, the intra-op threads that will run the model, is 1; default:
    torch's now); return `model`. For inference: the CLI's `generate` and the report's timings call it
    after `lmforge.load`; leave a model you will train as it is (a tied embedding becomes a strided gather, and
    gradients come back in the other layout). A tied weight is converted once and stays tied; quantised and adapter
    layers keep their own layout; saving writes contiguous tensors as before."""
    weights = linear_weights(model)
    if any(w.device.type != "cpu" for w in weights):
        return model
    if min_bytes is None:
        min_bytes = 0 if (torch.get_num_threads() if threads is None else threads) == 1 else last_level_cache_bytes()
    if sum(w.nbytes for w in weights) < min_bytes:
        return model
    for weight in weights:
        if not is_column_major(weight):
            weight.data = weight.data.t().contiguous().t()
    return model
