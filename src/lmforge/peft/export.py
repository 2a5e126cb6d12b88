"""Export lmforge LoRA-family adapters in Hugging Face peft's format (see `lmforge.peft.lora`'s docstring for
GPT-2's and GPT-NeoX's fused q/k/v, PiSSA and QLoRA): a portable folder naming its base, or one with the base in
`base/`. `lmforge.peft.peft_import` reads such folders back."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lmforge.config import PeftConfig
from lmforge.data.chat import ChatTemplate
from lmforge.io import atomic_write, atomic_write_text
from lmforge.model.decoder import DecoderLM
from lmforge.model.hf import (
    _FUSED_QKV,
    _HEAD,
    _LAYER,
    _PREFIX,
    export_hf,
    hf_model_type_of,
    join_fused_qkv,
    write_hf_tokenizer,
)
from lmforge.peft.lora import BASE_DIR, PEFT_CONFIG, PEFT_WEIGHTS, LoRALinear, lora_layers
from lmforge.peft.lora_files import adapter_layers
from lmforge.tokenizer import Tokenizer


def hf_module_name(name: str, model_type: str) -> str:
    """lmforge Linear name -> HF module name (GPT-2's q/k/v all map to the fused c_attn, GPT-NeoX's to the fused
    query_key_value)."""
    if name == "lm_head":
        return _HEAD[model_type].removesuffix(".weight")
    block, sub = re.fullmatch(r"blocks\.(\d+)\.(.+)", name).groups()
    if model_type in _FUSED_QKV and sub in ("attn.q", "attn.k", "attn.v"):
        sub = _FUSED_QKV[model_type]
    else:
        sub = {lm: hf for hf, lm in _LAYER[model_type].items()}[sub]
    return f"{_PREFIX[model_type]}{'h' if model_type == 'gpt2' else 'layers'}.{block}.{sub}"


def _original_weight(module: nn.Module) -> Tensor:
    return module.original_weight() if isinstance(module, LoRALinear) else module.weight.detach()


def _peft_factors(layer: LoRALinear, name: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """(A, B, magnitude) of adapter `name` as a LoRA on the original base; PiSSA becomes [A|A0], [B|-B0]."""
    A, B = layer.lora_A[name].detach(), layer.lora_B[name].detach()
    if name in layer.pissa_A0:
        A, B = torch.cat([A, layer.pissa_A0[name]]), torch.cat([B, -layer.pissa_B0[name]], dim=1)
    magnitude = layer.lora_magnitude[name].detach() if name in layer.lora_magnitude else None
    return A, B, magnitude


def export_peft(model: DecoderLM, tokenizer: Tokenizer | None, path: str | Path, cfg: PeftConfig,
                adapter_name: str = "default", base_name: str | None = None,
                chat_template: ChatTemplate | None = None) -> Path:
    """Write adapter_model.safetensors + adapter_config.json in peft's format into `path`, with the tokenizer
    files (and `chat_template` as Jinja) beside them, so that `PeftModel.from_pretrained(base, path)` or
    `AutoPeftModelForCausalLM.from_pretrained(path)` gives lmforge's logits. The adapter is exported alone,
    with weight 1; see the module docstring for GPT-2, PiSSA and QLoRA.

    `base_name` (a hub id, or a path as the folder's users will reach it) makes the folder portable: it is
    written as base_model_name_or_path and nothing else is. Without it, the HF model the adapter applies to
    is written into `path/base` and named by its absolute path (a self-contained folder that stays put)."""
    path = Path(path)
    layers = adapter_layers(model, adapter_name, cfg)
    model_type = hf_model_type_of(model.cfg)
    if base_name is None:
        base = DecoderLM(model.cfg)
        state = {k: v for k, v in model.state_dict().items() if k in base.state_dict()}
        state |= {f"{n}.weight": m.original_weight() for n, m in lora_layers(model).items()}
        base.load_state_dict(state)
        export_hf(base, tokenizer, path / BASE_DIR, chat_template)
        base_name = str((path / BASE_DIR).resolve())
    if tokenizer is not None:
        write_hf_tokenizer(tokenizer, path, model.cfg.max_seq_len, chat_template)
    parts: dict[str, dict[str, tuple[Tensor, Tensor, Tensor | None]]] = {}
    for name, layer in layers.items():
        parts.setdefault(hf_module_name(name, model_type), {})[name] = _peft_factors(layer, adapter_name)
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    for hf_name, factors in parts.items():
        if hf_name.endswith(_FUSED_QKV.get(model_type, "-")):  # one exact LoRA for the fused q|k|v: A stacked,
            # B block-diagonal (its rows interleaved per head as GPT-NeoX's are)
            prefix = next(iter(factors)).rsplit(".", 1)[0]
            triples = []
            for p in "qkv":
                if f"{prefix}.{p}" in factors:
                    triples.append(factors[f"{prefix}.{p}"])
                else:  # untouched part: no rank, and the magnitude that leaves DoRA's rows unchanged
                    w = _original_weight(model.get_submodule(f"{prefix}.{p}"))
                    triples.append((w.new_zeros(0, w.shape[1]), w.new_zeros(w.shape[0], 0),
                                    torch.linalg.norm(w, dim=1)))
            A, B = torch.cat([t[0] for t in triples]), torch.block_diag(*[t[1] for t in triples])
            magnitude = torch.cat([t[2] for t in triples]) if cfg.method == "dora" else None
            if model_type == "gpt_neox":
                n_head = model.cfg.n_head
                B = join_fused_qkv(model_type, list(B.chunk(3)), False, n_head)
                magnitude = None if magnitude is None else join_fused_qkv(model_type, list(magnitude.chunk(3)),
                                                                          False, n_head)
        else:
            (A, B, magnitude), = factors.values()
        key = f"base_model.model.{hf_name}"
        tensors |= {f"{key}.lora_A.weight": A, f"{key}.lora_B.weight": B}
        if magnitude is not None:
            tensors[f"{key}.lora_magnitude_vector"] = magnitude
        ranks[hf_name] = A.shape[0]
    r, _ = Counter(ranks.values()).most_common(1)[0]
    pattern = {re.escape(n): k for n, k in ranks.items() if k != r}
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": r, "lora_alpha": cfg.scaling * r, "lora_dropout": cfg.dropout, "target_modules": sorted(ranks),
        "rank_pattern": pattern, "alpha_pattern": {n: cfg.scaling * k for n, k in pattern.items()},
        "use_dora": cfg.method == "dora", "fan_in_fan_out": model_type == "gpt2", "bias": "none",
        "use_rslora": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    atomic_write(path / PEFT_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write_text(path / PEFT_CONFIG, json.dumps(peft_config, indent=2) + "\n")
    return path
