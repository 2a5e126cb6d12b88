"""Weights and models the quantisation tests share."""

from __future__ import annotations

import torch

from lmforge.config import ModelConfig
from lmforge.model.decoder import DecoderLM


def weight_with_edge_rows(rows: int = 16, cols: int = 128, seed: int = 0) -> torch.Tensor:
    """A small random weight whose row 0 is all positive and row 1 all zero: the min-max edge cases."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0] = w[0].abs() + 0.01  # an all-positive row: the range is widened to include 0
    w[1] = 0.0  # an all-zero row
    return w


def tiny_decoder(d_model: int = 64, n_layer: int = 2, vocab: int = 64, family: str = "llama") -> DecoderLM:
    """A random-init decoder (seed 0) in eval mode."""
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, vocab_size=vocab, d_model=d_model, n_head=4, n_layer=n_layer, max_seq_len=64)
    return DecoderLM(cfg).eval()
