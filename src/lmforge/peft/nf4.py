"""NF4, the 4-bit NormalFloat data type of QLoRA (Dettmers et al. 2023, sec. 3): 16 levels at normal
quantiles, block-wise absmax scales, optional double quantisation of the scales; two codes per byte."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.errors import ConfigError


def _nf4_levels() -> Tensor:
    """The 16 NF4 levels: N(0, 1) quantiles, 8 positive and 7 negative plus an exact zero, scaled to [-1, 1]
    (QLoRA eq. 4 as bitsandbytes' create_normal_map builds it, offset 0.9677083)."""
    pos = torch.special.ndtri(torch.linspace(0.9677083, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(0.9677083, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return (levels / levels.max()).float()


NF4 = _nf4_levels()
_TINY = torch.finfo(torch.float32).tiny


@functools.cache
def _nf4_on(device: torch.device) -> Tensor:
    return NF4.to(device)  # once per device, not a host-to-device copy per forward


def nf4_quantize(w: Tensor, group_size: int = 64) -> tuple[Tensor, Tensor, torch.Size]:
    """Block-wise NF4: each run of `group_size` values (row-major, zero-padded at the end) is divided by its absmax
    and rounded to the nearest NF4 level. Returns (uint8 codes, two per byte, low nibble first; fp32 absmax per
    group; the original shape)."""
    if group_size < 2 or group_size % 2:
        raise ConfigError(f"qlora_group_size must be an even number >= 2, got {group_size}")
    flat = w.detach().float().flatten()
    groups = F.pad(flat, (0, -flat.numel() % group_size)).view(-1, group_size)
    scales = groups.abs().amax(dim=1)
    levels = _nf4_on(w.device)
    codes = torch.bucketize(groups / scales.clamp_min(_TINY)[:, None], (levels[1:] + levels[:-1]) / 2).flatten()
    codes = codes.to(torch.uint8)
    return codes[0::2] | (codes[1::2] << 4), scales, w.shape


def nf4_dequantize(packed: Tensor, scales: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """Inverse of `nf4_quantize` (up to the rounding): level[code] * absmax of the code's group, fp32."""
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).flatten().long()
    values = _nf4_on(packed.device)[codes].view(scales.numel(), -1) * scales.float()[:, None]
    return values.flatten()[: math.prod(shape)].view(shape)


def quantize_scales(scales: Tensor, block: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """Double quantisation (QLoRA sec. 3): the fp32 group absmaxes, less their mean, as int8 with one fp32 absmax
    per `block` of them (the paper uses 8-bit floats; linear int8 here). Returns (codes, block absmax, mean)."""
    mean = scales.mean()
    centred = F.pad(scales - mean, (0, -scales.numel() % block)).view(-1, block)
    absmax = centred.abs().amax(dim=1)
    codes = torch.round(centred / absmax.clamp_min(_TINY)[:, None] * 127).to(torch.int8)
    return codes.flatten()[: scales.numel()], absmax, mean


def dequantize_scales(codes: Tensor, absmax: Tensor, mean: Tensor, block: int = 256) -> Tensor:
    padded = F.pad(codes.float(), (0, -codes.numel() % block)).view(-1, block)
    return (padded * (absmax[:, None] / 127)).flatten()[: codes.numel()] + mean
