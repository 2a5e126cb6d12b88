"""PyTorch's weight-only CPU kernels, the private ops `QuantLinear` decodes with, each checked before first use.

`torch._weight_int8pack_mm`, `torch._convert_weight_to_int4pack_for_cpu` and `torch._weight_int4pack_mm_for_cpu`
are not public API: a torch release may remove them or change their conventions. This module is the only caller.
Before its first use in a process, each kernel runs on a small known input and is compared with the same product
computed in fp32; a kernel that is missing, raises, returns another shape or dtype, or disagrees is not used: the
layers fall back to dequantise + F.linear (the same numbers up to bf16 rounding), with one warning naming it.

Conventions relied on (x [M, K] bf16, result [M, N] bf16):
* int8: `_weight_int8pack_mm(x, w, scales)` = x @ (w * scales[:, None]).T, w [N, K] int8, scales [N] bf16.
* int4: `_convert_weight_to_int4pack_for_cpu(q, 1)` packs codes q [N, K] int32 in 0..15; then
  `_weight_int4pack_mm_for_cpu(x, packed, group_size, sz)` = x @ w.T with w = (q - 8) * scale + offset per group of
  `group_size` along K, sz [K / group_size, N, 2] bf16 holding (scale, offset). N % 16 == 0, group_size in
  `INT4_GROUP_SIZES`.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

INT8_KERNELS = ("_weight_int8pack_mm",)
INT4_KERNELS = ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # the only group sizes the int4 kernel takes
# A check passes when the largest error is within this fraction of the largest reference element: bf16 output
# rounding is 2^-9 ~ 2e-3 relative; a changed convention (scale, zero point, nibble order) is off by O(1).
CHECK_TOLERANCE = 1e-2


def int8_mm(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """x [M, K] bf16 @ (weight [N, K] int8 * scales [N] bf16).T -> [M, N] bf16."""
    return torch._weight_int8pack_mm(x, weight, scales)


def int4_pack(codes: Tensor) -> Tensor:
    """Codes [N, K] int32 in 0..15 (N % 16 == 0) -> the int4 kernel's packed weight."""
    return torch._convert_weight_to_int4pack_for_cpu(codes, 1)


def int4_mm(x: Tensor, packed: Tensor, group_size: int, scale_offset: Tensor) -> Tensor:
    """x [M, K] bf16 @ w.T -> [M, N] bf16, w = (codes - 8) * scale + offset per group (`scale_offset` [K/g, N, 2])."""
    return torch._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_offset)


def _check_int8(x: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    n, k = 16, x.shape[1]
    weight = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    scales = (torch.rand(n, generator=gen) * 0.02 + 0.01).bfloat16()
    return int8_mm(x, weight, scales), x.float() @ (weight.float() * scales.float()[:, None]).T


def _check_int4(x: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    n, k, group = 16, x.shape[1], INT4_GROUP_SIZES[0]
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    scale_offset = (torch.rand(k // group, n, 2, generator=gen) * 0.02 + 0.01).bfloat16()
    scale, offset = (t.float().transpose(0, 1).repeat_interleave(group, dim=1) for t in scale_offset.unbind(-1))
    weight = (codes.float() - 8) * scale + offset
    return int4_mm(x, int4_pack(codes), group, scale_offset), x.float() @ weight.T


def kernel_problem(bits: int) -> str | None:
    """Run the kernels of `bits` (8 or 4) on a small known input: None if they exist and compute the product as
    documented above, else one line naming the kernel and what is wrong."""
    names = INT8_KERNELS if bits == 8 else INT4_KERNELS
    missing = [name for name in names if not hasattr(torch, name)]
    if missing:
        return f"torch {torch.__version__} has no torch.{missing[0]}"
    label = " / ".join(f"torch.{name}" for name in names)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2 * INT4_GROUP_SIZES[0], generator=gen).bfloat16()
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            out, ref = (_check_int8 if bits == 8 else _check_int4)(x, gen)
    except Exception as err:  # whatever a changed private op raises, the check reports it
        first_line = next(iter(str(err).splitlines()), "")
        return f"{label} failed on a known input in torch {torch.__version__}: {type(err).__name__}: {first_line}"
    if out.shape != ref.shape or out.dtype != torch.bfloat16:
        return (f"{label} returned {tuple(out.shape)} {out.dtype} in torch {torch.__version__}, expected "
                f"{tuple(ref.shape)} torch.bfloat16")
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    if not err <= CHECK_TOLERANCE:
        return (f"{label} disagrees with the fp32 product in torch {torch.__version__}: largest error {err:.2e} of "
                f"the largest output, above {CHECK_TOLERANCE}")
    return None


@functools.cache
def usable(bits: int) -> bool:
    """Whether the int`bits` kernels passed `kernel_problem`, checked once per process; if not, one warning."""
    problem = kernel_problem(bits)
    if problem is not None:
        warnings.warn(f"{problem}; int{bits} layers use the slower dequantise + F.linear path", RuntimeWarning,
                      stacklevel=2)
    return problem is None
