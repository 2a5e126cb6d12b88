"""Transformer building blocks: norms, MLPs, positional encodings, attention with GQA and a KV cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ModelConfig

# ---------------------------------------------------------------------------------------------
# Norms and MLPs
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 as Llama does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


class MLP(nn.Module):
    """GELU MLP (GPT-2) or gated SwiGLU (Shazeer 2020, as in Llama): down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        self.act = ACTIVATIONS[cfg.activation]
        self.up = nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.mlp_bias)
        if self.gated:
            self.gate = nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.ff_dim, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            return self.down(self.act(self.gate(x)) * self.up(x))
        return self.down(self.act(self.up(x)))


# ---------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------


def sinusoidal_table(max_len: int, dim: int) -> Tensor:
    """Fixed sin/cos positions (Vaswani et al. 2017, sec. 3.5): even dims sin, odd dims cos."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: dim // 2])
    return table


def rope_tables(max_len: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """RoPE (Su et al. 2021) cos/sin tables in the half-split layout Llama checkpoints use."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, T, D]; cos/sin: [T, D]. Rotates pairs (i, i + D/2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def alibi_slopes(n_head: int) -> Tensor:
    """ALiBi head slopes (Press et al. 2022): geometric 2^(-8/n), extended for non-powers of two."""
    def powers(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_head))
    slopes = powers(closest)
    if closest < n_head:
        slopes += powers(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


class KVCache:
    """Preallocated keys/values for every layer: [B, n_kv_head, max_len, head_dim] each."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (batch_size, cfg.kv_heads, max_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.max_len = max_len
        self.length = 0  # tokens already stored (the same for every row)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new k/v at positions [length, length+T) and return everything so far."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def attention_bias(q_len: int, k_len: int, offset: int, slopes: Tensor | None, device: torch.device) -> Tensor:
    """Additive [H|1, q_len, k_len] bias: causal mask (query i sits at position offset+i),
    plus ALiBi's -slope * distance when slopes are given."""
    q_pos = torch.arange(offset, offset + q_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    distance = (q_pos - k_pos).float()
    bias = torch.zeros(q_len, k_len, device=device).masked_fill(distance < 0, float("-inf"))[None]
    if slopes is not None:
        bias = bias - slopes.to(device)[:, None, None] * distance.clamp(min=0)[None]
    return bias


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads (Ainslie et al. 2023) via SDPA."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.q = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.attn_bias)
        self.k = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.v = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.o = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.attn_bias)
        self.dropout = cfg.dropout

    def forward(
        self,
        x: Tensor,
        layer: int,
        offset: int,
        rope: tuple[Tensor, Tensor] | None,
        bias: Tensor | None,
        cache: KVCache | None,
    ) -> Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # A single new token (decode) may see every cached key; a fresh prompt is plain causal.
        # enable_gqa lets SDPA share each k/v head across its query group without copying.
        is_causal = bias is None and T > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if bias is None else bias.to(q.dtype), is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv != self.n_head,
        )
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))
