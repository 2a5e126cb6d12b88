"""RoPE for training: the rotation and its backward (the rotation by minus the angle), three passes each.

`layers.apply_rope` as autograd records it (a negated half, a concatenation, two products and a sum, q and k each)
runs about twice as many passes over the queries and keys, and its backward allocates zero-filled gradients for the
halves it sliced. Here the heads arrive token-major [B, T, heads, head_dim], as the projection wrote them, and the
tables broadcast over the heads, so each pass runs over contiguous rows of all heads at once.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return (x * cos).addcmul_(swapped, signed_sin)


class _Rotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, signed_sin)
        return _rotate(x, cos, signed_sin)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None]:
        cos, signed_sin = ctx.saved_tensors
        return _rotate(grad_out, cos, -signed_sin), None, None


def rotate_token_major(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE of x [B, T, heads, head_dim] by the tables cos/sin [T, head_dim] (half-split layout, every dim rotated):
    the same values as `apply_rope(x.transpose(1, 2), cos, sin).transpose(1, 2)` up to rounding, computed in x's
    dtype."""
    half = x.shape[-1] // 2
    sin = sin.to(x.dtype)
    signed_sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
    return _Rotate.apply(x, cos.to(x.dtype)[:, None], signed_sin[:, None])  # [T, 1, head_dim]: broadcast over heads
