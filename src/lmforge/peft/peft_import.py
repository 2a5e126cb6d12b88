"""Read a Hugging Face peft LoRA/DoRA adapter folder onto an lmforge decoder: the inverse of `export_peft`.

A peft folder holds adapter_config.json (``peft_type``, ``r``, ``lora_alpha``, ``base_model_name_or_path``,
...) and adapter_model.safetensors (``base_model.model.<HF module>.lora_A.weight`` [r, in], ``lora_B.weight``
[out, r], DoRA's ``lora_magnitude_vector`` [out]). Each HF module becomes a `LoRALinear` adapter on the lmforge
Linear it names; GPT-2's fused ``c_attn`` (and GPT-NeoX's ``query_key_value``, whose rows interleave q, k and v per
head) gives its q, k and v layers the same A and their rows of B (and of the magnitude), which computes exactly what
the fused layer does. What lmforge cannot reproduce (another
peft type, bias training, extra trainable modules, a module lmforge does not have) is refused by name.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from lmforge.config import PeftConfig
from lmforge.errors import CheckpointError, ConfigError
from lmforge.model.decoder import DecoderLM
from lmforge.model.hf import hf_model_type_of, split_fused_qkv
from lmforge.peft.export import hf_module_name
from lmforge.peft.lora import PEFT_CONFIG, PEFT_WEIGHTS, LoRALinear, check_adapter_name

ADAPTER_NAME = "default"
# (lmforge layer, its LoRA config, its tensors by kind) for every layer a peft adapter changes
PeftPlan = list[tuple[str, PeftConfig, dict[str, Tensor]]]
_KEY_RE = re.compile(r"base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)")
# adapter_config.json keys whose non-default values change what the adapter computes in ways lmforge does not
_REFUSED = {"bias": "none", "lora_bias": False, "modules_to_save": None, "layer_replication": None,
            "target_parameters": None, "trainable_token_indices": None}


def read_peft_config(path: str | Path) -> dict[str, Any] | None:
    """adapter_config.json of a peft folder as a dict, or None when `path` is not one."""
    config_file = Path(path) / PEFT_CONFIG
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and "peft_type" in config else None


def peft_base(path: str | Path, base: str | Path | None = None) -> Path:
    """The local directory of the base model a peft folder applies to: `base`, else its base_model_name_or_path."""
    config = read_peft_config(path) or {}
    named = config.get("base_model_name_or_path")
    if base is not None:
        named = str(base)
    if not named or not Path(named).is_dir():
        what = f"names base model {named!r}" if named else "names no base model"
        raise CheckpointError(f"{Path(path) / PEFT_CONFIG} {what}, which is not a local directory (lmforge does not "
                              "download models); pass the base's directory with --base PATH (Python: "
                              "lmforge.load(adapter_dir, base=PATH))")
    return Path(named)


def _check_config(config_file: Path, config: dict[str, Any]) -> None:
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{config_file}: peft_type={config.get('peft_type')!r} is not supported (only LORA, "
                              "with or without DoRA)")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise CheckpointError(f"{config_file}: task_type={config['task_type']!r} is not supported (only CAUSAL_LM)")
    for key, default in _REFUSED.items():
        if config.get(key, default) not in (default, [], {}):
            raise CheckpointError(f"{config_file}: {key}={config[key]!r} is not supported by lmforge (needs "
                                  f"{key}={default!r})")


def _scaling(config: dict[str, Any], hf_name: str, r: int) -> float:
    """peft's scaling for one module: its alpha (alpha_pattern, else lora_alpha) over r, or sqrt(r) (rsLoRA)."""
    alpha = config.get("lora_alpha", 8)
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", hf_name):
            alpha = value
            break
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def _lmforge_linears(model: DecoderLM, model_type: str) -> dict[str, list[tuple[str, nn.Linear | LoRALinear]]]:
    """HF module name -> the lmforge Linear (or already adapted) layers it stands for (GPT-2's c_attn: q, k, v in
    that order)."""
    out: dict[str, list[tuple[str, nn.Linear | LoRALinear]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | LoRALinear):
            out.setdefault(hf_module_name(name, model_type), []).append((name, module))
    return out


def _split_rows(model: DecoderLM, model_type: str, layers: list[tuple[str, nn.Module]],
                t: Tensor) -> tuple[Tensor, ...]:
    """The rows of a fused module's B (or magnitude) that belong to each of its lmforge `layers`."""
    if model_type == "gpt_neox" and len(layers) == 3:  # query_key_value: q, k, v rows interleaved per head
        return split_fused_qkv(model_type, t, False, model.cfg.n_head)
    return t.split([m.out_features for _, m in layers])


def load_peft_adapter(model: DecoderLM, path: str | Path, adapter_name: str = ADAPTER_NAME) -> None:
    """Put the peft adapter in `path` on `model` (its base) as `adapter_name`, active; everything is checked before
    the model is touched. Raises CheckpointError naming what does not fit."""
    _, plan = read_peft_adapter(model, path, adapter_name)
    add_peft_adapter(model, plan, adapter_name)


def read_peft_adapter(model: DecoderLM, path: str | Path,
                      adapter_name: str = ADAPTER_NAME) -> tuple[PeftConfig, PeftPlan]:
    """The peft adapter in `path` as one LoRA config per lmforge layer, checked to fit `model` as `adapter_name`;
    the model is not touched. The first config, targeting every layer, stands for the whole adapter (rank_pattern
    or alpha_pattern may give some layers another r or alpha)."""
    check_adapter_name(adapter_name)
    path = Path(path)
    config_file, weights_file = path / PEFT_CONFIG, path / PEFT_WEIGHTS
    config = read_peft_config(path)
    if config is None:
        raise CheckpointError(f"{config_file}: not a peft adapter config (no peft_type)")
    _check_config(config_file, config)
    try:
        tensors = load_file(str(weights_file))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{weights_file}: cannot read adapter weights: {err}") from None
    model_type = hf_model_type_of(model.cfg)
    linears = _lmforge_linears(model, model_type)
    parts: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY_RE.fullmatch(key)
        if m is None or m[1] not in linears:
            raise CheckpointError(f"{weights_file}: '{key}' is not a LoRA weight of a Linear layer this "
                                  f"{model_type} base has (e.g. base_model.model.{next(iter(linears))}.lora_A.weight)")
        parts.setdefault(m[1], {})[m[2].split(".")[0]] = tensor
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    plan: PeftPlan = []
    for hf_name, found in parts.items():
        layers = linears[hf_name]
        A, B, magnitude = found.get("lora_A"), found.get("lora_B"), found.get("lora_magnitude_vector")
        out_features = sum(m.out_features for _, m in layers)
        if A is None or B is None or A.shape[1] != layers[0][1].in_features or B.shape != (out_features, A.shape[0]) \
                or (magnitude is not None and magnitude.shape != (out_features,)):
            shapes = {k: tuple(v.shape) for k, v in found.items()}
            raise CheckpointError(f"{weights_file}: {hf_name} has LoRA tensors {shapes}, but this base's layer is "
                                  f"[{out_features}, {layers[0][1].in_features}]")
        if bool(config.get("use_dora")) != (magnitude is not None):
            raise CheckpointError(f"{weights_file}: {hf_name} {'lacks' if config.get('use_dora') else 'has'} a DoRA "
                                  f"magnitude, but use_dora={config.get('use_dora')!r}")
        r = A.shape[0]
        method = "dora" if magnitude is not None else "lora"
        cfg = PeftConfig(r=r, alpha=_scaling(config, hf_name, r) * r, method=method,
                         targets=[name for name, _ in layers])
        rows = {"lora_B": _split_rows(model, model_type, layers, B)}
        if magnitude is not None:
            rows["lora_magnitude"] = _split_rows(model, model_type, layers, magnitude)
        for i, (name, module) in enumerate(layers):
            if isinstance(module, LoRALinear):
                try:
                    module.check_adapter(adapter_name, cfg)
                except ConfigError as err:
                    raise CheckpointError(f"{path}: the adapter does not fit '{name}': {err}") from None
            elif counts[id(module.weight)] > 1:
                raise CheckpointError(f"{weights_file}: the adapter changes {hf_name}, whose weight this base ties to "
                                      "another (tied embeddings); untie them in the base or leave it out")
            plan.append((name, cfg, {"lora_A": A} | {kind: split[i] for kind, split in rows.items()}))
    if not plan:
        raise CheckpointError(f"{weights_file} holds no LoRA weights")
    return plan[0][1].model_copy(update={"targets": [name for name, _, _ in plan]}), plan


def add_peft_adapter(model: DecoderLM, plan: PeftPlan, adapter_name: str = ADAPTER_NAME) -> None:
    """Add a checked adapter (`read_peft_adapter`) as `adapter_name`, the only active one on its layers."""
    for name, cfg, weights in plan:
        module = model.get_submodule(name)
        layer = module if isinstance(module, LoRALinear) else LoRALinear(module)
        layer.add_adapter(adapter_name, cfg, weights)
        layer.set_active([adapter_name])
        if layer is not module:
            model.set_submodule(name, layer)
