"""The T5 encoder-decoder: relative buckets, incremental decoding, shapes, errors, and generation.

Parity with transformers lives in test_hf_t5.py; here the model is checked against itself. Cached
decoding must match teacher forcing to 1e-5 (fp32) at every position.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.config import EncDecConfig
from lmforge.data.span_corruption import build_span_corruption_batch
from lmforge.errors import LmforgeError
from lmforge.infer.generate import SamplingConfig
from lmforge.infer.generate_encdec import generate_encdec, generate_text2text
from lmforge.model import build_model
from lmforge.model.attention import padding_bias
from lmforge.model.encdec import EncDecLM, relative_position_bucket
from lmforge.tokenizer import SENTINELS, Tokenizer, train_tokenizer
from near_ties import assert_clear_greedy_encdec

VOCAB = 120


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw) -> EncDecConfig:
    base = dict(vocab_size=VOCAB, max_seq_len=40, n_layer=2, n_head=4, head_dim=8, d_model=32, d_ff=64,
                relative_buckets=8, relative_max_distance=16)
    return EncDecConfig(**{**base, **kw})


def _model(seed: int = 0, **kw) -> EncDecLM:
    torch.manual_seed(seed)
    return EncDecLM(_cfg(**kw)).eval()


def _inputs(B: int = 2, S: int = 24, T: int = 18) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, S - 7:] = 0  # second row right-padded
    return ids, mask, torch.randint(3, VOCAB, (B, T), generator=g)


# ---- relative position buckets ----------------------------------------------------------------


def test_buckets_bidirectional_by_hand():
    """32 buckets, max distance 128: 0..7 exact, 8..15 log-spaced for keys before; +16 for keys after."""
    rel = torch.tensor([0, -1, -7, -8, -12, -16, -127, -128, -1000, 1, 7, 8, 1000])
    got = relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128).tolist()
    # distance 8 -> 8 + floor(log(1)/log(16) * 8) = 8; 12 -> 8 + floor(log(1.5)/log(16)*8) = 9; 16 -> 10
    assert got == [0, 1, 7, 8, 9, 10, 15, 15, 15, 17, 23, 24, 31]


def test_buckets_unidirectional_ignore_the_future():
    """All 32 buckets for the past: 0..15 exact, then 16 + floor(log(d/16)/log(8) * 16) up to 31."""
    rel = torch.tensor([5, 1, 0, -1, -15, -16, -31, -64, -100, -500])
    got = relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128).tolist()
    assert got == [0, 0, 0, 1, 15, 16, 21, 26, 30, 31]
    assert got == sorted(got)  # further into the past never maps to a smaller bucket


# ---- the model -----------------------------------------------------------------------------------


def test_registry_builds_encdec_with_named_modules():
    tied = build_model(_cfg())
    untied = build_model(_cfg(tie_embeddings=False, gated=True, activation="gelu_tanh", n_decoder_layer=3))
    assert isinstance(tied, EncDecLM) and not hasattr(tied, "lm_head")
    names = set(dict(untied.named_parameters()))
    for name in ("tok_emb.weight", "lm_head.weight", "encoder.rel_bias.weight", "decoder.rel_bias.weight",
                 "encoder.final_norm.weight", "decoder.final_norm.weight", "encoder.blocks.1.attn.q.weight",
                 "encoder.blocks.1.mlp.gate.weight", "decoder.blocks.2.cross_attn.k.weight",
                 "decoder.blocks.2.cross_norm.weight", "decoder.blocks.2.mlp_norm.weight"):
        assert name in names, name
    assert not any(n.endswith(".bias") for n in names)  # T5 has no biases
    assert len(untied.decoder.blocks) == 3 and len(untied.encoder.blocks) == 2
    assert untied.num_params() == sum(p.numel() for p in untied.parameters())


def test_init_follows_t5_scales():
    """Sample stds within 10% of T5's per-tensor scales (init_std=1)."""
    cfg = _cfg(d_model=64, head_dim=16, d_ff=256, gated=True, tie_embeddings=False)
    torch.manual_seed(0)
    model = EncDecLM(cfg)
    block = model.decoder.blocks[0]
    expected = {block.attn.q.weight: (64 * 16) ** -0.5, block.cross_attn.k.weight: 64 ** -0.5,
                block.attn.o.weight: (4 * 16) ** -0.5, block.mlp.gate.weight: 64 ** -0.5,
                block.mlp.down.weight: 256 ** -0.5, model.tok_emb.weight: 1.0, model.lm_head.weight: 64 ** -0.5}
    for p, std in expected.items():
        assert abs(p.std().item() / std - 1) < 0.1
    assert torch.equal(block.cross_norm.weight, torch.ones(64))


