"""Preference-pair batches for reward modelling and DPO: chosen rows stacked on top of rejected rows.

A pair batch is one right-padded `input_ids` [2B, T] (the B chosen rows, then the B rejected rows), with its
`attention_mask` and `response_mask`, so a single forward scores both halves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.data.chat import get_chat_template
from lmforge.data.sft import Example, collate_preferences, read_preferences
from lmforge.tokenizer import Tokenizer

Batch = dict[str, Tensor]


def stack_pairs(batch: Batch, pad_id: int) -> Batch:
    """`collate_preferences` output -> `input_ids`, `attention_mask`, `response_mask` [2B, T]: the chosen rows
    then the rejected rows, right-padded to one width."""
    width = max(batch["chosen_ids"].shape[1], batch["rejected_ids"].shape[1])

    def both(key: str, fill: int) -> Tensor:
        halves = [batch[f"{side}_{key}"] for side in ("chosen", "rejected")]
        return torch.cat([F.pad(h.long(), (0, width - h.shape[1]), value=fill) for h in halves])

    return {"input_ids": both("ids", pad_id), "attention_mask": both("attention", 0),
            "response_mask": both("mask", 0).bool()}


def collate_pairs(examples: Sequence[Example], pad_id: int) -> Batch:
    """Preference examples (`read_preferences`) -> one stacked pair batch."""
    return stack_pairs(collate_preferences(examples, pad_id), pad_id)


def ordered_pair_batches(examples: Sequence[Example], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Every pair once, in file order."""
    for i in range(0, len(examples), batch_size):
        yield collate_pairs(examples[i:i + batch_size], pad_id)


def pair_reader(config: Any, tokenizer: Tokenizer) -> Callable[[str], list[Example]]:
    """path -> tokenized pairs, laid out by a RewardConfig or DPOConfig's chat template (`hf`: config.base's),
    with its max_len and skip_bad_lines."""
    template = get_chat_template(config.template, tokenizer, config.base)

    def read(path: str) -> list[Example]:
        return read_preferences(path, tokenizer, template, config.max_len,
                                skip_bad_lines=config.skip_bad_lines).examples

    return read
