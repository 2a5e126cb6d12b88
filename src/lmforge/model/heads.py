"""Task heads on any backbone: a decoder (`DecoderLM`) or an encoder (`EncoderModel`).

The backbone is kept as `self.backbone`, so a checkpoint holds `backbone.*` plus the head's own keys,
named as in Hugging Face's BERT heads (`classifier.*`, `qa_outputs.*`). Encoders see the whole
sequence and classify from the pooled [CLS] state (Devlin et al. 2019, sec. 4); decoders are causal, so
they classify from the last real token, which has read the whole text (Radford et al. 2018, sec. 3.3),
through a bias-free `classifier` as transformers' `GPT2ForSequenceClassification` and
`LlamaForSequenceClassification` (their `score`), so that an export computes the same logits. Losses are in
`lmforge.train.task_losses`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def backbone_hidden(backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                    token_type_ids: Tensor | None = None) -> Tensor:
    """Final hidden states [B, T, d]; encoders also get segments and the padding mask, decoders need neither
    (with right padding, causal attention never lets a real token see a pad)."""
    if backbone.cfg.arch == "encoder":
        return backbone.hidden(input_ids, token_type_ids, attention_mask)
    return backbone.hidden(input_ids)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index [B] of each row's last non-pad position (0 for a row with none)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(1)


def _linear(d_in: int, d_out: int, std: float, bias: bool = True) -> nn.Linear:
    """A head layer initialised as BERT's heads: N(0, std) weights, zero bias."""
    layer = nn.Linear(d_in, d_out, bias=bias)
    nn.init.normal_(layer.weight, 0.0, std)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class _Classifier(nn.Module):
    """Backbone + dropout + a `classifier` Linear: what the sequence and token classifiers share."""

    def __init__(self, backbone: nn.Module, num_labels: int, dropout: float = 0.1, bias: bool = True):
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.backbone = backbone
        self.num_labels = num_labels
        self.dropout = nn.Dropout(dropout)
        self.classifier = _linear(backbone.cfg.d_model, num_labels, backbone.cfg.init_std, bias)


class SequenceClassifier(_Classifier):
    """Sequence classification: logits [B, num_labels] (as HF `BertForSequenceClassification`; on a decoder as
    `GPT2ForSequenceClassification`/`LlamaForSequenceClassification`, whose head has no bias)."""

    def __init__(self, backbone: nn.Module, num_labels: int, dropout: float = 0.1):
        super().__init__(backbone, num_labels, dropout, bias=backbone.cfg.arch != "decoder")

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        hidden = backbone_hidden(self.backbone, input_ids, attention_mask, token_type_ids)
        if self.backbone.cfg.arch == "encoder":
            summary = self.backbone.pooled(hidden)
        else:
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            summary = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(mask)]
        return self.classifier(self.dropout(summary))


class TokenClassifier(_Classifier):
    """Per-token classification (NER-style tagging): logits [B, T, num_labels]."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        hidden = backbone_hidden(self.backbone, input_ids, attention_mask, token_type_ids)
        return self.classifier(self.dropout(hidden))


class SpanQAHead(nn.Module):
    """Extractive QA (SQuAD, Devlin et al. 2019 sec. 4.2): start and end logits [B, T] from `qa_outputs`."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.qa_outputs = _linear(backbone.cfg.d_model, 2, backbone.cfg.init_std)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        hidden = backbone_hidden(self.backbone, input_ids, attention_mask, token_type_ids)
        start, end = self.qa_outputs(hidden).unbind(-1)
        return start, end


def best_span(start_logits: Tensor, end_logits: Tensor, max_answer_len: int = 30,
              allowed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The (start, end) maximising start_logit + end_logit with start <= end < start + max_answer_len.

    Takes [T] or [B, T] logits and returns indices of shape [] or [B]; `allowed` (bool, same shape) limits
    both ends to some positions, e.g. the context tokens. A row with no allowed span gets (0, 0)."""
    if max_answer_len < 1:
        raise ValueError(f"max_answer_len must be >= 1, got {max_answer_len}")
    single = start_logits.dim() == 1
    if single:
        start_logits, end_logits = start_logits[None], end_logits[None]
        allowed = None if allowed is None else allowed[None]
    T = start_logits.shape[1]
    scores = start_logits.float()[:, :, None] + end_logits.float()[:, None, :]  # [B, start, end]
    offset = torch.arange(T, device=scores.device)
    length = offset[None, :] - offset[:, None]
    valid = ((length >= 0) & (length < max_answer_len))[None]
    if allowed is not None:
        valid = valid & allowed[:, :, None] & allowed[:, None, :]
    flat = scores.masked_fill(~valid, float("-inf")).flatten(1).argmax(1)
    start, end = flat // T, flat % T
    return (start[0], end[0]) if single else (start, end)
