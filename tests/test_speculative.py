"""Speculative decoding: greedy output equals the target's, sampled tokens follow the target's distribution."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.infer.speculative import speculative_generate
from lmforge.model.decoder import DecoderLM
from near_ties import assert_clear_greedy

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(vocab: int, seed: int, n_layer: int = 2, d_model: int = 32, init_std: float = 0.3) -> DecoderLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, max_seq_len=64, n_layer=n_layer, n_head=2, d_model=d_model,
                      init_std=init_std)
    return DecoderLM(cfg).eval()


def _perturbed(model: DecoderLM, scale: float, seed: int) -> DecoderLM:
    copy = DecoderLM(model.cfg).eval()
    copy.load_state_dict(model.state_dict())
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(torch.randn_like(p) * scale)
    return copy


def _pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square p-value of observed counts against a distribution."""
    probs = probs.double() / probs.double().sum()
    return float(chisquare(counts.double().numpy(), (probs * counts.sum()).numpy()).pvalue)


@pytest.mark.parametrize("min_confidence", [0.0, 0.5, 0.99])
def test_greedy_equals_target_greedy(min_confidence: float) -> None:
    target = _model(64, seed=0)
    draft = _perturbed(target, 0.1, seed=1)
    cfg = SamplingConfig(max_new_tokens=24, temperature=0)
    proposed = accepted = 0
    for prompt in ([1], [5, 9, 2, 40], [63, 0, 17]):
        plain = generate_ids(target, prompt, cfg)
        assert_clear_greedy(target, prompt, plain)
        for num_draft in (1, 3, 5):
            ids, stats = speculative_generate(target, draft, prompt, cfg, num_draft=num_draft,
                                              min_confidence=min_confidence)
            assert ids == plain
            assert stats.plain_forwards == len(plain)
            proposed, accepted = proposed + stats.proposed, accepted + stats.accepted
        eos = plain[10]  # stops where the target's greedy output does
        ids, _ = speculative_generate(target, draft, prompt, cfg, num_draft=4, eos_id=eos)
        assert ids == generate_ids(target, prompt, cfg, eos_id=eos)
    assert 0 < accepted < proposed  # the draft is right sometimes, not always


def test_min_confidence_drafts_fewer_tokens_for_the_same_output() -> None:
    target = _model(64, seed=0)
    draft = _perturbed(target, 0.1, seed=1)
    cfg = SamplingConfig(max_new_tokens=24, temperature=0)
    full, every = speculative_generate(target, draft, [5, 9], cfg, num_draft=5, min_confidence=0.0)
    cut, confident = speculative_generate(target, draft, [5, 9], cfg, num_draft=5, min_confidence=0.99)
    assert_clear_greedy(target, [5, 9], full)  # each output is the target's greedy one, in other chunks
    assert cut == full
    assert confident.proposed < every.proposed and confident.acceptance_rate >= every.acceptance_rate
    with pytest.raises(LmforgeError, match="min_confidence"):
        speculative_generate(target, draft, [1], cfg, min_confidence=1.0)


def test_stats_with_draft_equal_to_target() -> None:
    target = _model(64, seed=0)
    cfg = SamplingConfig(max_new_tokens=20, temperature=0.8, seed=3)
    ids, stats = speculative_generate(target, target, [2, 3], cfg, num_draft=4)
    assert len(ids) == 20
    assert stats.accepted == stats.proposed > 0 and stats.acceptance_rate == 1.0
    assert stats.target_forwards == 4 and stats.plain_forwards == 20 and stats.forwards_saved == 16
    # a different draft: never more accepted than proposed
    _, stats = speculative_generate(target, _model(64, seed=5), [2, 3], cfg, num_draft=4)
    assert 0 <= stats.accepted <= stats.proposed and stats.target_forwards <= stats.plain_forwards


@pytest.mark.slow
def test_sampling_matches_target_distribution() -> None:
    """Chi-square: the first token and (first, second) pairs of seeded runs follow the target's softmax."""
    vocab, runs, prompt = 6, 3000, [1, 4]
    target = _model(vocab, seed=0, n_layer=1, d_model=16, init_std=0.1)
    draft = _perturbed(target, 0.1, seed=7)
    with torch.no_grad():
        p1 = target(torch.tensor([prompt]))[0, -1].softmax(-1)
        seqs = torch.tensor([prompt + [a] for a in range(vocab)])
        p2 = target(seqs)[:, -1].softmax(-1)  # p(second | first = a)
    joint = (p1[:, None] * p2).flatten()
    first, pairs = torch.zeros(vocab), torch.zeros(vocab * vocab)
    accepted = proposed = 0
    for seed in range(runs):
        cfg = SamplingConfig(max_new_tokens=3, temperature=1.0, seed=seed)
        ids, stats = speculative_generate(target, draft, prompt, cfg, num_draft=2)
        first[ids[0]] += 1
        pairs[ids[0] * vocab + ids[1]] += 1
        accepted, proposed = accepted + stats.accepted, proposed + stats.proposed
    assert 0.2 < accepted / proposed < 0.95  # both the acceptance and the residual paths are exercised
    assert float((joint * runs).min()) >= 5  # the chi-square approximation holds
    assert _pvalue(first, p1) > 1e-3
    assert _pvalue(pairs, joint) > 1e-3
    # the draft alone would be detected: its first-token distribution differs
    with torch.no_grad():
        q1 = draft(torch.tensor([prompt]))[0, -1].softmax(-1)
    assert _pvalue(first, q1) < 1e-3


def test_vocab_mismatch_and_bad_num_draft() -> None:
    target = _model(64, seed=0)
    cfg = SamplingConfig(max_new_tokens=4)
    with pytest.raises(LmforgeError, match="vocab_size"):
        speculative_generate(target, _model(32, seed=1), [1], cfg)
    with pytest.raises(LmforgeError, match="num_draft"):
        speculative_generate(target, target, [1], cfg, num_draft=0)
