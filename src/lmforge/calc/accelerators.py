"""Peak dense (no sparsity) tensor FLOP/s of known accelerators, from their vendors' data sheets, and the time a
training run takes on them at an assumed model FLOPs utilisation (MFU)."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import ConfigError


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_gb: float
    peak_tflops: dict[str, float]  # precision (bf16 | fp16 | fp32) -> dense peak TFLOP/s; absent = not supported


ACCELERATORS: dict[str, Accelerator] = {a.name.lower(): a for a in (
    Accelerator("V100", 32, {"fp16": 125.0, "fp32": 15.7}),  # SXM2; no bf16: the fp16 + loss scaling case
    Accelerator("A100", 80, {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),  # SXM; fp32 without TF32
    Accelerator("H100", 80, {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # SXM
    Accelerator("H200", 141, {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # SXM: H100's compute, more memory
    Accelerator("MI300X", 192, {"bf16": 1307.4, "fp16": 1307.4, "fp32": 163.4}),
    Accelerator("L4", 24, {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
)}


def find_accelerator(name: str) -> Accelerator:
    """The accelerator called `name` (any case); a ConfigError listing the known ones otherwise."""
    try:
        return ACCELERATORS[name.lower()]
    except KeyError:
        known = ", ".join(a.name for a in ACCELERATORS.values())
        raise ConfigError(f"unknown accelerator '{name}'; known: {known} (peak dense FLOP/s from the vendors' data "
                          "sheets)") from None


def peak_flops(accelerator: Accelerator, precision: str) -> float:
    """Peak FLOP/s of `accelerator` in `precision` (bf16 | fp16 | fp32)."""
    if precision not in accelerator.peak_tflops:
        supported = " or ".join(accelerator.peak_tflops)
        raise ConfigError(f"{accelerator.name} does not support {precision}; pick --precision {supported}")
    return accelerator.peak_tflops[precision] * 1e12


def training_seconds(flops: float, accelerator: Accelerator, precision: str, mfu: float, devices: int = 1) -> float:
    """Seconds `flops` of training take on `devices` accelerators each sustaining `mfu` of its peak."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu} (0.3-0.5 is typical of large dense training runs)")
    if devices < 1:
        raise ConfigError(f"--devices must be at least 1, got {devices}")
    return flops / (peak_flops(accelerator, precision) * mfu * devices)
