"""Tiny decoders for generation tests: random-init ones of each position/attention family, and forced ones."""

from __future__ import annotations

from collections.abc import Sequence

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


def forced_model(vocab_size: int, prompt_len: int, new_ids: Sequence[int], max_seq_len: int = 64) -> DecoderLM:
    """A model whose greedy output after a `prompt_len`-token prompt is `new_ids`, whatever the tokens.

    Blocks are zeroed (identity), token embeddings are zero and position t embeds as the one-hot e_t,
    so the final LayerNorm sees only the position; lm_head row `tok` points at every position whose
    next token should be `tok`."""
    cfg = ModelConfig(vocab_size=vocab_size, max_seq_len=max_seq_len, n_layer=1, n_head=4, d_model=max_seq_len,
                      family="gpt2", tie_embeddings=False)
    model = DecoderLM(cfg).eval()
    with torch.no_grad():
        model.tok_emb.weight.zero_()
        model.pos_emb.weight.copy_(torch.eye(max_seq_len))
        for block in model.blocks:
            for linear in (block.attn.o, block.mlp.down):
                linear.weight.zero_()
                linear.bias.zero_()
        model.lm_head.weight.zero_()
        for i, tid in enumerate(new_ids):
            model.lm_head.weight[tid, prompt_len - 1 + i] = 10.0
    return model
