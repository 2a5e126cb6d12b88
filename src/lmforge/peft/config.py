"""One config for every parameter-efficient method, and the calls that apply and merge them.

`apply_peft(model, PeftConfig(method="adapter", bottleneck=16))` freezes the base model, adds or unfreezes
the method's parameters and returns how many train. `merge_peft` folds a mergeable method back into plain
weights; methods that add computation the base weights cannot express raise a ConfigError saying so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lmforge.config import LORA_METHODS, PeftConfig
from lmforge.errors import ConfigError
from lmforge.peft.adapters import apply_adapters
from lmforge.peft.select import apply_bitfit, apply_svd_diag, apply_topk, merge_svd_diag
from lmforge.peft.soft_prompts import apply_prefix, apply_prompt

NOT_MERGEABLE = {
    "adapter": "adapters add layers (with a nonlinearity) to every block; nothing to fold into the base weights",
    "parallel-adapter": "adapters add layers (with a nonlinearity) beside every sublayer; nothing to fold into "
                        "the base weights",
    "prefix": "prefix tuning adds learned key/value slots to every attention layer, which no base weight can "
              "express; nothing to fold",
    "prompt": "prompt tuning prepends learned input embeddings, which no base weight can express; nothing to fold",
}


@dataclass
class PeftSummary:
    trainable: int
    total: int
    percent: float
    method: str

    def __str__(self) -> str:
        return f"{self.method}: {self.trainable:,} of {self.total:,} parameters train ({self.percent:.3f}%)"


def save_adapter_files(model: nn.Module, cfg: PeftConfig, run_dir: str | Path) -> Path | None:
    """A LoRA-family run also gets its adapter alone (run_dir/adapter: adapter.safetensors + adapter_config.json),
    which `lmforge.peft.lora.load_adapter` puts on any copy of the base."""
    if cfg.method not in LORA_METHODS:
        return None
    from lmforge.peft.lora_files import RUN_ADAPTER_DIR, save_adapter

    return save_adapter(getattr(model, "backbone", model), Path(run_dir) / RUN_ADAPTER_DIR, cfg)


def apply_peft(model: nn.Module, cfg: PeftConfig, initialise: bool = True) -> PeftSummary:
    """Apply `cfg.method` to `model` in place: base weights frozen, the method's parameters trainable.
    `initialise=False` builds the modules for a checkpoint to fill, skipping the costly initialisations it would
    overwrite (the LoRA family's and SVD-diagonal's SVDs and inits; the other methods' inits are cheap)."""
    if cfg.method in LORA_METHODS:
        from lmforge.peft.lora import apply_lora, trainable_summary

        apply_lora(model, cfg, initialise=initialise)
        return PeftSummary(*trainable_summary(model), cfg.method)  # counts QLoRA's NF4 base weights too
    if cfg.method in ("adapter", "parallel-adapter"):
        apply_adapters(model, cfg)
    elif cfg.method == "prefix":
        apply_prefix(model, cfg)
    elif cfg.method == "prompt":
        apply_prompt(model, cfg)
    elif cfg.method == "bitfit":
        apply_bitfit(model)
    elif cfg.method == "topk":
        apply_topk(model, cfg.top_k)
    else:
        apply_svd_diag(model, cfg.targets, decompose=initialise)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors counted once
    return PeftSummary(trainable, total, 100.0 * trainable / total, cfg.method)


def apply_peft_to_task_model(model: nn.Module, cfg: PeftConfig, initialise: bool = True) -> PeftSummary:
    """PEFT on a task model's backbone (its freshly initialised head keeps training), or on the model itself."""
    backbone = getattr(model, "backbone", model)
    summary = apply_peft(backbone, cfg, initialise)
    if backbone is model:
        return summary
    for name, p in model.named_parameters():
        if not name.startswith("backbone."):
            p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = summary.total + sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone."))
    return PeftSummary(trainable, total, 100.0 * trainable / total, cfg.method)


def merge_peft(model: nn.Module, cfg: PeftConfig) -> nn.Module:
    """Fold the trained method into plain weights in place (LoRA family, svd-diag; bitfit and topk trained the
    base weights themselves). The result is an ordinary model: every parameter is trainable again."""
    if cfg.method in NOT_MERGEABLE:
        raise ConfigError(f"cannot merge method '{cfg.method}': {NOT_MERGEABLE[cfg.method]}; keep the adapted model "
                          "as it is, or train with lora or svd-diag to get plain weights")
    if cfg.method in LORA_METHODS:
        from lmforge.peft.lora import merge_lora

        merge_lora(model)
    elif cfg.method == "svd-diag":
        merge_svd_diag(model)
    return model.requires_grad_(True)
