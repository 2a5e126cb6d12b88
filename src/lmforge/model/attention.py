"""Attention with grouped-query heads and a KV cache: the training paths (RoPE in the CPU kernel, or token-major),
the decoding paths (one fused q/k/v matmul), and the masks and biases they take."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.model import cpu_attention
from lmforge.model.cpu_attention import causal_attention, packed_causal_attention, takes_fast_path
from lmforge.model.layers import apply_rope
from lmforge.model.rotary import pairs_adjacent, rotate_adjacent_pairs, rotate_token_major


class KVCache:
    """Preallocated keys/values for every layer: [B, n_kv_head, max_len, head_dim] each."""

    def __init__(self, n_layer: int, n_kv_head: int, head_dim: int, batch_size: int, max_len: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.length = 0  # tokens already stored (the same for every row)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new k/v at positions [length, length+T) and return everything so far."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reorder(self, rows: Tensor) -> None:
        """Make row i a copy of old row rows[i] in every layer (beam search's survivor reordering)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]


def attention_bias(q_len: int, k_len: int, offset: int, slopes: Tensor | None, device: torch.device,
                   window: int | None = None) -> Tensor:
    """Additive [1, H|1, q_len, k_len] bias: causal mask (query i sits at position offset+i), keys `window` or more
    positions back hidden too when a sliding window is given, plus ALiBi's -slope * distance when slopes are given.
    Four dimensions, because SDPA on CPU sends a 3-D mask to its slow math path (speculative decoding's verify step
    felt it)."""
    q_pos = torch.arange(offset, offset + q_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    distance = (q_pos - k_pos).float()
    hidden = distance < 0 if window is None else (distance < 0) | (distance >= window)
    bias = torch.zeros(q_len, k_len, device=device).masked_fill(hidden, float("-inf"))[None]
    if slopes is not None:
        bias = bias - slopes.to(device)[:, None, None] * distance.clamp(min=0)[None]
    return bias[None]


def mask_positions(attention_mask: Tensor) -> Tensor:
    """[B, S] mask (1 = real) -> [B, S] position ids counting real tokens from 0 (padding takes its neighbour's)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def masked_attention_bias(attention_mask: Tensor, q_len: int, slopes: Tensor | None,
                          window: int | None = None) -> Tensor:
    """Additive [B, H|1, q_len, S] bias for the last q_len of S slots under a [B, S] padding mask (1 = real):
    causal over slots, padded keys hidden, keys `window` or more real positions back hidden under a sliding window,
    ALiBi distances counted in each row's real positions.

    A query always sees its own slot, so padding queries attend to something and stay finite."""
    B, S = attention_mask.shape
    device = attention_mask.device
    if q_len == 1 and window is None and slopes is None:  # a decode step: only padding is hidden
        bias = torch.zeros(B, S, device=device).masked_fill_(attention_mask == 0, float("-inf"))
        bias[:, -1] = 0.0
        return bias[:, None, None]
    q_slot = torch.arange(S - q_len, S, device=device)[:, None]
    k_slot = torch.arange(S, device=device)[None, :]
    hidden = (k_slot > q_slot)[None] | ((attention_mask[:, None, :] == 0) & (k_slot != q_slot)[None])
    if window is not None or slopes is not None:  # distances in each row's real positions
        pos = mask_positions(attention_mask)
        distance = pos[:, -q_len:, None] - pos[:, None, :]
    if window is not None:
        hidden = hidden | (distance >= window)
    bias = torch.zeros(B, q_len, S, device=device).masked_fill(hidden, float("-inf"))[:, None]
    if slopes is not None:
        distance = distance.clamp(min=0).float()
        bias = bias - slopes.to(device)[None, :, None, None] * distance[:, None]
    return bias


def padding_bias(attention_mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """[B, S] mask (1 = attend, 0 = padding) -> additive [B, 1, 1, S] bias."""
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(attention_mask == 0, float("-inf"))[:, None, None, :]


class Attention(nn.Module):
    """Multi-head attention via SDPA: self- or cross-attention, grouped-query heads (Ainslie et al. 2023).

    `bias` is an additive mask broadcastable to [B, H, T, S] (causal/padding -inf, ALiBi, T5 relative
    bias); without one, `causal=True` asks SDPA for its built-in causal mask, or, in CPU training,
    `cpu_attention`'s kernel. `scale` defaults to 1/sqrt(head_dim) (T5 uses 1.0)."""

    def __init__(self, d_model: int, n_head: int, n_kv_head: int, head_dim: int, bias: bool, dropout: float,
                 scale: float | None = None, out_bias: bool | None = None, qk_norm: nn.Module | None = None):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim, self.scale = n_head, n_kv_head, head_dim, scale
        self.q = nn.Linear(d_model, n_head * head_dim, bias=bias)
        self.k = nn.Linear(d_model, n_kv_head * head_dim, bias=bias)
        self.v = nn.Linear(d_model, n_kv_head * head_dim, bias=bias)
        self.o = nn.Linear(n_head * head_dim, d_model, bias=bias if out_bias is None else out_bias)
        # one norm over each head's width for the queries, another for the keys (Qwen3)
        self.q_norm, self.k_norm = (None, None) if qk_norm is None else (qk_norm, copy.deepcopy(qk_norm))
        self.dropout = dropout
        self._fused: tuple[Tensor, Tensor | None] | None = None  # set inside `fused_qkv` (decoding) only
        self.share_qkv_storage()

    def project_q(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values [B, n_kv, S, head_dim] of `x` (computed once for cross-attention)."""
        B, S, _ = x.shape
        k = self.k(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        return k, v

    def _plain_qkv(self) -> tuple[nn.Linear, nn.Linear, nn.Linear] | None:
        linears = self.q, self.k, self.v
        return linears if all(type(m) is nn.Linear for m in linears) else None

    def qkv_view(self) -> tuple[Tensor, Tensor | None] | None:
        """The q|k|v weight [(H + 2 n_kv) head_dim, d_model] (and bias) as one view of the buffer the three
        projections share; None when they do not share one (a projection is adapted or quantised, or `.to()`,
        a layout change or an assigned state dict gave each its own storage)."""
        linears = self._plain_qkv()
        if linears is None:
            return None
        fused = [_consecutive_rows([m.weight for m in linears])]
        if linears[0].bias is not None:
            fused.append(_consecutive_rows([m.bias for m in linears]))
        if any(t is None for t in fused):
            return None
        return fused[0], fused[1] if len(fused) > 1 else None

    @torch.no_grad()
    def share_qkv_storage(self) -> None:
        """Move the q, k and v weights (and biases) into consecutive rows of one buffer, keeping their memory
        layout, so that decoding (`fused_qkv`) multiplies by all three at once. No copy is kept: each projection's
        parameter is a view of the buffer, so training, optimisers and `load_state_dict` update the buffer itself."""
        linears = self._plain_qkv()
        if linears is None or self.qkv_view() is not None:
            return
        groups = [[m.weight for m in linears]] + ([[m.bias for m in linears]] if linears[0].bias is not None else [])
        if any(len({(t.dtype, t.device) for t in group}) > 1 for group in groups):
            return
        # a buffer of the parameters' kind: a normal tensor, which training may use later, even if made while
        # decoding (under inference mode), or an inference tensor for a model built under inference mode
        with torch.inference_mode(linears[0].weight.is_inference()):
            for group in groups:
                column_major = group[0].dim() == 2 and group[0].stride(0) == 1 and group[0].shape[0] > 1
                if column_major:  # infer/layout.py: the buffer stays column-major
                    buffer = torch.cat([t.detach().t() for t in group], dim=1).t()
                else:
                    buffer = torch.cat([t.detach() for t in group])
                for t, part in zip(group, buffer.split([t.shape[0] for t in group]), strict=True):
                    t.data = part

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, H, T, head_dim] and k, v [B, n_kv, T, head_dim] of `x`; one matmul inside `fused_qkv`."""
        if self._fused is None:
            return self.project_q(x), *self.project_kv(x)
        return self._fused_heads(x).split([self.n_head, self.n_kv, self.n_kv], dim=1)

    def _fused_heads(self, x: Tensor) -> Tensor:
        """Inside `fused_qkv`: the q, k and v heads of `x` [B, H + 2 n_kv, T, head_dim], from one matmul."""
        B, T, _ = x.shape
        return F.linear(x, *self._fused).view(B, T, self.n_head + 2 * self.n_kv, self.head_dim).transpose(1, 2)

    def _rotated_fused_qkv(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """`project_qkv` inside `fused_qkv`, then q and k rotated together: one `apply_rope` over their adjacent heads
        (the same element-wise ops as one each, half the op calls of a decode step's rotation)."""
        qk, v = self._fused_heads(x).split([self.n_head + self.n_kv, self.n_kv], dim=1)
        q, k = apply_rope(qk, *rope).split([self.n_head, self.n_kv], dim=1)
        return q, k, v

    def _rotated_training_qkv(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """`project_qkv`, the q/k norms and RoPE when a gradient is recorded: q and k rotated token-major, as the
        projections wrote them (`rotate_token_major`: fewer passes over them than `apply_rope` and its recorded
        backward), or in fp32 by one complex multiplication with their rotation pairs made adjacent
        (`rotate_adjacent_pairs`)."""
        B, T, _ = x.shape
        if self._rotates_adjacent_pairs(x, rope):
            q, k = (F.linear(x, pairs_adjacent(m.weight, n), None if m.bias is None else pairs_adjacent(m.bias, n))
                    .view(B, T, n, self.head_dim) for m, n in ((self.q, self.n_head), (self.k, self.n_kv)))
            q, k = rotate_adjacent_pairs(q, *rope), rotate_adjacent_pairs(k, *rope)
            return q.transpose(1, 2), k.transpose(1, 2), self.v(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k, v = self._token_major_heads(x)
        q, k = rotate_token_major(q, *rope), rotate_token_major(k, *rope)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _token_major_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, T, H, head_dim] and k, v [B, T, n_kv, head_dim] as the projections write them, q/k norms applied."""
        B, T, _ = x.shape
        q, k, v = (m(x).view(B, T, -1, self.head_dim) for m in (self.q, self.k, self.v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def _kernel_attends(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> bool:
        """Whether CPU training self-attention runs wholly in `cpu_attention`'s kernel, which takes the projections'
        outputs as written and applies RoPE itself: [T, head_dim] tables (if any), no dropout, and a shape and dtype
        (autocast's, if on) the kernel `fits`."""
        B, T, _ = x.shape
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        return ((rope is None or rope[0].shape == (T, self.head_dim)) and T > 1
                and not (self.training and self.dropout)
                and cpu_attention.fits(x.device, dtype, B, self.n_head, self.n_kv, self.head_dim))

    def _attend_in_kernel(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        """Causal self-attention of `x` in the kernel (`_kernel_attends`). With plain q, k and v projections, one matmul
        by their weights side by side, whose output the kernel reads as it is and whose gradient it writes in one
        piece: fewer, larger matmuls each way and no gradient copied together."""
        B, T, _ = x.shape
        linears = self._plain_qkv() if self.q_norm is None else None
        if linears is None:
            q, k, v = self._token_major_heads(x)
            heads = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if takes_fast_path(*heads):
                return self._output(causal_attention(*heads, self.scale, rope))
        else:
            bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
            qkv = F.linear(x, torch.cat([m.weight for m in linears]), bias)
            qkv = qkv.view(B, T, self.n_head + 2 * self.n_kv, self.head_dim)
            if takes_fast_path(*cpu_attention.unpack_heads(qkv, self.n_head, self.n_kv)):
                return self._output(packed_causal_attention(qkv, self.n_head, self.n_kv, self.scale, rope))
            q, k, v = qkv.split([self.n_head, self.n_kv, self.n_kv], dim=2)
        # nothing wants a gradient (a frozen model), or a wrapped projection wrote another dtype: as elsewhere
        if rope is not None:
            q, k = rotate_token_major(q, *rope), rotate_token_major(k, *rope)
        return self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)

    def _rotates_adjacent_pairs(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> bool:
        """Whether `_rotated_training_qkv` takes `rotate_adjacent_pairs`: fp32 plain q and k projections on a CPU or GPU
        without autocast (complex bf16 does not exist), no q/k norms."""
        return (self.q_norm is None and type(self.q) is nn.Linear and type(self.k) is nn.Linear
                and x.dtype == self.q.weight.dtype == self.k.weight.dtype == torch.float32
                and x.device.type in ("cpu", "cuda") and not torch.is_autocast_enabled(x.device.type))

    def forward(
        self,
        x: Tensor,
        *,
        bias: Tensor | None = None,
        causal: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        if kv is None and cache is None and bias is None and causal and self._kernel_attends(x, rope):
            return self._attend_in_kernel(x, rope)
        return self.attend(*self.queries_keys_values(x, rope, cache, layer, kv), bias=bias, causal=causal)

    def queries_keys_values(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, cache: KVCache | None = None,
                            layer: int = 0, kv: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The queries of `x` [B, H, T, head_dim] and every key and value they see [B, n_kv, S, head_dim]:
        projected (or the given cross-attention `kv`), rotated by `rope`, and stored in and read from `cache`."""
        if kv is None and rope is not None and self._fused is not None and self.q_norm is None:
            q, k, v = self._rotated_fused_qkv(x, rope)
        elif (kv is None and cache is None and rope is not None and rope[0].dim() == 2
              and rope[0].shape[-1] == self.head_dim and torch.is_grad_enabled()):  # not per-row (padded) tables
            q, k, v = self._rotated_training_qkv(x, rope)
        else:
            q, k, v = self.project_qkv(x) if kv is None else (self.project_q(x), *kv)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                cos, sin = rope
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None = None, causal: bool = False) -> Tensor:
        """Attention of queries q over keys k and values v, then the output projection: [B, T, d_model]."""
        T, dropout = q.shape[2], self.dropout if self.training else 0.0
        if bias is None and causal and T > 1 and not dropout and takes_fast_path(q, k, v):
            y = causal_attention(q, k, v, self.scale)  # training on CPU: model/cpu_attention.cpp
        else:
            # A single new token (decode) may see every cached key; a fresh prompt is plain causal.
            # enable_gqa lets SDPA share each k/v head across its query group without copying.
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if bias is None else bias.to(q.dtype),
                is_causal=bias is None and causal and T > 1, dropout_p=dropout, scale=self.scale,
                enable_gqa=self.n_kv != self.n_head,
            )
        return self._output(y)

    def _output(self, y: Tensor) -> Tensor:
        """The output projection of attention's result y [B, H, T, head_dim]: [B, T, d_model]."""
        B, _, T, _ = y.shape
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def _consecutive_rows(parts: list[Tensor]) -> Tensor | None:
    """`parts` (same strides and dtype) as one tensor when each starts where the previous one's rows end in a
    shared storage, else None."""
    first = parts[0]
    storage, step = first.untyped_storage().data_ptr(), first.stride(0) * first.element_size()
    address = first.data_ptr()
    for t in parts:
        if (t.data_ptr() != address or t.stride() != first.stride() or t.dtype != first.dtype
                or t.untyped_storage().data_ptr() != storage):
            return None
        address += t.shape[0] * step
    shape = (sum(t.shape[0] for t in parts), *first.shape[1:])
    if first.is_inference() and not torch.is_inference_mode_enabled():  # a view of an inference tensor needs the mode
        with torch.inference_mode():
            return first.as_strided(shape, first.stride())
    return first.as_strided(shape, first.stride())


@contextmanager
def fused_qkv(model: nn.Module) -> Iterator[None]:
    """While decoding, every attention layer of `model` multiplies by its q, k and v weights at once, one view of
    the buffer they share (shared again here when `.to()` or a layout change split it): one matmul instead of three,
    faster decoding of small models, and no copy of the weights. The projections must not be replaced inside (the
    generation loops run under inference_mode); training, which needs a gradient for each, stays outside."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.share_qkv_storage()
        layer._fused = layer.qkv_view()
    try:
        yield
    finally:
        for layer in layers:
            layer._fused = None
