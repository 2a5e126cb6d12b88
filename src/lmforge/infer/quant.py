"""Weight-only post-training quantisation: min-max affine int8 (per output channel) and int4 (group-wise).

Scheme (Jacob et al. 2018, eq. 1 and sec. 3): over each quantisation group of a weight (one output row for int8;
`group_size` consecutive input columns of one row for int4), with the range widened to include 0 so the zero point
is a valid code and zero is exact,

    delta = (max - min) / (2^b - 1),   z = round(-min / delta),   q = clamp(round(w / delta) + z, 0, 2^b - 1),
    w ~ (q - z) * delta,               |w - (q - z) * delta| <= delta / 2.

Codes are stored as uint8 (int4: two per byte along the input dimension, low nibble first), one fp32 delta and one
uint8 zero point per group. `QuantLinear` dequantises on the fly in `forward`; embeddings and norms stay fp32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError
from torch import Tensor, nn

from lmforge.config import StrictModel
from lmforge.errors import ConfigError


class QuantConfig(StrictModel):
    """bits 8: per-output-channel; bits 4: groups of `group_size` along the input. `targets`: module-name suffixes
    (e.g. "attn.q", "lm_head"); None means every nn.Linear in the blocks and the head unless tied to the embedding."""

    bits: int = 8
    group_size: int = Field(64, ge=2)
    targets: list[str] | None = None


def quant_config(bits: int = 8, group_size: int = 64, targets: list[str] | None = None) -> QuantConfig:
    """A validated QuantConfig, or a ConfigError naming the bad value."""
    if bits not in (4, 8):
        raise ConfigError(f"quant.bits must be 8 or 4, got {bits}")
    if bits == 4 and (group_size < 2 or group_size % 2):
        raise ConfigError(f"quant.group_size must be an even number >= 2 for int4, got {group_size}")
    try:
        return QuantConfig(bits=bits, group_size=group_size, targets=targets)
    except ValidationError as err:
        raise ConfigError(f"invalid quant config: {err}") from None


# ---------------------------------------------------------------------------------------------
# The affine scheme
# ---------------------------------------------------------------------------------------------


def affine_quantize(w: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Quantise each row of `w` [..., n] as one group: (uint8 codes [..., n], fp32 delta [...], uint8 zero [...])."""
    levels = 2**bits - 1
    w = w.detach().float()
    lo, hi = w.amin(dim=-1).clamp(max=0.0), w.amax(dim=-1).clamp(min=0.0)
    delta = (hi - lo) / levels
    delta = torch.where(delta > 0, delta, torch.ones_like(delta))  # an all-zero group: any delta is exact
    zero = torch.round(-lo / delta).clamp(0, levels)
    q = torch.clamp(torch.round(w / delta[..., None]) + zero[..., None], 0, levels)
    return q.to(torch.uint8), delta, zero.to(torch.uint8)


def affine_dequantize(q: Tensor, delta: Tensor, zero: Tensor) -> Tensor:
    """(q - z) * delta, per row, in fp32."""
    return (q.float() - zero.float()[..., None]) * delta[..., None]


def pack_int4(codes: Tensor) -> Tensor:
    """[..., n] codes in [0, 15] (n even) -> [..., n / 2] uint8, element 2i in the low nibble, 2i+1 in the high."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of `pack_int4`: [..., m] uint8 -> [..., 2m] codes."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------


class QuantLinear(nn.Module):
    """An inference-only Linear holding int8 / packed int4 codes, per-group delta and zero point, fp32 bias.

    Buffers: `weight_q` (int8: [out, in] uint8; int4: [out, in / 2] packed), `scale` and `zero` ([out] for int8,
    [out, in / group_size] for int4)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int):
        super().__init__()
        if bits == 4 and in_features % group_size:
            raise ConfigError(f"quant.group_size {group_size} does not divide the input dimension {in_features}; "
                              "choose a divisor of it")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        groups = (out_features,) if bits == 8 else (out_features, in_features // group_size)
        code_cols = in_features if bits == 8 else in_features // 2
        self.register_buffer("weight_q", torch.zeros(out_features, code_cols, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(groups))
        self.register_buffer("zero", torch.zeros(groups, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int) -> QuantLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size)
        w = linear.weight.detach()
        if bits == 8:
            q, delta, zero = affine_quantize(w, 8)
        else:
            q, delta, zero = affine_quantize(w.reshape(w.shape[0], -1, group_size), 4)
            q = pack_int4(q.flatten(1))
        layer.weight_q.copy_(q)
        layer.scale.copy_(delta)
        layer.zero.copy_(zero)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer.to(w.device)

    def dequantized_weight(self) -> Tensor:
        """The fp32 weight [out, in] the codes stand for."""
        if self.bits == 8:
            return affine_dequantize(self.weight_q, self.scale, self.zero)
        codes = unpack_int4(self.weight_q).view(self.out_features, -1, self.group_size)
        return affine_dequantize(codes, self.scale, self.zero).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


# ---------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------


def _state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state, each shared (tied) tensor counted once."""
    seen: dict[int, int] = {}
    for t in model.state_dict().values():
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def _targets(model: nn.Module, cfg: QuantConfig) -> list[str]:
    """Names of the Linear modules `cfg` selects; a head tied to the embedding is never one (it is the embedding)."""
    emb = getattr(getattr(model, "tok_emb", None), "weight", None)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight is not emb]
    if cfg.targets is None:
        return [n for n in linears if n.startswith("blocks.") or n == "lm_head"]
    chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in cfg.targets)]
    if not chosen:
        raise ConfigError(f"quant.targets {cfg.targets} match no nn.Linear; candidates look like {linears[:4]}")
    return chosen


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_model(model: nn.Module, cfg: QuantConfig) -> dict[str, Any]:
    """Replace the targeted Linears by QuantLinears in place. Returns {bits, group_size, modules, bytes_before,
    bytes_after} (bytes of the whole state, tied tensors once)."""
    cfg = quant_config(cfg.bits, cfg.group_size, cfg.targets)
    before = _state_bytes(model)
    names = _targets(model, cfg)
    for name in names:  # every shape checked before any module is swapped
        if cfg.bits == 4 and model.get_submodule(name).in_features % cfg.group_size:
            raise ConfigError(f"quant.group_size {cfg.group_size} does not divide the input dimension "
                              f"{model.get_submodule(name).in_features} of {name}; choose a divisor of it")
    for name in names:
        _swap(model, name, QuantLinear.from_linear(model.get_submodule(name), cfg.bits, cfg.group_size))
    return {"bits": cfg.bits, "group_size": cfg.group_size if cfg.bits == 4 else None, "modules": names,
            "bytes_before": before, "bytes_after": _state_bytes(model)}


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every QuantLinear by an fp32 nn.Linear holding its dequantised weight, in place."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight_q.device)
            with torch.no_grad():
                linear.weight.copy_(m.dequantized_weight())
                if m.bias is not None:
                    linear.bias.copy_(m.bias)
            _swap(model, name, linear)
    return model


def apply_quant_from_config(model: nn.Module, tree: dict[str, Any]) -> None:
    """Rebuild empty QuantLinear shells for a checkpoint's `quant:` section, so its codes can then be loaded."""
    q = tree["quant"]
    cfg = quant_config(q.get("bits", 8), q.get("group_size", 64), q.get("targets"))
    for name in _targets(model, cfg):
        lin = model.get_submodule(name)
        shell = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, cfg.bits, cfg.group_size)
        _swap(model, name, shell.to(lin.weight.device))
