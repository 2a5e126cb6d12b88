"""Causal self-attention for bf16/fp16 training on CPU: SDPA's flash kernel forward in the low precision, its
backward in fp32.

On CPU the flash kernel's low-precision backward is slower than its fp32 one up to a few hundred positions (torch
2.13; at GPT-2 small's 1024 positions the low-precision one wins), while its low-precision forward is the faster.
So, up to MAX_POSITIONS, the forward stays as SDPA runs it under autocast and the backward upcasts the saved bf16
tensors and the incoming gradient: the same gradient formula on the same inputs, accumulated without bf16
rounding, returned in the inputs' dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

_ATEN = torch.ops.aten
LOW_PRECISION = (torch.bfloat16, torch.float16)
MAX_POSITIONS = 512  # longer sequences keep the low-precision backward (see above)


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
        out, log_norm = _ATEN._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        ctx.save_for_backward(q, k, v, out, log_norm)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        q, k, v, out, log_norm = ctx.saved_tensors
        grads = _ATEN._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.float(), q.float(), k.float(), v.float(), out.float(), log_norm, 0.0, True, scale=ctx.scale)
        return *(g.to(t.dtype) for g, t in zip(grads, (q, k, v), strict=True)), None


def takes_fast_path(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether `causal_attention` applies: CPU, bf16 or fp16, q, k and v with the same heads, at most
    `MAX_POSITIONS` positions, a gradient wanted."""
    return (q.device.type == "cpu" and q.dtype in LOW_PRECISION and q.dtype == k.dtype == v.dtype
            and q.shape[1] == k.shape[1] and q.shape[2] <= MAX_POSITIONS and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad))


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Causal SDPA of q, k, v [B, H, T, head_dim] without dropout (check `takes_fast_path` first)."""
    return _CausalAttention.apply(q, k, v, scale)