def test_tied_head_rescales_by_d_model():
    model = _model()
    ids, mask, dec = _inputs()
    with torch.no_grad():
        h = model.decoder(model.tok_emb(dec), model.cross_kv(model.encode(ids, mask)), padding_bias(mask), None)
        expected = h * 32 ** -0.5 @ model.tok_emb.weight.T
        assert torch.allclose(model(ids, dec, mask), expected, atol=1e-5)


def test_padding_does_not_leak():
    """Changing the padded tokens of the input changes no logits (<= 1e-6)."""
    model = _model()
    ids, mask, dec = _inputs()
    other = ids.clone()
    other[1, mask[1] == 0] = 7
    with torch.no_grad():
        diff = (model(ids, dec, mask) - model(other, dec, mask)).abs().max().item()
    assert diff <= 1e-6


@pytest.mark.parametrize("kw", [{}, dict(tie_embeddings=False, gated=True, activation="gelu_tanh", n_decoder_layer=3)])
def test_cached_decoding_matches_teacher_forcing(kw):
    """Prefill 5 positions, then one at a time with cache + precomputed cross k/v: <= 1e-5 at every position."""
    model = _model(**kw)
    ids, mask, dec = _inputs()
    with torch.no_grad():
        full = model(ids, dec, mask)
        enc = model.encode(ids, mask)
        kv = model.cross_kv(enc)
        cache = model.new_cache(2, dec.shape[1])
        steps = [model.decode(dec[:, :5], enc, mask, cache=cache, cross_kv=kv)]
        for t in range(5, dec.shape[1]):
            steps.append(model.decode(dec[:, t:t + 1], enc, mask, cache=cache, cross_kv=kv))
    assert cache.length == dec.shape[1]
    diff = (torch.cat(steps, dim=1) - full).abs().max().item()
    assert diff <= 1e-5, f"max abs diff {diff:.2e}"


def test_shift_right_prepends_start_and_replaces_ignored():
    model = _model(decoder_start_id=2)
    labels = torch.tensor([[10, 11, 12, -100, -100], [20, 21, 22, 23, 24]])
    assert model.shift_right(labels).tolist() == [[2, 10, 11, 12, 2], [2, 20, 21, 22, 23]]


def test_too_long_inputs_raise():
    model = _model(max_seq_len=16)
    with pytest.raises(ValueError, match=r"input of 17 tokens exceeds max_seq_len=16; truncate it explicitly"):
        model.encode(torch.zeros(1, 17, dtype=torch.long))
    enc = model.encode(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"decoder input of 17 tokens exceeds max_seq_len=16"):
        model.decode(torch.zeros(1, 17, dtype=torch.long), enc)


def test_span_corruption_training_step_learns():
    """Overfitting one span-corruption batch for 40 AdamW steps cuts the loss by more than half."""
    model = _model(dropout=0.1).train()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(10, VOCAB - 10, size=30).tolist() for _ in range(4)]
    batch = build_span_corruption_batch(seqs, sentinel_ids=range(VOCAB - 10, VOCAB), eos_id=1, pad_id=2,
                                        generator=rng)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        logits = model(batch["input_ids"], model.shift_right(batch["labels"]), batch["attention_mask"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ---- generation ----------------------------------------------------------------------------------


def _greedy_by_teacher_forcing(model: EncDecLM, ids: list[int], n: int) -> list[int]:
    out = [model.cfg.decoder_start_id]
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([ids]), torch.tensor([out]))[0, -1].argmax()))
    return out[1:]


