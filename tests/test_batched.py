"""Batched generation of left-padded prompts of different lengths: parity with one-prompt generation."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lmforge.infer.batched import generate_batch
from lmforge.infer.generate import SamplingConfig, generate_ids
from near_ties import assert_clear_greedy
from tiny_decoders import FAMILIES, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
LENGTHS = (3, 7, 1, 12)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, 64, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_batch_matches_each_prompt_alone(family):
    model, batch = tiny_model(family), prompts()
    cfg = SamplingConfig(max_new_tokens=10, temperature=0)
    alone = [generate_ids(model, p, cfg) for p in batch]
    for prompt, new_ids in zip(batch, alone, strict=True):
        assert_clear_greedy(model, prompt, new_ids)
    assert generate_batch(model, batch, cfg) == alone


@pytest.mark.parametrize("family", FAMILIES)
def test_eos_stops_only_its_row(family):
    model, batch = tiny_model(family), prompts()
    cfg = SamplingConfig(max_new_tokens=10, temperature=0)
    alone = [generate_ids(model, p, cfg) for p in batch]
    for prompt, new_ids in zip(batch, alone, strict=True):
        assert_clear_greedy(model, prompt, new_ids)
    eos = next(t for t in alone[1] if t not in alone[0])  # ends row 1 early, never row 0
    out = generate_batch(model, batch, cfg, eos_id=eos)
    assert out == [generate_ids(model, p, cfg, eos_id=eos) for p in batch]
    assert len(out[1]) < cfg.max_new_tokens and eos not in out[1]
    assert out[0] == alone[0] and len(out[0]) == cfg.max_new_tokens


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa"])
def test_seeded_sampling_is_reproducible(family):
    model, batch = tiny_model(family), prompts()
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=20, seed=3)
    first = generate_batch(model, batch, cfg)
    assert first == generate_batch(model, batch, cfg)
    assert [len(r) for r in first] == [8] * 4
    assert first == [generate_ids(model, p, replace(cfg, seed=3 + i)) for i, p in enumerate(batch)]  # row i: seed + i
    assert first != generate_batch(model, batch, SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=20, seed=4))


@pytest.mark.parametrize("family", FAMILIES)
def test_all_ones_mask_gives_unmasked_logits(family):
    model = tiny_model(family, init_std=0.02)  # logits of order 1, so 1e-6 is above float32 rounding
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    ones = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=ones), model(ids), atol=1e-6, rtol=0)
        plain, masked = model.new_cache(2), model.new_cache(2)
        torch.testing.assert_close(model(ids[:, :6], cache=masked, attention_mask=ones[:, :6]),
                                   model(ids[:, :6], cache=plain), atol=1e-6, rtol=0)
        torch.testing.assert_close(model(ids[:, 6:], cache=masked, attention_mask=ones),
                                   model(ids[:, 6:], cache=plain), atol=1e-6, rtol=0)


def test_mask_of_wrong_width_is_rejected():
    model = tiny_model("gpt2")
    ids = torch.zeros((2, 4), dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones((2, 5), dtype=torch.long))


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_anywhere_is_invisible(family):
    """Pad slots in the middle (not only on the left) change neither positions nor ALiBi distances."""
    model = tiny_model(family, init_std=0.02)
    ids = torch.randint(1, 64, (1, 8), generator=torch.Generator().manual_seed(5))
    padded = torch.cat([ids[:, :3], torch.zeros((1, 2), dtype=torch.long), ids[:, 3:]], dim=1)
    mask = torch.ones_like(padded)
    mask[:, 3:5] = 0
    with torch.no_grad():
        real = model(padded, attention_mask=mask)[:, mask[0].bool()]
        torch.testing.assert_close(real, model(ids), atol=1e-5, rtol=0)
