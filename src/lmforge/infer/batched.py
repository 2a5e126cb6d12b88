"""Batched generation of prompts of different lengths over one preallocated KV cache.

The prompts are left-padded into one [B, T] block with an attention mask, so every row's last prompt
token sits in the same column: one prefill, then one decode step of a single position for all rows at once.
The mask hides the padding from attention and restarts each row's positions at 0 on its first real token
(`DecoderLM.forward(..., attention_mask=...)`). A row that has stopped (EOS or max_new_tokens) keeps being
fed a pad token until every row is done; its outputs are ignored. Generation always uses the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch

from lmforge.infer.generate import SamplingConfig, _fit_prompt, next_token
from lmforge.model.decoder import DecoderLM
from lmforge.model.layers import fused_qkv

PAD_ID = 0  # any valid id: padded slots are masked out and finished rows' outputs are dropped


@torch.inference_mode()
def generate_batch(
    model: DecoderLM,
    prompts: list[list[int]],
    cfg: SamplingConfig,
    eos_id: int | Collection[int] | None = None,
    row_done: Callable[[int, list[int]], bool] | None = None,
) -> list[list[int]]:
    """Generate up to cfg.max_new_tokens ids after each prompt; returns each row's new ids.

    `row_done(i, new_ids)` is asked after each token row i takes (e.g. whether a stop string has appeared); True
    ends that row.
    Greedy rows match `generate_ids` on that prompt alone; a seeded sampling run is reproducible (but draws
    from one generator for the whole batch, so its rows differ from single-prompt runs)."""
    cfg.validate()
    if not prompts:
        return []
    stop_ids = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
    rows = [_fit_prompt(list(p), model.cfg.max_seq_len, cfg) for p in prompts]
    B, width = len(rows), max(len(r) for r in rows)
    device = model.device
    generator = None
    if cfg.seed is not None and cfg.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    ids = torch.full((B, width), PAD_ID, dtype=torch.long, device=device)
    mask = torch.zeros((B, width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, device=device)
        mask[i, width - len(r):] = 1
    cache = model.new_cache(B, width + cfg.max_new_tokens)
    with fused_qkv(model):
        logits = model(ids, cache=cache, attention_mask=mask, keep_last=1)[:, -1]
        new: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        ones = torch.ones((B, 1), dtype=torch.long, device=device)
        while True:
            tokens = next_token(logits, cfg, generator).tolist()
            for i, tid in enumerate(tokens):
                if done[i]:
                    continue
                if cfg.stop_at_eos and tid in stop_ids:
                    done[i] = True
                    continue
                new[i].append(tid)
                done[i] = len(new[i]) == cfg.max_new_tokens or (row_done is not None and row_done(i, new[i]))
            if all(done):
                return new
            feed = torch.tensor([[PAD_ID if d else t] for d, t in zip(done, tokens, strict=True)], device=device)
            mask = torch.cat([mask, ones], dim=1)
            logits = model(feed, cache=cache, attention_mask=mask)[:, -1]