def test_generate_greedy_encodes_once_and_matches_recompute():
    model = _model()
    calls = []
    model.encoder.register_forward_hook(lambda *_: calls.append(1))
    ids = list(range(5, 25))
    got = generate_encdec(model, ids, SamplingConfig(max_new_tokens=12, temperature=0))
    assert len(calls) == 1
    calls.clear()
    assert_clear_greedy_encdec(model, ids, got)
    assert got == _greedy_by_teacher_forcing(model, ids, 12)
    assert generate_encdec(model, ids, SamplingConfig(max_new_tokens=12, temperature=0, use_cache=False)) == got


def test_generate_stops_at_eos_and_on_token():
    model = _model()
    ids = list(range(5, 25))
    full = generate_encdec(model, ids, SamplingConfig(max_new_tokens=10, temperature=0))
    assert generate_encdec(model, ids, SamplingConfig(max_new_tokens=10, temperature=0), eos_id=full[3]) \
        == full[:full.index(full[3])]
    seen: list[int] = []
    out = generate_encdec(model, ids, SamplingConfig(max_new_tokens=10, temperature=0),
                          on_token=lambda t: seen.append(t) or len(seen) == 4)
    assert out == seen == full[:4]


def test_generate_sampling_is_seeded_and_mask_matters():
    model = _model()
    ids = list(range(5, 25))
    cfg = SamplingConfig(max_new_tokens=15, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    first = generate_encdec(model, ids, cfg)
    assert generate_encdec(model, ids, cfg) == first
    assert generate_encdec(model, ids, SamplingConfig(max_new_tokens=15, temperature=1.0, seed=4)) != first
    masked = [1] * 15 + [0] * 5
    greedy = SamplingConfig(max_new_tokens=8, temperature=0)
    unpadded = generate_encdec(model, ids[:15], greedy)
    assert_clear_greedy_encdec(model, ids[:15], unpadded)
    assert generate_encdec(model, ids, greedy, attention_mask=masked) == unpadded


def test_generate_validates_lengths_and_config():
    model = _model(max_seq_len=16)
    with pytest.raises(LmforgeError, match="17 tokens, more than max_seq_len=16"):
        generate_encdec(model, list(range(17)), SamplingConfig(max_new_tokens=4))
    truncated = generate_encdec(model, list(range(17)), SamplingConfig(max_new_tokens=4, temperature=0,
                                                                       truncate_prompt=True))
    assert truncated == generate_encdec(model, list(range(1, 17)), SamplingConfig(max_new_tokens=4, temperature=0))
    with pytest.raises(LmforgeError, match="max_new_tokens=17 exceeds"):
        generate_encdec(model, [5, 6], SamplingConfig(max_new_tokens=17))
    with pytest.raises(LmforgeError, match="top_p"):
        generate_encdec(model, [5, 6], SamplingConfig(top_p=0))
    with pytest.raises(LmforgeError, match="empty"):
        generate_encdec(model, [], SamplingConfig())


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    lines = [f"translate {i}: the owl sang a song about the sea" for i in range(100)]
    return train_tokenizer(lines, vocab_size=400, show_progress=False)


def test_generate_text2text_appends_eos_and_decodes(tok):
    torch.manual_seed(0)
    model = EncDecLM(_cfg(vocab_size=tok.vocab_size)).eval()
    cfg = SamplingConfig(max_new_tokens=6, temperature=0, stop_at_eos=False)
    text = generate_text2text(model, tok, "the owl sang", cfg)
    ids = generate_encdec(model, tok.encode("the owl sang") + [tok.eos_id], cfg)
    assert text == tok.decode(ids)
    assert tok.token_id(SENTINELS[0]) is not None  # the sentinels span corruption needs are in every vocab
