"""The one seeded epoch sampler behind packed windows, task examples and preference pairs: every item once per
epoch, a fresh seeded permutation each epoch, and a batch a pure function of (seed, index), so resume is exact."""

from __future__ import annotations

import numpy as np
import pytest

from lmforge.data.batches import PackedBatches
from lmforge.data.sampler import EpochSampler, shuffled_batches


def stream(sampler: EpochSampler, batches: int) -> np.ndarray:
    return np.concatenate([sampler.batch_ids(i) for i in range(batches)])


def test_batches_walk_seeded_per_epoch_permutations_across_epoch_boundaries() -> None:
    sampler = EpochSampler(10, 4, seed=7)  # batches 2, 4, 7 straddle an epoch boundary
    ids = stream(sampler, 10)
    # the order checkpoints written before this sampler resume into: numpy's permutation seeded by (seed, epoch)
    expected = np.concatenate([np.random.default_rng([7, e]).permutation(10) for e in range(4)])
    assert np.array_equal(ids, expected)
    assert all(sorted(ids[e * 10:(e + 1) * 10].tolist()) == list(range(10)) for e in range(4))
    assert not np.array_equal(ids[:10], ids[10:20])


def test_a_batch_is_a_pure_function_of_seed_and_index() -> None:
    forward = [EpochSampler(13, 5, seed=3).batch_ids(i) for i in range(9)]
    backward = EpochSampler(13, 5, seed=3)
    assert all(np.array_equal(backward.batch_ids(i), forward[i]) for i in reversed(range(9)))
    assert not np.array_equal(EpochSampler(13, 5, seed=4).batch_ids(2), forward[2])
    assert np.array_equal(stream(EpochSampler(6, 4, 0, shuffle=False), 3), np.tile(np.arange(6), 2))


def test_a_batch_never_exceeds_the_data_and_bad_arguments_are_refused() -> None:
    assert EpochSampler(3, 8, seed=0).batch_ids(5).tolist() in ([0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0],
                                                                [2, 0, 1], [2, 1, 0])
    with pytest.raises(ValueError, match="n and batch_size must be >= 1"):
        EpochSampler(0, 4, seed=0)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        EpochSampler(4, 2, seed=-1)
    with pytest.raises(ValueError, match="batch index must be >= 0"):
        EpochSampler(4, 2, seed=0).batch_ids(-1)


def test_examples_and_packed_windows_are_served_in_the_sampler_order() -> None:
    items = [f"row{i}" for i in range(11)]
    batch_at = shuffled_batches(items, 4, seed=5, collate=list)
    sampler = EpochSampler(11, 4, seed=5)
    assert all(batch_at(i) == [items[k] for k in sampler.batch_ids(i)] for i in range(8))
    packed = PackedBatches(np.arange(11 * 8), seq_len=7, batch_size=4, seed=5)  # 11 windows of 8 tokens
    assert all(np.array_equal(packed.window_ids(i), sampler.batch_ids(i)) for i in range(8))
