"""The decode fast paths: 4-D attention bias (SDPA's fused kernel), last-position logits at prefill."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.model.decoder import DecoderLM
from lmforge.model.layers import alibi_slopes, attention_bias

pytestmark = pytest.mark.usefixtures("one_thread")


def model(family: str = "gpt2", **kw) -> DecoderLM:
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, vocab_size=64, max_seq_len=64, n_layer=2, n_head=4, d_model=32, **kw)
    return DecoderLM(cfg)


def test_training_gradients_reach_every_projection() -> None:
    m = model().train()
    m(torch.randint(0, 64, (2, 8))).sum().backward()
    for name in ("q", "k", "v"):
        grad = getattr(m.blocks[0].attn, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("family, kw", [("gpt2", {}), ("gpt2", {"position": "alibi"}), ("llama", {"n_kv_head": 2})])
def test_multi_token_step_over_a_cache_uses_a_4d_bias_and_matches_the_full_forward(family: str, kw: dict) -> None:
    """A verify-style step (5 new tokens over a cache, as speculative decoding runs) gets a 4-D causal bias, which
    SDPA on CPU serves with its fused kernel (a 3-D one sends it to the slow math path), and computes what the
    full forward computes at those positions."""
    bias = attention_bias(5, 25, 20, None, torch.device("cpu"))
    alibi = attention_bias(5, 25, 20, alibi_slopes(4), torch.device("cpu"))
    assert bias.shape == (1, 1, 5, 25) and alibi.shape == (1, 4, 5, 25)
    assert torch.isinf(bias[0, 0, 0, 21:]).all() and torch.isfinite(bias[0, 0, 0, :21]).all()  # query 0 is at 20
    m = model(family, **kw).eval()
    ids = torch.randint(0, 64, (1, 25))
    cache = m.new_cache(1, 32)
    with torch.no_grad():
        m(ids[:, :20], cache=cache)
        step = m(ids[:, 20:], cache=cache)
        torch.testing.assert_close(step, m(ids)[:, 20:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keep", [1, 3])
def test_keep_last_returns_the_last_positions(keep: int) -> None:
    m = model().eval()
    x = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(m(x, keep_last=keep), m(x)[:, -keep:])
