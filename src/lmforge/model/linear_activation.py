"""act(x @ W.T + b) in one oneDNN call on CPU, for inference: the activation runs in the matmul's epilogue, while the
product is still in cache, instead of as a second pass over the [tokens, d_ff] output in memory. PyTorch's own
tanh-GELU kernel is slow on CPU, which makes this pay most for GPT-2's MLPs over batches of full windows.

`torch.ops.mkldnn._linear_pointwise` (what torch.compile's CPU backend fuses Linear + activation into) is not public
API, so before its first use in a process it runs each activation on a small known input and is compared with
F.linear + the activation; a kernel that is missing, raises or disagrees is not used (one warning) and the caller
takes its plain path. It has no autograd formula: it applies only where no gradient is recorded.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# lmforge's activation name -> the op's (attr, algorithm)
ONEDNN_ACTIVATIONS = {"gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", ""),
                      "silu": ("swish", "")}
MIN_ROWS = 16  # below this many rows oneDNN's per-call setup costs more than the pass it saves
CHECK_TOLERANCE = 1e-5  # of the largest output; fp32 results differ by accumulation order only (~1e-7)
_usable: dict[str, bool] = {}


def kernel_problem(activation: str, reference: Callable[[Tensor], Tensor]) -> str | None:
    """None when the fused op computes reference(F.linear(x, w, b)) on a small known input, else one line saying
    what is wrong."""
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return f"torch {torch.__version__} has no torch.ops.mkldnn._linear_pointwise"
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(shape, generator=gen) for shape in ((2, MIN_ROWS, 32), (48, 32), (48,)))
    try:
        with torch.no_grad():
            out = torch.ops.mkldnn._linear_pointwise(x, w, b, *_attr(activation))
    except Exception as err:  # whatever a changed private op raises, the check reports it
        return f"torch.ops.mkldnn._linear_pointwise failed on a known input: {type(err).__name__}"
    ref = reference(F.linear(x, w, b))
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return (f"torch.ops.mkldnn._linear_pointwise returned {tuple(out.shape)} {out.dtype}, expected "
                f"{tuple(ref.shape)} {ref.dtype}")
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    if not err <= CHECK_TOLERANCE:
        return f"torch.ops.mkldnn._linear_pointwise ({activation}) is off by {err:.1e} of the largest output"
    return None


def _attr(activation: str) -> tuple[str, list, str]:
    attr, algorithm = ONEDNN_ACTIVATIONS[activation]
    return attr, [], algorithm


def linear_activation(x: Tensor, linear: nn.Module, activation: str,
                      reference: Callable[[Tensor], Tensor]) -> Tensor | None:
    """reference(linear(x)) from one fused call, or None where that does not apply (training, not CPU fp32, not a
    plain Linear, an activation the op lacks, fewer than MIN_ROWS rows, or a kernel that failed its check)."""
    if (type(linear) is not nn.Linear or activation not in ONEDNN_ACTIVATIONS or x.device.type != "cpu"
            or x.dtype != torch.float32 or linear.weight.dtype != torch.float32 or x.numel() < MIN_ROWS * x.shape[-1]
            or (torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad))):
        return None
    if activation not in _usable:
        problem = kernel_problem(activation, reference)
        if problem is not None:
            warnings.warn(f"{problem}; the MLP runs Linear then its activation", RuntimeWarning, stacklevel=2)
        _usable[activation] = problem is None
    if not _usable[activation]:
        return None
    return torch.ops.mkldnn._linear_pointwise(x, linear.weight, linear.bias, *_attr(activation))
