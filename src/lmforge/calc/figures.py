"""Every figure `lmforge calc model` shows for one model, as one JSON-ready dict (the report card reads it too)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from lmforge.calc.accelerators import find_accelerator, peak_flops, training_seconds
from lmforge.calc.flops import count_model
from lmforge.calc.memory import REGIMES, activation_bytes, kv_cache_bytes, lora_params, training_memory
from lmforge.errors import ConfigError

# (method, precision regime, activation checkpointing): the training set-ups whose memory is shown
MEMORY_SETUPS: tuple[tuple[str, str, bool], ...] = (
    ("full", "fp32", False),
    ("full", "bf16-mixed", False),
    ("full", "bf16-mixed", True),
    ("full", "fp16-mixed", False),
    ("full", "bf16", False),
    ("lora", "bf16", True),
    ("qlora", "bf16", True),
)
TOKENS_PER_PARAM = 20  # Chinchilla's compute-optimal ratio (Hoffmann et al. 2022): the default token budget


def model_figures(cfg: BaseModel, *, seq: int | None = None, batch: int = 1, tokens: float | None = None,
                  accelerator: str = "H100", precision: str = "bf16", mfu: float = 0.4, devices: int = 1,
                  lora_r: int = 64, context: int | None = None) -> dict[str, Any]:
    """Parameters, exact per-layer FLOPs, 6ND, training memory of each set-up in `MEMORY_SETUPS` for `batch`
    sequences of `seq` tokens, the KV cache of `batch` sequences of `context` tokens, and the training time of
    `tokens` tokens (default: 20 per parameter) on `devices` x `accelerator` at `mfu` of its `precision` peak."""
    device = find_accelerator(accelerator)  # an unknown name or precision fails before any counting
    peak_flops(device, precision)
    for option, value in (("--batch", batch), ("--lora-r", lora_r), ("--context", context), ("--tokens", tokens)):
        if value is not None and value <= 0:
            raise ConfigError(f"{option} must be positive, got {value}")
    count = count_model(cfg, seq)
    seq = count.seq_len
    tokens = float(tokens if tokens is not None else TOKENS_PER_PARAM * count.params)
    counted = count.training_flops_per_token * tokens
    step_tokens = batch * seq
    memory = []
    for method, regime, checkpointing in MEMORY_SETUPS:
        figures = training_memory(cfg, count, REGIMES[regime], step_tokens, method, checkpointing, lora_r)
        memory.append({"method": method, "precision": regime, "activation_checkpointing": checkpointing,
                       **figures.as_dict()})
    seconds = training_seconds(counted, device, precision, mfu, devices)
    return {
        "model": {"arch": cfg.arch, **({"family": cfg.family} if cfg.arch == "decoder" else {}),
                  "layers": cfg.n_layer, "d_model": cfg.d_model, "heads": cfg.n_head, "vocab_size": cfg.vocab_size,
                  "params": count.params},
        "flops": {
            "seq_len": seq,
            "layers": [{"name": row.name, "count": row.count, "params": row.params,
                        "forward_flops": row.forward_flops} for row in count.rows],
            "forward_per_sequence": count.forward_flops,
            "backward_per_sequence": count.backward_flops,
            "training_per_token": count.training_flops_per_token,
            "six_n_per_token": 6 * count.params,
        },
        "compute": {"tokens": tokens, "six_nd": 6 * count.params * tokens, "counted": counted},
        "memory": {"batch": batch, "seq_len": seq, "lora_r": lora_r, "setups": memory,
                   "activations_per_token_bf16": activation_bytes(cfg, 1, 2, False),
                   "lora_params": lora_params(count, lora_r),
                   "regimes": {name: r.description for name, r in REGIMES.items()}},
        "kv_cache": None if cfg.arch == "encoder" else {
            "batch": batch, "context": context or seq, "bytes_16bit": kv_cache_bytes(cfg, batch, context or seq)},
        "training_time": {"accelerator": device.name, "precision": precision, "mfu": mfu, "devices": devices,
                          "peak_tflops": device.peak_tflops.get(precision), "flops": counted, "seconds": seconds,
                          "days": seconds / 86400},
    }
