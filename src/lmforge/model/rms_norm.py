"""RMSNorm for fp32 training: the forward and a hand-written backward, a few passes over the activations each.

Autograd through `F.rms_norm`'s decomposition (pow, mean, rsqrt, two multiplies, each with its own backward) reads
and writes the [tokens, d] activations about fifteen times per norm; on a CPU, where these passes are bound by memory
bandwidth, that cost a Llama block at the demo size more than its attention's projections. Here the forward keeps
the normalised input x_hat = x / rms(x) for the backward, which is

    grad_weight = sum over rows of g * x_hat
    grad_x      = (g * weight - x_hat * mean(g * weight * x_hat)) / rms(x)

with the row reductions as matrix-vector products.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        mean_square = torch.linalg.vector_norm(rows, dim=-1, keepdim=True).square_().div_(rows.shape[-1])
        inv_rms = mean_square.add_(eps).rsqrt_()
        normed = rows * inv_rms
        ctx.save_for_backward(normed, inv_rms, weight)
        return (normed * weight).view(x.shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        normed, inv_rms, weight = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        with torch.autocast(grad.device.type, enabled=False):
            grad_normed = grad * weight
            # mean over each row of grad_normed * normed, as a matrix-vector product of the rows with the weight
            per_row = grad * normed
            grad_weight = per_row.sum(0) if ctx.needs_input_grad[1] else None
            row_mean = (per_row @ weight).unsqueeze(-1).div_(-normed.shape[-1])
        if not ctx.needs_input_grad[0]:
            return None, grad_weight, None
        grad_x = grad_normed.addcmul_(normed, row_mean).mul_(inv_rms)
        return grad_x.view(grad_out.shape), grad_weight, None


def takes_fast_path(x: Tensor, weight: Tensor) -> bool:
    """Whether `rms_norm` applies: CPU fp32 input and weight with a gradient wanted (training); elsewhere the caller's
    `F.rms_norm` (fused on GPUs, fewer Python calls when decoding one token)."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad))


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2, last dim) + eps) * weight, the same values as `F.rms_norm(x, ...) * weight` up to fp32
    rounding (check `takes_fast_path` first)."""
    return _RMSNorm.apply(x, weight, eps)
