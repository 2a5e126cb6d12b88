"""Transformer building blocks: norms, MLPs and positional encodings (attention is in `attention`)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.model import compiled_activation, rms_norm
from lmforge.model.linear_activation import linear_activation

if TYPE_CHECKING:
    from lmforge.config import RopeScaling

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
        if rms_norm.takes_fast_path(x, self.weight):  # fp32 training on CPU
            return rms_norm.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """`layernorm` (with bias) or `rmsnorm` (gain only)."""
    return RMSNorm(dim, eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps)


def gelu_tanh(x: Tensor) -> Tensor:
    """GPT-2's GELU (the tanh approximation); a named function, so that a model pickles (to an engine process)."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": gelu_tanh,
    "silu": F.silu,
    "relu": F.relu,
}


class MLP(nn.Module):
    """Plain MLP down(act(up(x))) (GPT-2, BERT) or gated down(act(gate(x)) * up(x)) (SwiGLU, Shazeer 2020)."""

    def __init__(self, d_model: int, d_ff: int, activation: str, gated: bool, bias: bool):
        super().__init__()
        self.gated, self.activation = gated, activation
        self.act = ACTIVATIONS[activation]
        self.fuse_activation = False  # set inside `fused_activations` (inference) only
        self.compile_activation = False  # set by `set_compiled_activations` (the trainer, train.compile_activations)
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        if gated:
            self.gate = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        first = self.gate if self.gated else self.up
        h = linear_activation(x, first, self.activation, self.act) if self.fuse_activation else None
        if h is not None:
            return self.down(h * self.up(x) if self.gated else h)
        a, b = first(x), self.up(x) if self.gated else None
        if self.compile_activation and compiled_activation.takes_fast_path(self.activation, self.act, a, b):
            return self.down(compiled_activation.compiled_activation(self.activation, a, b))
        return self.down(self.act(a) if b is None else self.act(a) * b)


@contextmanager
def fused_activations(model: nn.Module) -> Iterator[None]:
    """While scoring or generating, every MLP of `model` computes its activation inside its first projection's
    matmul where `linear_activation` applies (CPU fp32, no gradient recorded, enough rows): the same values up to
    fp32 rounding, one pass fewer over the widest activations."""
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    for mlp in mlps:
        mlp.fuse_activation = True
    try:
        yield
    finally:
        for mlp in mlps:
            mlp.fuse_activation = False


def set_compiled_activations(model: nn.Module, enabled: bool) -> int:
    """Switch every MLP of `model` to (or from) its activation as compiled kernels where they apply (CPU training in
    fp32 or bf16 autocast, `compiled_activation.takes_fast_path`); the number of MLPs switched."""
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    for mlp in mlps:
        mlp.compile_activation = enabled
    return len(mlps)


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


def rope_inv_freq(rotary_dim: int, theta: float, scaling: RopeScaling | None = None,
                  seq_len: int = 0, max_seq_len: int = 0) -> Tensor:
    """RoPE's per-pair frequencies [rotary_dim / 2], with `scaling` applied as transformers applies it. `dynamic`
    scaling depends on `seq_len`, the positions a forward reaches (its base grows once they pass `max_seq_len`)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    if scaling is not None and scaling.type == "dynamic" and seq_len > max_seq_len:
        factor = scaling.factor
        theta = theta * (factor * seq_len / max_seq_len - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
    inv_freq = 1.0 / theta ** exponents
    if scaling is None or scaling.type == "dynamic":
        return inv_freq
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    # llama3: wavelengths longer than original/low_freq_factor are stretched by factor, shorter than
    # original/high_freq_factor kept, those between blended linearly in original/wavelength
    original, low, high = scaling.original_max_len, scaling.low_freq_factor, scaling.high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / scaling.factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    between = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(between, blended, scaled)


def rope_tables(max_len: int, rotary_dim: int, theta: float, scaling: RopeScaling | None = None,
                max_seq_len: int = 0) -> tuple[Tensor, Tensor]:
    """RoPE (Su et al. 2021) cos/sin tables [max_len, rotary_dim] in the half-split layout Llama checkpoints use."""
    inv_freq = rope_inv_freq(rotary_dim, theta, scaling, max_len, max_seq_len)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, T, D]; cos/sin: [T, R] with R <= D. Rotates pairs (i, i + R/2) of the first R dims; the rest pass
    through (partial rotary, GPT-NeoX). The rotation runs in x's dtype, as transformers' does: under autocast the
    fp32 tables would otherwise promote bf16 queries and keys to fp32."""
    rotary = cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if rotary < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]], dim=-1)
    half = rotary // 2
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
