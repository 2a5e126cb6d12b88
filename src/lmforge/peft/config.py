"""One config for every parameter-efficient method, and the calls that apply and merge them.

`apply_peft(model, PeftConfig(method="adapter", bottleneck=16))` freezes the base model, adds or unfreezes
the method's parameters and returns how many train. `merge_peft` folds a mergeable method back into plain
weights; methods that add computation the base weights cannot express raise a ConfigError saying so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field
from torch import nn

from lmforge.config import StrictModel
from lmforge.errors import ConfigError
from lmforge.peft.adapters import apply_adapters
from lmforge.peft.select import apply_bitfit, apply_svd_diag, apply_topk, merge_svd_diag
from lmforge.peft.soft_prompts import apply_prefix, apply_prompt

LORA_METHODS = ("lora", "dora", "pissa", "qlora")

NOT_MERGEABLE = {
    "adapter": "adapters add layers (with a nonlinearity) to every block; nothing to fold into the base weights",
    "parallel-adapter": "adapters add layers (with a nonlinearity) beside every sublayer; nothing to fold into "
                        "the base weights",
    "prefix": "prefix tuning adds learned key/value slots to every attention layer, which no base weight can "
              "express; nothing to fold",
    "prompt": "prompt tuning prepends learned input embeddings, which no base weight can express; nothing to fold",
}


class PeftConfig(StrictModel):
    """The method and its hyperparameters; each method reads only its own fields."""

    method: Literal["lora", "dora", "pissa", "qlora", "adapter", "parallel-adapter", "prefix", "prompt", "bitfit",
                    "topk", "svd-diag"] = "lora"
    # LoRA family and svd-diag: the Linear layers to adapt, by name pattern ("attn.q": every block's query
    # projection; "mlp": every Linear inside an mlp; fnmatch wildcards such as "blocks.0.*")
    targets: list[str] = Field(default_factory=lambda: ["attn.q", "attn.k", "attn.v", "attn.o"], min_length=1)
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    qlora_group_size: int = Field(64, ge=2, multiple_of=2)
    qlora_double_quant: bool = False
    # adapters (Houlsby et al. 2019; parallel: He et al. 2022, whose scale s = 4)
    bottleneck: int = Field(16, ge=1)
    adapter_activation: Literal["relu", "gelu", "gelu_tanh", "silu"] = "relu"
    adapter_scale: float = 4.0
    # prefix tuning (Li & Liang 2021) and prompt tuning (Lester et al. 2021)
    prefix_len: int = Field(10, ge=1)
    reparam: bool = True  # train the prefixes through an MLP (fold it away after training)
    reparam_hidden: int = Field(512, ge=1)
    prompt_len: int = Field(20, ge=1)
    # top-k layers
    top_k: int = Field(1, ge=1)


@dataclass
class PeftSummary:
    trainable: int
    total: int
    percent: float
    method: str

    def __str__(self) -> str:
        return f"{self.method}: {self.trainable:,} of {self.total:,} parameters train ({self.percent:.3f}%)"


def apply_peft(model: nn.Module, cfg: PeftConfig) -> PeftSummary:
    """Apply `cfg.method` to `model` in place: base weights frozen, the method's parameters trainable."""
    if cfg.method in LORA_METHODS:
        from lmforge.peft.lora import LoRAConfig, apply_lora, trainable_summary

        apply_lora(model, LoRAConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets,
                                     method=cfg.method, qlora_group_size=cfg.qlora_group_size,
                                     qlora_double_quant=cfg.qlora_double_quant))
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
        apply_svd_diag(model, cfg.targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors counted once
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
