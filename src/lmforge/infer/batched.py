"""Batched generation of prompts of different lengths: every prompt a request of one run of the shared engine.

The engine (`infer/engine.py`) prefills the prompts together, left-padded into one block with an attention mask, so
every row's last prompt token sits in the same column, then decodes one position for all rows at once; a row that
stops (EOS or max_new_tokens) leaves the batch.
"""

from __future__ import annotations

import torch

from lmforge.infer.decoding import StopIds, fit_prompt, stop_id_set
from lmforge.infer.engine import Engine, GenerationRequest
from lmforge.infer.generate import SamplingConfig
from lmforge.model.decoder import DecoderLM


@torch.inference_mode()
def generate_batch(
    model: DecoderLM,
    prompts: list[list[int]],
    cfg: SamplingConfig,
    eos_id: StopIds = None,
) -> list[list[int]]:
    """Generate up to cfg.max_new_tokens ids after each prompt; returns each row's new ids.

    Greedy rows match `generate_ids` on that prompt alone; with a seed, row i samples as `generate_ids` with seed
    cfg.seed + i does (each row has its own generator)."""
    cfg.validate()
    if not prompts:
        return []
    stop_ids = stop_id_set(eos_id, cfg.stop_at_eos)
    engine = Engine(model, max_batch=len(prompts))
    ids = [engine.submit(GenerationRequest(
        fit_prompt(list(p), engine.context, cfg.max_new_tokens, cfg.truncate_prompt), cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seed=None if cfg.seed is None else cfg.seed + i,
        stop_ids=stop_ids,
    )) for i, p in enumerate(prompts)]
    new: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_work:
        for event in engine.step():
            if event.token_id is not None:
                new[event.request_id].append(event.token_id)
    return [new[i] for i in ids]
