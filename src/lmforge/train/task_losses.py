"""Fine-tuning objectives for the task heads in `lmforge.model.heads`.

Each maps (model, batch) to a scalar loss, the signature the shared trainer calls. Batches hold
`input_ids`, `attention_mask`, optionally `token_type_ids`, and the targets of their task.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.train.objectives import IGNORE_INDEX


def _forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    return model(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of `SequenceClassifier` logits [B, L] against `labels` [B]."""
    return F.cross_entropy(_forward(model, batch).float(), batch["labels"], ignore_index=IGNORE_INDEX)


def token_classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean per-token cross-entropy of `TokenClassifier` logits [B, T, L]; labels of -100 (padding,
    special tokens, non-first sub-tokens of a word) carry no loss."""
    logits = _forward(model, batch)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)


def span_qa_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean of the start and end cross-entropies over positions (as HF `BertForQuestionAnswering`)."""
    start_logits, end_logits = _forward(model, batch)
    start = F.cross_entropy(start_logits.float(), batch["start_positions"], ignore_index=IGNORE_INDEX)
    end = F.cross_entropy(end_logits.float(), batch["end_positions"], ignore_index=IGNORE_INDEX)
    return (start + end) / 2
