"""Selective fine-tuning: train a chosen subset of the model's own parameters.

BitFit (Ben Zaken et al. 2022) trains only the bias terms; top-k trains only the last k blocks (with the final
norm and the head); SVD-diagonal rescales the singular values of chosen Linear layers, W' = U S Z V^T with a
trainable diagonal Z, and merges back into a plain Linear of the same size.
"""

from __future__ import annotations

import re
from collections import Counter
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import ConfigError


def apply_bitfit(model: nn.Module) -> list[str]:
    """Freeze everything but the bias terms (BitFit, Ben Zaken et al. 2022); returns their names."""
    names = [name for name, _ in model.named_parameters() if name.endswith("bias")]
    if not names:
        raise ConfigError("bitfit trains only bias terms and this model has none (Llama-family models have no "
                          "biases); use method lora, svd-diag or topk instead")
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    return names


def apply_topk(model: nn.Module, k: int) -> list[str]:
    """Freeze everything but the last k blocks, the final norm and the head; returns the trainable modules.

    With tied embeddings the head is the token embedding, so that trains too."""
    n = len(model.blocks)
    if not 1 <= k <= n:
        raise ConfigError(f"top_k={k} must be between 1 and the model's {n} blocks")
    model.requires_grad_(False)
    names = [f"blocks.{i}" for i in range(n - k, n)] + [m for m in ("final_norm", "lm_head") if hasattr(model, m)]
    for name in names:
        model.get_submodule(name).requires_grad_(True)
    return names


class SVDDiagLinear(nn.Module):
    """W' = U S Z V^T: W's thin SVD frozen, the diagonal Z = diag(z) trainable, z = 1 at init.

    Computed as W + U S (Z - I) V^T (the same matrix, since W = U S V^T): keeping W itself makes the start
    exactly W, where a recomposed U S V^T matches it only up to rounding."""

    def __init__(self, linear: nn.Linear, decompose: bool = True):
        """`decompose=False` leaves U, S, Vh zero, for a checkpoint's state dict to fill (no SVD for nothing)."""
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        w = linear.weight.detach().double()
        if decompose:
            U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        else:
            k = min(w.shape)
            U, S, Vh = w.new_zeros(w.shape[0], k), w.new_zeros(k), w.new_zeros(k, w.shape[1])
        dtype = linear.weight.dtype
        # row-major, as a checkpoint reload gives them back: svd returns U, Vh column-major, and a GEMM's rounding
        # depends on its operands' layouts, so the trained and the reloaded model would compute different bits
        self.register_buffer("U", U.to(dtype, memory_format=torch.contiguous_format))
        self.register_buffer("S", S.to(dtype))
        self.register_buffer("Vh", Vh.to(dtype, memory_format=torch.contiguous_format))
        self.z = nn.Parameter(torch.ones_like(self.S))

    def forward(self, x: Tensor) -> Tensor:
        delta = F.linear(F.linear(x, self.Vh) * (self.S * (self.z - 1)), self.U)
        return F.linear(x, self.weight, self.bias) + delta

    def merged_weight(self) -> Tensor:
        """W + U diag(S (z - 1)) V^T = U S Z V^T."""
        return self.weight + (self.U * (self.S * (self.z - 1))) @ self.Vh


def matches(name: str, pattern: str) -> bool:
    """LoRA's target rule: the name, or a containing module's, ends with "." + pattern or fnmatches it."""
    parts = name.split(".")
    return any(p.endswith("." + pattern) or fnmatchcase(p, pattern)
               for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)))


def apply_svd_diag(model: nn.Module, targets: list[str], decompose: bool = True) -> list[str]:
    """Freeze the model and replace each nn.Linear that `targets` select (LoRA's patterns: "attn.q", "mlp",
    "blocks.0.*") by an SVDDiagLinear (`decompose=False`: zero factors, see there); returns the replaced names."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = [name for name in linears if any(matches(name, t) for t in targets)]
    if not names:
        existing = sorted({re.sub(r"\.\d+\.", ".*.", n) for n in linears})
        raise ConfigError(f"targets {targets} match no Linear layer; the model's Linear layers are: "
                          f"{', '.join(existing)}")
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    tied = [n for n in names if uses[id(linears[n].weight)] > 1]
    if tied:
        raise ConfigError(f"layer '{tied[0]}' shares its weight with another (tied embeddings); rescaling its "
                          "singular values would change both, so leave it out of targets")
    model.requires_grad_(False)
    for name in names:
        model.set_submodule(name, SVDDiagLinear(linears[name], decompose))
    return names


@torch.no_grad()
def merge_svd_diag(model: nn.Module) -> list[str]:
    """Fold every SVDDiagLinear back into a plain nn.Linear with W' = U S Z V^T; returns their names."""
    names = [name for name, m in model.named_modules() if isinstance(m, SVDDiagLinear)]
    if not names:
        raise ConfigError("the model has no SVD-diagonal layers to merge")
    for name in names:
        layer = model.get_submodule(name)
        out_features, in_features = layer.weight.shape
        merged = nn.utils.skip_init(nn.Linear, in_features, out_features, bias=layer.bias is not None,
                                    device=layer.weight.device, dtype=layer.weight.dtype)
        merged.weight.copy_(layer.merged_weight())
        if layer.bias is not None:
            merged.bias.copy_(layer.bias)
        model.set_submodule(name, merged)
    return names
