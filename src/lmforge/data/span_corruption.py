"""T5's span-corruption objective (Raffel et al. 2020, sec. 3.1.4 and 3.3.4).

Some 15% of a sequence's tokens are dropped in spans of mean length 3. In the input each span becomes one
sentinel (<extra_id_0>, <extra_id_1>, ...); the target lists each sentinel followed by the span it
replaced and ends with one more sentinel. Both end with EOS. The paper's example:

    original: Thank you for inviting me to your party last week .
    input:    Thank you <X> me to your party <Y> week . </s>
    target:   <X> for inviting <Y> last <Z> </s>

`SpanCorruptionBatches.batch(i)` is a pure function of (seed, i), so training resumes exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lmforge.data.batches import PackedBatches

IGNORE_INDEX = -100


def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noised tokens, noise spans) for a sequence of `length`, as T5's `random_spans_noise_mask` counts them:
    round(length * density) tokens (at least 1, at most length - 1) in round(tokens / mean) spans (at least 1)."""
    if not 0 < noise_density < 1 or mean_span_length < 1:
        raise ValueError(f"need 0 < noise_density < 1 and mean_span_length >= 1, got {noise_density} "
                         f"and {mean_span_length}")
    length = max(length, 2)
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = min(max(round(num_noise / mean_span_length), 1), num_noise, length - num_noise)
    return num_noise, num_spans


def span_corruption_lengths(length: int, noise_density: float = 0.15, mean_span_length: float = 3.0
                            ) -> tuple[int, int]:
    """(input, target) lengths, EOS included, after corrupting a sequence of `length` tokens (length >= 2)."""
    num_noise, num_spans = span_counts(length, noise_density, mean_span_length)
    return length - num_noise + num_spans + 1, num_noise + num_spans + 2


def _random_segmentation(num_items: int, num_segments: int, generator: np.random.Generator) -> np.ndarray:
    """Lengths of `num_segments` non-empty segments summing to `num_items`, uniform over all such splits."""
    cuts = np.sort(generator.choice(num_items - 1, num_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(length: int, noise_density: float, mean_span_length: float,
                            generator: np.random.Generator) -> np.ndarray:
    """Boolean noise mask [length]: noise and non-noise tokens are each cut into `num_spans` random segments
    and interleaved, non-noise first (T5's `random_spans_noise_mask`, without its optional roll)."""
    num_noise, num_spans = span_counts(length, noise_density, mean_span_length)
    padded = max(length, 2)
    noise = _random_segmentation(num_noise, num_spans, generator)
    keep = _random_segmentation(padded - num_noise, num_spans, generator)
    spans = np.stack([keep, noise], axis=1).reshape(-1)
    is_noise = np.repeat(np.tile([False, True], num_spans), spans)
    return is_noise[:length]


def corrupt_spans(tokens: Sequence[int], noise_mask: Sequence[bool], sentinel_ids: Sequence[int],
                  eos_id: int) -> tuple[list[int], list[int]]:
    """(input, target) ids: each run of noise becomes the next sentinel in the input and, followed by the run,
    starts a section of the target; the target ends with the next unused sentinel. Both end with EOS."""
    if len(tokens) != len(noise_mask):
        raise ValueError(f"noise_mask has {len(noise_mask)} entries for {len(tokens)} tokens")
    inputs: list[int] = []
    targets: list[int] = []
    span = 0
    for i, (token, noise) in enumerate(zip(tokens, noise_mask, strict=True)):
        if not noise:
            inputs.append(token)
            continue
        if i == 0 or not noise_mask[i - 1]:  # a new span
            if span >= len(sentinel_ids) - 1:
                raise ValueError(f"more noise spans than the {len(sentinel_ids)} sentinels allow (one is kept for "
                                 "the end of the target); use shorter sequences or fewer spans")
            inputs.append(sentinel_ids[span])
            targets.append(sentinel_ids[span])
            span += 1
        targets.append(token)
    return inputs + [eos_id], targets + [sentinel_ids[span], eos_id]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def build_span_corruption_batch(
    sequences: list[list[int]],
    *,
    sentinel_ids: Sequence[int],
    eos_id: int,
    pad_id: int,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
    generator: np.random.Generator,
) -> dict[str, torch.Tensor]:
    """Corrupt each sequence; right-pad into `input_ids`, `attention_mask` (1 = token) and `labels`
    (IGNORE_INDEX at padding). Decoder inputs are `EncDecLM.shift_right(labels)`."""
    if not sequences:
        raise ValueError("no sequences to corrupt")
    inputs, targets = [], []
    for seq in sequences:
        mask = random_spans_noise_mask(len(seq), noise_density, mean_span_length, generator)
        x, y = corrupt_spans(seq, mask, sentinel_ids, eos_id)
        inputs.append(x)
        targets.append(y)
    input_ids = _pad(inputs, pad_id)
    attention_mask = _pad([[1] * len(x) for x in inputs], 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": _pad(targets, IGNORE_INDEX)}


class SpanCorruptionBatches:
    """Span-corrupted batches of `raw_len`-token windows of a 1-D token stream (`PackedBatches`' windows
    and their per-epoch shuffles); batch `i` depends only on (seed, i)."""

    def __init__(self, tokens: np.ndarray, raw_len: int, batch_size: int, seed: int, *, sentinel_ids: Sequence[int],
                 eos_id: int, pad_id: int, noise_density: float = 0.15, mean_span_length: float = 3.0,
                 shuffle: bool = True):
        if raw_len < 2:
            raise ValueError(f"raw_len must be >= 2, got {raw_len}")
        self.windows = PackedBatches(tokens, raw_len - 1, batch_size, seed, shuffle=shuffle)
        self.seed = seed
        self.options = dict(sentinel_ids=sentinel_ids, eos_id=eos_id, pad_id=pad_id, noise_density=noise_density,
                            mean_span_length=mean_span_length)
        self.input_len, self.target_len = span_corruption_lengths(raw_len, noise_density, mean_span_length)

    @property
    def num_batches_per_epoch(self) -> int:
        return self.windows.num_batches_per_epoch

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Batch `index`: `input_ids` and `attention_mask` [B, input_len], `labels` [B, target_len]."""
        starts = self.windows.window_ids(index).astype(np.int64) * self.windows.window
        rows = np.asarray(self.windows.tokens[starts[:, None] + np.arange(self.windows.window)]).astype(np.int64)
        generator = np.random.default_rng([self.seed, index])
        return build_span_corruption_batch(rows.tolist(), generator=generator, **self.options)
