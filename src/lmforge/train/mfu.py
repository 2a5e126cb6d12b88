"""Model FLOPs utilisation (MFU, Chowdhery et al. 2022 app. B): the model's training FLOPs per second over the
device's peak. The peak is a square matrix multiply's rate measured on the device in the run's precision (once per
process and shape), or the `train.peak_flops` a user gives (a vendor's datasheet figure, say)."""

from __future__ import annotations

import functools
import time

import torch
from torch import nn

from lmforge.train.objectives import unwrap


@functools.cache
def matmul_peak_flops(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...] = (1024,),
                      repeats: int = 3) -> float:
    """The best FLOP/s of square matmuls (2 n^3 FLOPs each) of `sizes` in `dtype` on `device`, after one untimed
    call each."""
    best, generator = 0.0, torch.Generator(device).manual_seed(0)  # its own: the run's random streams stay as they are
    for n in sizes:
        a = torch.randn(n, n, device=device, generator=generator).to(dtype)
        b = torch.randn(n, n, device=device, generator=generator).to(dtype)
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:  # the first call warms up
                best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def training_flops_per_token(model: nn.Module, seq_len: int) -> int | None:
    """The model's training FLOPs per token at `seq_len` (forward and backward), or None for a model that does not
    count its FLOPs (`flops_per_token`)."""
    count = getattr(unwrap(model), "flops_per_token", None)
    return count(seq_len) if callable(count) else None
