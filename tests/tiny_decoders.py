"""Random-init tiny decoders of each position/attention family, for generation tests."""

from __future__ import annotations

import torch

from lmforge.config import ModelConfig
from lmforge.model.decoder import DecoderLM

TINY = dict(vocab_size=64, max_seq_len=64, n_layer=2, n_head=4, d_model=32)
FAMILIES = {
    "gpt2": dict(family="gpt2"),
    "llama-gqa": dict(family="llama", n_kv_head=2),
    "alibi": dict(family="gpt2", position="alibi"),
    "sinusoidal": dict(family="gpt2", position="sinusoidal"),
}


def tiny_model(family: str = "gpt2", seed: int = 0, init_std: float = 0.2, **overrides) -> DecoderLM:
    """A random-init model in eval mode; a larger init_std spreads the logits so greedy argmaxes are not near-ties."""
    torch.manual_seed(seed)
    return DecoderLM(ModelConfig(**{**TINY, **FAMILIES[family], "init_std": init_std, **overrides})).eval()
