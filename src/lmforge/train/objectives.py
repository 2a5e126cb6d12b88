"""Pretraining objectives: each maps (model, batch) to the shared trainer's `LossResult` (summed over tokens).

The model may arrive wrapped (DistributedDataParallel, torch.compile): losses call it, never
its submodules, so gradient synchronisation and compilation see every forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.decoder import DecoderLM
from lmforge.model.linear_cross_entropy import IGNORE_INDEX
from lmforge.train.loss import LossResult


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> LossResult:
    """Cross-entropy of logits [..., V] summed over the labels [...] that are not IGNORE_INDEX, and their number
    (in fp32)."""
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return LossResult(total, (labels != IGNORE_INDEX).sum())


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossResult:
    """Next-token prediction (GPT); `labels` are already shifted, IGNORE_INDEX positions carry no loss. A
    `DecoderLM` sums the loss itself, chunk by chunk, without holding the whole batch's logits."""
    labels = batch["labels"]
    if isinstance(unwrap(model), DecoderLM):
        return LossResult(model(batch["input_ids"], labels=labels), (labels != IGNORE_INDEX).sum())
    return token_cross_entropy(model(batch["input_ids"]), labels)


def masked_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossResult:
    """Masked-token prediction (BERT): loss only on the selected positions (others are IGNORE_INDEX)."""
    logits = model(batch["input_ids"], batch.get("token_type_ids"), batch.get("attention_mask"))
    return token_cross_entropy(logits, batch["labels"])


def seq2seq_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossResult:
    """Encoder-decoder cross-entropy on `labels` (T5 span corruption: sentinels and the spans they replaced;
    text-to-text: the target), the decoder teacher-forced on the labels shifted right."""
    decoder_input_ids = unwrap(model).shift_right(batch["labels"])
    logits = model(batch["input_ids"], decoder_input_ids, batch["attention_mask"])
    return token_cross_entropy(logits, batch["labels"])
