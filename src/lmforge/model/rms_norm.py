"""RMSNorm for fp32 training on a CPU: `cpu_rms_norm.cpp`, built on the machine that runs it.

Autograd through `F.rms_norm`'s decomposition (pow, mean, rsqrt, two multiplies, each with its own backward) reads
and writes the [tokens, d] activations about fifteen times per norm; on a CPU, where these passes are bound by memory
bandwidth, that cost a Llama block at the demo size more than its attention's projections. The C++ kernel runs one
pass each way: the forward keeps its input x and 1/rms(x) for the backward, which computes grad_x and grad_w
together. It is built on the machine (`cpu_build`) and compared with `F.rms_norm` in fp64 on a small known input; a
kernel that fails to build or disagrees is not used (one warning) and the norm takes its eager path.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.model import cpu_build

SOURCE = Path(__file__).with_name("cpu_rms_norm.cpp")
CHUNK = 64  # rows per share of grad_w, as in the source
# of the largest value, against fp64 on the check's input: fp32 rounding is ~1e-7 there
CHECK_TOLERANCE = 1e-5


def _declare(lib: ctypes.CDLL) -> None:
    pointer, size = ctypes.c_void_p, ctypes.c_long
    lib.rms_norm_forward.argtypes = [pointer] * 4 + [size, size, ctypes.c_float, ctypes.c_int]
    lib.rms_norm_backward.argtypes = [pointer] * 7 + [size, size, ctypes.c_int]


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The built and checked kernel, or None (after one warning) where it cannot be used."""
    return cpu_build.checked_kernel(SOURCE, _declare, kernel_problem, "CPU RMSNorm kernel",
                                    "RMSNorm runs through F.rms_norm")


def _forward(lib: ctypes.CDLL, rows: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    out, inv_rms = torch.empty_like(rows), rows.new_empty(rows.shape[0])
    lib.rms_norm_forward(rows.data_ptr(), weight.data_ptr(), out.data_ptr(), inv_rms.data_ptr(), rows.shape[0],
                         rows.shape[1], eps, torch.get_num_threads())
    return out, inv_rms


def _backward(lib: ctypes.CDLL, grad: Tensor, rows: Tensor, weight: Tensor, inv_rms: Tensor,
              want_x: bool = True) -> tuple[Tensor | None, Tensor]:
    n, d = rows.shape
    grad_x, grad_w = torch.empty_like(rows) if want_x else None, torch.empty_like(weight)
    shares = rows.new_empty(-(-n // CHUNK), d)
    lib.rms_norm_backward(grad.data_ptr(), rows.data_ptr(), weight.data_ptr(), inv_rms.data_ptr(),
                          None if grad_x is None else grad_x.data_ptr(), grad_w.data_ptr(), shares.data_ptr(), n, d,
                          torch.get_num_threads())
    return grad_x, grad_w


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        weight = weight.contiguous()
        out, inv_rms = _forward(kernel(), rows, weight, eps)
        ctx.save_for_backward(rows, inv_rms, weight)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        rows, inv_rms, weight = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()
        grad_x, grad_w = _backward(kernel(), grad, rows, weight, inv_rms, ctx.needs_input_grad[0])
        return (None if grad_x is None else grad_x.view(grad_out.shape),
                grad_w if ctx.needs_input_grad[1] else None, None)


def kernel_problem(lib: ctypes.CDLL) -> str | None:
    """None when `lib`'s output and gradients match `F.rms_norm(x) * weight` and its autograd in fp64 on a small known
    input (rows in no whole number of chunks, a width in no whole number of vectors), else one line saying what is
    wrong."""
    gen = torch.Generator().manual_seed(0)
    x, grad = (torch.randn(CHUNK + 37, 45, generator=gen, dtype=torch.float64) for _ in range(2))
    weight = torch.rand(45, generator=gen, dtype=torch.float64).add_(0.5)
    with torch.enable_grad():  # the first use may come inside an autograd Function's forward
        exact = [t.clone().requires_grad_() for t in (x, weight)]
        want = F.rms_norm(exact[0], (45,), eps=1e-5) * exact[1]
        want_grads = torch.autograd.grad(want, exact, grad)
    x32, weight32 = x.float(), weight.float()
    out, inv_rms = _forward(lib, x32, weight32, 1e-5)
    got = (out, *_backward(lib, grad.float(), x32, weight32, inv_rms))
    for name, g, w in zip(("output", "grad_x", "grad_weight"), got, (want, *want_grads), strict=True):
        error = (g.double() - w).abs().max().item() / w.abs().max().item()
        if not error <= CHECK_TOLERANCE:
            return f"the CPU RMSNorm kernel's {name} is off by {error:.2e} of the largest"
    return None


def takes_fast_path(x: Tensor, weight: Tensor) -> bool:
    """Whether `rms_norm` applies: CPU fp32 input and weight with a gradient wanted (training), outside a
    `torch.compile` trace, and a kernel that built and passed its check; elsewhere the caller's `F.rms_norm` (fused
    on GPUs, fewer Python calls when decoding one token)."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad) and not torch.compiler.is_compiling()
            and kernel() is not None)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2, last dim) + eps) * weight, the same values as `F.rms_norm(x, ...) * weight` up to fp32
    rounding (check `takes_fast_path` first)."""
    if not (x.device.type == weight.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and weight.shape == x.shape[-1:]):
        raise ValueError(f"the CPU RMSNorm kernel takes fp32 CPU tensors, a weight of the input's width "
                         f"{list(x.shape[-1:])}: got {x.dtype} {list(x.shape)} and {weight.dtype} {list(weight.shape)}")
    return _RMSNorm.apply(x, weight, eps)
