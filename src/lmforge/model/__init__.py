"""The three Transformer families, built from their configs.

`build_model(cfg)` picks the class by `cfg.arch`: decoder (GPT-2 / Llama, `decoder.py`),
encoder (BERT, `encoder.py`), encoder-decoder (T5, `encdec.py`).
"""

from __future__ import annotations

from torch import nn

from lmforge.config import AnyModelConfig


def build_model(cfg: AnyModelConfig) -> nn.Module:
    if cfg.arch == "encoder":
        from lmforge.model.encoder import EncoderModel

        return EncoderModel(cfg)
    if cfg.arch == "encdec":
        from lmforge.model.encdec import EncDecLM

        return EncDecLM(cfg)
    from lmforge.model.decoder import DecoderLM

    return DecoderLM(cfg)


HEAD_TASKS = ("classify", "tokens", "span", "reward")


def build_task_model(task: str, backbone: nn.Module, num_labels: int | None = None, dropout: float = 0.1) -> nn.Module:
    """The backbone with the head a fine-tuning task needs (text2text uses the language model itself)."""
    from lmforge.model.heads import SequenceClassifier, SpanQAHead, TokenClassifier

    if task == "classify":
        return SequenceClassifier(backbone, num_labels, dropout)
    if task == "tokens":
        return TokenClassifier(backbone, num_labels, dropout)
    if task == "span":
        return SpanQAHead(backbone)
    if task == "reward":
        from lmforge.model.value_heads import build_reward_model

        return build_reward_model(backbone)
    return backbone
