"""T5 span corruption: the paper's example, exact reconstruction, noise statistics, determinism, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.data.batches import PackedBatches
from lmforge.data.span_corruption import (
    SpanCorruptionBatches,
    build_span_corruption_batch,
    corrupt_spans,
    random_spans_noise_mask,
    span_corruption_lengths,
)

SENTINELS = list(range(1000, 1300))  # stand-ins for <extra_id_0>..: more than 100, so any span count fits
EOS, PAD = 1, 2


def _reconstruct(inputs: list[int], targets: list[int]) -> list[int]:
    """Put each sentinel's span from the target back in place of the sentinel in the input."""
    assert inputs[-1] == EOS and targets[-1] == EOS
    spans: dict[int, list[int]] = {}
    current = None
    for t in targets[:-1]:
        if t in SENTINELS:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    out = []
    for t in inputs[:-1]:
        out.extend(spans[t] if t in SENTINELS else [t])
    return out


def test_paper_example():
    """Raffel et al. 2020, fig. 2: 'for inviting' and 'last' dropped."""
    words = "Thank you for inviting me to your party last week .".split()
    vocab = {w: i + 10 for i, w in enumerate(dict.fromkeys(words))}
    X, Y, Z = 1000, 1001, 1002
    names = {**{i: w for w, i in vocab.items()}, X: "<X>", Y: "<Y>", Z: "<Z>", EOS: "</s>"}
    mask = [w in ("for", "inviting", "last") for w in words]
    inputs, targets = corrupt_spans([vocab[w] for w in words], mask, SENTINELS, EOS)
    assert " ".join(names[i] for i in inputs) == "Thank you <X> me to your party <Y> week . </s>"
    assert " ".join(names[i] for i in targets) == "<X> for inviting <Y> last <Z> </s>"


def test_adjacent_noise_is_one_span_and_edges_work():
    inputs, targets = corrupt_spans([5, 6, 7, 8], [True, True, False, True], SENTINELS, EOS)
    assert inputs == [1000, 7, 1001, EOS]
    assert targets == [1000, 5, 6, 1001, 8, 1002, EOS]
    assert corrupt_spans([5, 6], [False, False], SENTINELS, EOS) == ([5, 6, EOS], [1000, EOS])
    with pytest.raises(ValueError, match="more noise spans than the 2 sentinels"):
        corrupt_spans([5, 6, 7], [True, False, True], [1000, 1001], EOS)


@settings(max_examples=150, deadline=None)
@given(length=st.integers(0, 400), seed=st.integers(0, 2**32 - 1),
       density=st.sampled_from([0.05, 0.15, 0.3, 0.5]), mean=st.sampled_from([1.0, 2.0, 3.0, 8.0]))
def test_reconstruction_is_exact_and_sentinels_in_order(length, seed, density, mean):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(10, 900, size=length).tolist()
    mask = random_spans_noise_mask(length, density, mean, rng)
    inputs, targets = corrupt_spans(tokens, mask, SENTINELS, EOS)
    assert _reconstruct(inputs, targets) == tokens
    in_sentinels = [t for t in inputs if t in SENTINELS]
    assert in_sentinels == SENTINELS[:len(in_sentinels)]
    assert [t for t in targets if t in SENTINELS] == SENTINELS[:len(in_sentinels) + 1]
    if length >= 2:
        assert (len(inputs), len(targets)) == span_corruption_lengths(length, density, mean)


def test_noise_statistics():
    """Over 2000 sequences of 20..500 tokens: noise fraction 0.15 +- 0.005, mean span length 3 +- 0.1,
    spans of varied lengths (T5's random segmentation), noise spread over the whole sequence (each quarter
    holds 25% +- 6% of it) yet, as in T5 without its random roll, never first and always last."""
    rng = np.random.default_rng(0)
    noise = total = spans = 0
    span_lengths: list[int] = []
    quarters = np.zeros(4)
    for _ in range(2000):
        length = int(rng.integers(20, 501))
        mask = random_spans_noise_mask(length, 0.15, 3.0, rng)
        starts = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int)])) == 1)
        ends = np.flatnonzero(np.diff(np.concatenate([mask.astype(int), [0]])) == -1)
        span_lengths += (ends - starts + 1).tolist()
        noise, total, spans = noise + mask.sum(), total + length, spans + len(starts)
        quarters += [part.sum() for part in np.array_split(mask, 4)]
        assert not mask[0] and mask[-1]
    assert abs(noise / total - 0.15) < 0.005
    assert abs(noise / spans - 3.0) < 0.1
    assert np.mean(np.array(span_lengths) == 3) < 0.5 and max(span_lengths) > 6
    assert np.all(np.abs(quarters / quarters.sum() - 0.25) < 0.06), quarters / quarters.sum()


def test_batch_padding_labels_and_determinism():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(10, 900, size=n).tolist() for n in (40, 13, 27)]

    def build(seed):
        return build_span_corruption_batch(seqs, sentinel_ids=SENTINELS, eos_id=EOS, pad_id=PAD,
                                           generator=np.random.default_rng(seed))

    batch = build(7)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for k in batch:
        assert torch.equal(batch[k], build(7)[k])
    assert not torch.equal(batch["input_ids"], build(8)["input_ids"])
    for row, seq in enumerate(seqs):
        n_in = int(batch["attention_mask"][row].sum())
        inputs = batch["input_ids"][row, :n_in].tolist()
        assert (batch["input_ids"][row, n_in:] == PAD).all()
        labels = batch["labels"][row]
        targets = labels[labels != -100].tolist()
        assert (labels[len(targets):] == -100).all()
        assert _reconstruct(inputs, targets) == seq


def test_span_corruption_batches_are_a_pure_function_of_seed_and_index():
    tokens = np.arange(5000, dtype=np.uint16) % 900 + 10
    kw = dict(sentinel_ids=SENTINELS, eos_id=EOS, pad_id=PAD)
    a = SpanCorruptionBatches(tokens, raw_len=64, batch_size=4, seed=3, **kw)
    b = SpanCorruptionBatches(tokens, raw_len=64, batch_size=4, seed=3, **kw)
    out_of_order = {i: b.batch(i) for i in (30, 5, 0)}  # 30 is past the first epoch (78 windows / 4)
    for i in (0, 5, 30):
        assert all(torch.equal(a.batch(i)[k], out_of_order[i][k]) for k in out_of_order[i])
    batch = a.batch(0)
    assert batch["input_ids"].shape == (4, a.input_len) and batch["labels"].shape == (4, a.target_len)
    windows = PackedBatches(tokens, 63, 4, seed=3)
    starts = windows.window_ids(0) * 64
    for row, start in enumerate(starts):
        assert _reconstruct(batch["input_ids"][row].tolist(), batch["labels"][row].tolist()) \
            == tokens[start:start + 64].tolist()
    other = SpanCorruptionBatches(tokens, raw_len=64, batch_size=4, seed=4, **kw).batch(0)
    assert not torch.equal(other["input_ids"], batch["input_ids"])


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="noise_density"):
        random_spans_noise_mask(10, 0.0, 3.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="noise_mask has 2 entries for 3 tokens"):
        corrupt_spans([1, 2, 3], [True, False], SENTINELS, EOS)
