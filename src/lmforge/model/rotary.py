"""RoPE for training: the rotation and its backward (the rotation by minus the angle), three passes each; or, in fp32,
one complex multiplication each way, with each head's rotation pairs made adjacent in the projection's weight.

`layers.apply_rope` as autograd records it (a negated half, a concatenation, two products and a sum, q and k each)
runs about twice as many passes over the queries and keys, and its backward allocates zero-filled gradients for the
halves it sliced. Here the heads arrive token-major [B, T, heads, head_dim], as the projection wrote them, and the
tables broadcast over the heads, so each pass runs over contiguous rows of all heads at once.

RoPE rotates the pairs (i, i + head_dim/2) of each head by the angle of position t and pair i: as complex numbers
x_i + j x_(i + head_dim/2), a multiplication by cos + j sin. With the rows of the query and key weights reordered so
that each pair is adjacent (`pairs_adjacent`), the projection writes the queries and keys as complex numbers and the
rotation is one multiplication (its backward one by the conjugate) instead of three passes. Queries and keys are
then both in the reordered layout, which attention's scores (sums over the head dimension) do not see.
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


def pairs_adjacent(rows: Tensor, heads: int) -> Tensor:
    """A query or key projection's weight [heads * head_dim, d] (or bias) with each head's rows reordered from
    (0, 1, ..., head_dim - 1) to (0, head_dim/2, 1, head_dim/2 + 1, ...): the pairs RoPE rotates made adjacent."""
    head_dim = rows.shape[0] // heads
    return rows.view(heads, 2, head_dim // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def rotate_adjacent_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE of fp32 x [B, T, heads, head_dim] whose pairs are adjacent (`pairs_adjacent` weights) by the tables
    cos/sin [T, head_dim] (half-split layout, every dim rotated): `rotate_token_major` of the unreordered heads,
    reordered, up to rounding."""
    B, T, heads, head_dim = x.shape
    half = head_dim // 2
    turn = torch.complex(cos[:, :half].float(), sin[:, :half].float())[:, None]  # [T, 1, head_dim / 2]
    pairs = torch.view_as_complex(x.view(B, T, heads, half, 2))
    return torch.view_as_real(pairs * turn).view(x.shape)
