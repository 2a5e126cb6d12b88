"""LoRA-family adapters in lmforge's own format: adapter.safetensors (`<layer>.<kind>` tensors) beside
adapter_config.json (`{"format": "lmforge-lora", "config": <the LoRA fields of PeftConfig>}`), each written
atomically; reading checks every name and shape against the model before touching it."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lmforge.config import PeftConfig
from lmforge.config_loading import validation_summary
from lmforge.errors import CheckpointError, ConfigError, one_line
from lmforge.io import atomic_write, atomic_write_text
from lmforge.peft.lora import (
    ADAPTER_CONFIG,
    ADAPTER_KINDS,
    ADAPTER_WEIGHTS,
    LoRALinear,
    adapter_shapes,
    add_lora,
    checked_layers,
    lora_fields,
    lora_layers,
    tensors_by_layer,
)

RUN_ADAPTER_DIR = "adapter"  # where a LoRA-family run keeps its adapter alone


def adapter_folder(path: str | Path) -> Path:
    """`path` itself, or for a LoRA-family run dir the adapter folder inside it."""
    path = Path(path)
    inner = path / RUN_ADAPTER_DIR
    return inner if not (path / ADAPTER_CONFIG).is_file() and (inner / ADAPTER_CONFIG).is_file() else path


def adapter_layers(model: nn.Module, adapter_name: str, cfg: PeftConfig | None = None) -> dict[str, LoRALinear]:
    layers = {n: m for n, m in lora_layers(model).items() if adapter_name in m.cfgs}
    if not layers:
        raise ConfigError(f"the model has no adapter named '{adapter_name}'")
    for name, layer in layers.items():
        if cfg is not None and lora_fields(layer.cfgs[adapter_name]) != lora_fields(cfg):
            raise ConfigError(f"adapter '{adapter_name}' on '{name}' was built with {layer.cfgs[adapter_name]!r}, "
                              f"not the given {cfg!r}")
    return layers


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """The adapter's tensors keyed `<layer>.<kind>` (kind: lora_A/B, lora_magnitude for DoRA, pissa_A0/B0)."""
    return {f"{name}.{kind}": getattr(layer, kind)[adapter_name].detach().cpu().contiguous()
            for name, layer in adapter_layers(model, adapter_name).items()
            for kind in ADAPTER_KINDS if adapter_name in getattr(layer, kind)}


def save_adapter(model: nn.Module, path: str | Path, cfg: PeftConfig, adapter_name: str = "default") -> Path:
    """Write adapter.safetensors, then adapter_config.json, each atomically (the config marks a complete save)."""
    path = Path(path)
    adapter_layers(model, adapter_name, cfg)
    tensors = lora_state_dict(model, adapter_name)
    atomic_write(path / ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    config = {"format": "lmforge-lora", "config": lora_fields(cfg)}
    atomic_write_text(path / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    return path


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> PeftConfig:
    """Add a saved adapter to `model` (its base); everything is checked before the model is touched."""
    cfg, weights = read_adapter(model, path, adapter_name)
    add_lora(model, cfg, adapter_name, weights)
    return cfg


def read_adapter(model: nn.Module, path: str | Path,
                 adapter_name: str = "default") -> tuple[PeftConfig, dict[str, dict[str, Tensor]]]:
    """The saved adapter in `path` and its tensors per layer, checked to fit `model` as `adapter_name` (which
    the model does not have yet); the model is not touched."""
    path = Path(path)
    config_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    try:
        data = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config_file}: cannot read the adapter config ({err})") from None
    if not isinstance(data, dict) or data.get("format") != "lmforge-lora":
        hint = " (a Hugging Face peft adapter: load it with peft)" if isinstance(data, dict) and "peft_type" in data \
            else ""
        raise CheckpointError(f"{config_file}: not an lmforge adapter{hint}")
    try:
        cfg = PeftConfig.model_validate(data.get("config"))
        tensors = load_file(str(weights_file))
    except ValidationError as err:
        raise CheckpointError(f"{config_file}: invalid adapter config: {validation_summary(err, prefix='config.')}"
                              ) from None
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{weights_file}: cannot read adapter weights: {one_line(err)}") from None
    try:
        chosen = checked_layers(model, cfg, adapter_name)
    except ConfigError as err:
        raise CheckpointError(f"{path}: the adapter does not fit this model: {err}") from None
    expected = {k: v for name, m in chosen.items() for k, v in adapter_shapes(name, m, cfg).items()}
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{weights_file} does not fit this model: missing {missing}, unexpected {unexpected}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(f"{weights_file}: tensor '{key}' has shape {tuple(tensors[key].shape)}, but this "
                                  f"model needs {shape}")
    return cfg, tensors_by_layer(chosen, cfg, tensors)
