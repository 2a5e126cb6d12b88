"""What the post-training stages (SFT, reward, DPO, RL, distillation, task fine-tuning) do before training:
load the starting checkpoint with its tokenizer and check that the sequences they will feed fit its context."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

import lmforge
from lmforge.errors import ConfigError
from lmforge.model.decoder import DecoderLM
from lmforge.tokenizer import Tokenizer


def load_with_tokenizer(path: str, stage: str) -> tuple[nn.Module, Tokenizer]:
    """A checkpoint (lmforge or Hugging Face dir) and its tokenizer, which `stage` reads text with."""
    model, tokenizer = lmforge.load(path)
    if tokenizer is None:
        raise ConfigError(f"{path} has no tokenizer.json; {stage} needs one")
    return model, tokenizer


def load_decoder(path: str, stage: str) -> tuple[DecoderLM, Tokenizer]:
    """A decoder language model and its tokenizer, checked for what `stage` needs."""
    model, tokenizer = load_with_tokenizer(path, stage)
    if not isinstance(model, DecoderLM):
        raise ConfigError(f"{stage} needs a decoder language model; {path} holds a {type(model).__name__}")
    return model, tokenizer


def require_fits(model: DecoderLM, path: str, max_len: int, tokens: int) -> None:
    """ConfigError unless sequences of `tokens` tokens (what max_len allows the stage to feed) fit the model."""
    limit = model.cfg.max_seq_len
    if tokens > limit:
        raise ConfigError(f"max_len={max_len} lets this stage feed {tokens} tokens, more than {path}'s "
                          f"max_seq_len={limit}; set --max-len {max_len - tokens + limit} or less")


def pad_id_of(tokenizer: Tokenizer) -> int:
    """The id batches are right-padded with (0 for a tokenizer without a pad token: padded positions are masked)."""
    return tokenizer.pad_id if tokenizer.pad_id is not None else 0


def first_batches(batches: Sequence, n: int) -> Callable[[], Sequence]:
    """The trainer's validation callable: the first n batches."""
    return lambda: batches[:n]
