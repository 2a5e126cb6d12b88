"""RMSNorm for fp32 training: the forward and a hand-written backward, a few passes over the activations each.

Autograd through `F.rms_norm`'s decomposition (pow, mean, rsqrt, two multiplies, each with its own backward) reads
and writes the [tokens, d] activations about fifteen times per norm; on a CPU, where these passes are bound by memory
bandwidth, that cost a Llama block at the demo size more than its attention's projections. Here the forward keeps
its input x and 1/rms(x) for the backward, which is

    grad_weight = sum over rows of g * x_hat                              (x_hat = x / rms(x))
    grad_x      = (g * weight - x_hat * mean(g * weight * x_hat)) / rms(x)

LayerNorm's backward kernel computes exactly this in two fused passes when given a mean of zero, except that it
also subtracts the row mean of g * weight (LayerNorm's centring): that term, mean(g * weight) / rms(x), one
matrix-vector product, is added back.
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
        ctx.save_for_backward(rows, inv_rms, weight)
        return (rows * inv_rms).mul_(weight).view(x.shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        rows, inv_rms, weight = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        want_x, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(grad.device.type, enabled=False):
            grad_x, grad_weight, _ = torch.ops.aten.native_layer_norm_backward(
                grad, rows, [rows.shape[-1]], torch.zeros_like(inv_rms), inv_rms, weight, None,
                [want_x, want_weight, False])
            if want_x:  # undo the centring: + mean(g * weight) / rms(x), per row
                grad_x.add_(torch.mv(grad, weight).unsqueeze_(-1).mul_(inv_rms).div_(rows.shape[-1]))
        return None if grad_x is None else grad_x.view(grad_out.shape), grad_weight, None


def takes_fast_path(x: Tensor, weight: Tensor) -> bool:
    """Whether `rms_norm` applies: CPU fp32 input and weight with a gradient wanted (training); elsewhere the caller's
    `F.rms_norm` (fused on GPUs, fewer Python calls when decoding one token)."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad))


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2, last dim) + eps) * weight, the same values as `F.rms_norm(x, ...) * weight` up to fp32
    rounding (check `takes_fast_path` first)."""
    return _RMSNorm.apply(x, weight, eps)
