"""Tiny random-init models with a word tokenizer, saved as checkpoint dirs, for the `lmforge eval` tests."""

from __future__ import annotations

from pathlib import Path

import torch

import lmforge
from lmforge.config import EncDecConfig, ModelConfig
from lmforge.model.decoder import DecoderLM
from lmforge.model.encdec import EncDecLM
from lmforge.tokenizer import Tokenizer, train_tokenizer
from tiny_pretraining import word_documents

CONTEXT = 32


def word_tokenizer() -> Tokenizer:
    return train_tokenizer(word_documents(200), vocab_size=400, show_progress=False)


def decoder_dir(root: Path, tokenizer: Tokenizer, family: str = "gpt2") -> Path:
    """A 2-layer decoder of CONTEXT positions; init_std 0.2 spreads its logits (no near-ties between choices)."""
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(family=family, vocab_size=400, max_seq_len=CONTEXT, n_layer=2, n_head=2,
                                  d_model=32, init_std=0.2)).eval()
    return lmforge.save(model, tokenizer, root / f"decoder-{family}")


def encdec_dir(root: Path, tokenizer: Tokenizer) -> Path:
    torch.manual_seed(0)
    model = EncDecLM(EncDecConfig(vocab_size=400, max_seq_len=CONTEXT, n_layer=1, n_head=2, head_dim=8, d_model=16,
                                  d_ff=32, decoder_start_id=tokenizer.pad_id)).eval()
    return lmforge.save(model, tokenizer, root / "encdec")
