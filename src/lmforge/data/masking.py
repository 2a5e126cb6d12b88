"""Masked-LM batches for encoders: BERT token masking, SpanBERT span masking, next-sentence pairs.

`build_mlm_batch` corrupts a batch as BERT does (Devlin et al. 2019, sec. 3.1): it selects `mask_prob`
of the maskable tokens and replaces each selected token by [MASK] 80% of the time, by a random token 10%
and leaves it unchanged 10%; only selected positions carry a label. With `span=True` it selects whole
spans instead (SpanBERT, Joshi et al. 2020): lengths ~ Geo(0.2) truncated at 10 (mean 3.8), the same
80/10/10 decision applied to every token of a span. `MLMBatches` serves such batches from a packed token
stream, and like `PackedBatches` a batch is a pure function of (seed, index), so resuming is exact.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from lmforge.data.batches import PackedBatches
from lmforge.errors import DataError
from lmforge.tokenizer import CLS, MASK, SEP, Tokenizer

IGNORE_INDEX = -100
_MLM_STREAM = 0x4D4C4D  # separates the masking seeds from PackedBatches' epoch-order seeds


def mlm_token_ids(tokenizer: Tokenizer, name: str = "the tokenizer") -> dict[str, int | list[int] | None]:
    """The special-token keyword arguments `MLMBatches` needs, read from `tokenizer`.

    [CLS]/[SEP] fall back to BOS/EOS (as in RoBERTa); [MASK] has no stand-in, so its absence is an error."""
    mask_id = tokenizer.token_id(MASK)
    if mask_id is None:
        raise DataError(f"{name} has no {MASK} token; MLM needs one: train the tokenizer with "
                        f"`lmforge tokenizer train` (which reserves it) or add it")
    cls_id = tokenizer.token_id(CLS)
    cls_id = tokenizer.bos_id if cls_id is None else cls_id
    sep_id = tokenizer.token_id(SEP)
    sep_id = tokenizer.eos_id if sep_id is None else sep_id
    if cls_id is None or sep_id is None:
        raise DataError(f"{name} has no {CLS}/{SEP} (or BOS/EOS) tokens to wrap MLM sequences; add them")
    added = tokenizer.backend.get_added_tokens_decoder()
    special = sorted({i for i, token in added.items() if token.special} | {mask_id, cls_id, sep_id})
    return {"mask_id": mask_id, "cls_id": cls_id, "sep_id": sep_id, "pad_id": tokenizer.pad_id,
            "vocab_size": tokenizer.vocab_size, "special_ids": special}


def mask_budgets(candidates: Tensor, mask_prob: float, generator: torch.Generator) -> Tensor:
    """Tokens to select per row: `mask_prob` of its candidates, stochastically rounded (so the overall rate
    is exactly `mask_prob` in expectation), and at least one in a row with any candidate."""
    n = candidates.sum(1).double()
    budgets = (n * mask_prob + torch.rand(n.shape, generator=generator, dtype=torch.float64)).floor().long()
    return torch.minimum(budgets.clamp(min=1), n.long())


def select_tokens(candidates: Tensor, budgets: Tensor, generator: torch.Generator) -> Tensor:
    """Uniformly chosen single tokens: `budgets[b]` of row b's candidates. Returns span ids [B, T]
    (0 = unselected; each selected token is its own span)."""
    B, T = candidates.shape
    scores = torch.rand(B, T, generator=generator).masked_fill(~candidates, 2.0)
    ranks = scores.argsort(1).argsort(1)
    return torch.where(ranks < budgets[:, None], torch.arange(1, T + 1).expand(B, T), 0)


def select_spans(candidates: Tensor, budgets: Tensor, generator: torch.Generator, *, max_span: int = 10,
                 span_p: float = 0.2) -> Tensor:
    """SpanBERT span selection: returns span ids [B, T] (0 = unselected, k = the k-th span of its row).

    Span lengths are drawn from Geo(span_p) truncated at `max_span`; each span is placed uniformly among
    the positions where it fits inside one run of unselected candidates (so spans never overlap and never
    cross a special token). A span longer than every free run, or than the budget left, is shortened."""
    if not 0 < span_p <= 1 or max_span < 1:
        raise ValueError(f"need 0 < span_p <= 1 and max_span >= 1, got {span_p} and {max_span}")
    B, T = candidates.shape
    weights = span_p * (1 - span_p) ** torch.arange(max_span, dtype=torch.float64)
    span_ids = np.zeros((B, T), dtype=np.int64)
    cand = candidates.cpu().numpy()
    for row in range(B):
        budget = int(budgets[row])
        if budget == 0:
            continue
        lengths = (torch.multinomial(weights, budget, replacement=True, generator=generator) + 1).tolist()
        draws = torch.rand(budget, generator=generator, dtype=torch.float64).tolist()
        runs = _runs(cand[row])
        left, n = budget, 0
        while left > 0:
            length = min(lengths[n], left, max(end - start for start, end in runs))
            ends = list(itertools.accumulate(max(0, end - start - length + 1) for start, end in runs))
            pick = int(draws[n] * ends[-1])  # the pick-th of all places the span fits
            i = bisect.bisect_right(ends, pick)
            start, end = runs[i]
            first = start + pick - (ends[i - 1] if i else 0)
            span_ids[row, first:first + length] = n + 1
            runs[i:i + 1] = [r for r in ((start, first), (first + length, end)) if r[1] > r[0]]
            left, n = left - length, n + 1
    return torch.from_numpy(span_ids)


def _runs(candidates: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of True."""
    edges = np.diff(np.concatenate(([0], candidates.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def build_mlm_batch(input_ids: Tensor, *, mask_id: int, vocab_size: int, special_ids: Sequence[int],
                    generator: torch.Generator, mask_prob: float = 0.15, span: bool = False, max_span: int = 10,
                    span_p: float = 0.2, pad_id: int | None = None) -> dict[str, Tensor]:
    """BERT (or, with `span`, SpanBERT) masking of LongTensor[B, T] `input_ids`.

    Special tokens (and [MASK] and PAD) are never selected, nor drawn as random replacements. Returns the
    corrupted `input_ids`, `labels` (the original token where selected, -100 elsewhere) and
    `attention_mask` (0 at PAD)."""
    if not 0 < mask_prob < 1:
        raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
    special = {int(i) for i in special_ids} | {mask_id} | ({pad_id} if pad_id is not None else set())
    if any(not 0 <= i < vocab_size for i in special):
        raise ValueError(f"special ids {sorted(special)} must lie in [0, vocab_size={vocab_size})")
    allowed = torch.tensor(sorted(set(range(vocab_size)) - special), dtype=torch.long)
    if len(allowed) == 0:
        raise ValueError("every token id is special: nothing to draw random replacements from")
    candidates = ~torch.isin(input_ids, torch.tensor(sorted(special)))
    budgets = mask_budgets(candidates, mask_prob, generator)
    if span:
        span_ids = select_spans(candidates, budgets, generator, max_span=max_span, span_p=span_p)
    else:
        span_ids = select_tokens(candidates, budgets, generator)
    B, T = input_ids.shape
    selected = span_ids > 0
    decision = torch.rand(B, T + 1, generator=generator).gather(1, span_ids)  # one draw per span
    random_ids = allowed[torch.randint(len(allowed), (B, T), generator=generator)]
    corrupted = torch.where(selected & (decision < 0.8), mask_id, input_ids)
    corrupted = torch.where(selected & (decision >= 0.8) & (decision < 0.9), random_ids, corrupted)
    attention_mask = torch.ones_like(input_ids) if pad_id is None else (input_ids != pad_id).long()
    return {"input_ids": corrupted, "labels": torch.where(selected, input_ids, IGNORE_INDEX),
            "attention_mask": attention_mask}


def build_nsp_pairs(windows: Tensor, random_windows: Tensor, *, cls_id: int, sep_id: int,
                    generator: torch.Generator) -> dict[str, Tensor]:
    """Next-sentence-prediction pairs (BERT's second objective) from packed windows [B, W].

    Segment A is the first half of a window; segment B is its own second half (IsNext, label 0) or, with
    probability 1/2, the second half of the matching row of `random_windows` (NotNext, label 1). Returns
    `input_ids` = [CLS] A [SEP] B [SEP] (length W + 3), `token_type_ids` (0 up to the first [SEP], 1 after)
    and `nsp_labels`."""
    if windows.shape != random_windows.shape or windows.shape[1] < 2:
        raise ValueError(f"need two equal [B, W >= 2] window batches, got {tuple(windows.shape)} and "
                         f"{tuple(random_windows.shape)}")
    B, W = windows.shape
    half = W // 2
    not_next = torch.rand(B, generator=generator) < 0.5
    second = torch.where(not_next[:, None], random_windows[:, half:], windows[:, half:])
    cls, sep = torch.full((B, 1), cls_id), torch.full((B, 1), sep_id)
    input_ids = torch.cat([cls, windows[:, :half], sep, second, sep], 1)
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, half + 2:] = 1
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "nsp_labels": not_next.long()}


def batch_generator(seed: int, index: int) -> torch.Generator:
    """The torch RNG of batch `index`: a pure function of (seed, index)."""
    state = np.random.SeedSequence([seed, index, _MLM_STREAM]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class MLMBatches:
    """Deterministic, infinite stream of masked-LM batches [B, seq_len] over a packed 1-D token array.

    Windows of seq_len - 2 tokens (seq_len - 3 with `nsp`) are served in `PackedBatches` order, wrapped
    as [CLS] window [SEP] (or split into an NSP pair), then masked with `build_mlm_batch`. Each batch holds
    `input_ids`, `labels`, `attention_mask`, `token_type_ids` and, with `nsp`, `nsp_labels`."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, *, mask_id: int, cls_id: int,
                 sep_id: int, pad_id: int | None, vocab_size: int, special_ids: Sequence[int],
                 mask_prob: float = 0.15, span: bool = False, nsp: bool = False, shuffle: bool = True):
        wrap = 3 if nsp else 2
        if seq_len < wrap + 2:
            raise ValueError(f"seq_len must be >= {wrap + 2} (the wrapping special tokens plus 2), got {seq_len}")
        if not 0 < mask_prob < 1:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        self.window = seq_len - wrap
        need = max(batch_size, 2 if nsp else 1)
        if tokens.ndim == 1 and len(tokens) // self.window < need:
            raise DataError(
                f"the corpus has {len(tokens)} tokens, but MLM batches need {need} windows of seq_len - {wrap} = "
                f"{self.window} tokens; use a smaller batch_size or seq_len, or more data")
        self.packed = PackedBatches(tokens, self.window - 1, batch_size, seed, shuffle)
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.mask_id, self.cls_id, self.sep_id, self.pad_id = mask_id, cls_id, sep_id, pad_id
        self.vocab_size, self.mask_prob, self.span, self.nsp = vocab_size, mask_prob, span, nsp
        self.special_ids = sorted({*special_ids, cls_id, sep_id, mask_id} | ({pad_id} if pad_id is not None else set()))
        self._offsets = np.arange(self.window, dtype=np.int64)

    @property
    def num_batches_per_epoch(self) -> int:
        return self.packed.num_batches_per_epoch

    def _rows(self, window_ids: np.ndarray) -> Tensor:
        starts = window_ids.astype(np.int64) * self.window
        return torch.from_numpy(np.asarray(self.tokens[starts[:, None] + self._offsets]).astype(np.int64))

    def batch(self, index: int) -> dict[str, Tensor]:
        """Batch `index`: the same tensors whenever (and in whatever order) it is asked for."""
        ids = self.packed.window_ids(index)
        generator = batch_generator(self.seed, index)
        rows = self._rows(ids)
        if self.nsp:  # a random window other than the row's own
            other = torch.randint(self.packed.num_windows - 1, (len(ids),), generator=generator).numpy()
            other += other >= ids
            extra = build_nsp_pairs(rows, self._rows(other), cls_id=self.cls_id, sep_id=self.sep_id,
                                    generator=generator)
            input_ids = extra.pop("input_ids")
        else:
            B = len(ids)
            input_ids = torch.cat([torch.full((B, 1), self.cls_id), rows, torch.full((B, 1), self.sep_id)], 1)
            extra = {"token_type_ids": torch.zeros_like(input_ids)}
        masked = build_mlm_batch(input_ids, mask_id=self.mask_id, vocab_size=self.vocab_size,
                                 special_ids=self.special_ids, generator=generator, mask_prob=self.mask_prob,
                                 span=self.span, pad_id=self.pad_id)
        return {**masked, **extra}

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for index in itertools.count():
            yield self.batch(index)
