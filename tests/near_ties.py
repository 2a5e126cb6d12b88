"""Greedy choices compared across computation paths agree only where each choice is clear.

Two paths to the same logits (KV cache or full forward, a batch or one row, fused or separate projections, another
memory layout, transformers' implementation, another CPU's kernels) round differently and move the logits by ~1e-6:
enough to flip a near-tie. A test that compares token ids (or a ranking of scores) across paths therefore first
checks, on its reference path, that every choice won by more than MIN_MARGIN. A prompt or seed that fails this check
needs changing; the comparison itself stays exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

MIN_MARGIN = 1e-3


def top2_margin(logits: Tensor) -> float:
    """The smallest gap between the largest and the second largest entry of any row of `logits` [..., V]."""
    top2 = logits.detach().float().topk(2, dim=-1).values
    return float((top2[..., 0] - top2[..., 1]).min())


def assert_clear_choices(logits: Tensor, what: str) -> None:
    """Each row of `logits` [..., V] has its largest entry ahead of the runner-up by more than MIN_MARGIN."""
    margin = top2_margin(logits)
    assert margin > MIN_MARGIN, (f"{what}: a near-tie (top-2 logit margin {margin:.1e} <= {MIN_MARGIN:g}) could flip "
                                 "on other kernels; pick another prompt or seed")


def assert_clear_ranking(scores: Sequence[float], what: str) -> None:
    """Consecutive scores (best first) differ by more than MIN_MARGIN, so their order cannot flip."""
    gaps = [a - b for a, b in zip(scores, scores[1:], strict=False)]
    assert min(gaps, default=MIN_MARGIN + 1) > MIN_MARGIN, (
        f"{what}: scores {list(scores)} hold a near-tie (<= {MIN_MARGIN:g}); pick another prompt or seed")


@torch.no_grad()
def greedy_logits(model: torch.nn.Module, prompt: Sequence[int], new_ids: Sequence[int]) -> Tensor:
    """The logits [len(new_ids), V] from which decoder `model` picked each of `new_ids` after `prompt`, by one full
    forward. End `new_ids` with the stop token when where generation stopped matters too."""
    seq = torch.tensor([[*prompt, *new_ids]], device=next(model.parameters()).device)
    return model(seq)[0, len(prompt) - 1:-1]


def assert_clear_greedy(model: torch.nn.Module, prompt: Sequence[int], new_ids: Sequence[int]) -> None:
    """Decoder `model` picked each of `new_ids` after `prompt` by more than MIN_MARGIN."""
    logits = greedy_logits(model, prompt, new_ids)
    assert_clear_choices(logits, f"greedy continuation {list(new_ids)} of {list(prompt)}")


@torch.no_grad()
def assert_clear_greedy_encdec(model: torch.nn.Module, ids: Sequence[int], new_ids: Sequence[int],
                               attention_mask: Sequence[int] | None = None) -> None:
    """`assert_clear_greedy` for an encoder-decoder `model` that chose `new_ids` for the input `ids`."""
    dec = torch.tensor([[model.cfg.decoder_start_id, *new_ids[:-1]]])
    mask = None if attention_mask is None else torch.tensor([list(attention_mask)])
    logits = model(torch.tensor([list(ids)]), dec, mask)[0]
    assert_clear_choices(logits, f"greedy output {list(new_ids)} for {list(ids)}")
