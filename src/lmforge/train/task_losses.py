"""Fine-tuning objectives for the task heads in `lmforge.model.heads`.

Each maps (model, batch) to the shared trainer's `LossResult`, summed over the labelled items. Batches hold
`input_ids`, `attention_mask`, optionally `token_type_ids`, and the targets of their task.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.train.loss import LossResult
from lmforge.train.objectives import token_cross_entropy


def _forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    return model(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossResult:
    """Cross-entropy of `SequenceClassifier` logits [B, L] against `labels` [B]."""
    return token_cross_entropy(_forward(model, batch), batch["labels"])


def token_classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossResult:
    """Per-token cross-entropy of `TokenClassifier` logits [B, T, L]; labels of -100 (padding, special tokens,
    non-first sub-tokens of a word) carry no loss."""
    return token_cross_entropy(_forward(model, batch), batch["labels"])


def span_qa_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossResult:
    """The mean of the start and end cross-entropies over positions (as HF `BertForQuestionAnswering`): summed
    over both, counted as half a loss each."""
    start_logits, end_logits = _forward(model, batch)
    start = token_cross_entropy(start_logits, batch["start_positions"])
    end = token_cross_entropy(end_logits, batch["end_positions"])
    return LossResult((start.total + end.total) / 2, (start.count + end.count) / 2)
