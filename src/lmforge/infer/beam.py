"""Beam search (e.g. Graves 2012; Wu et al. 2016 for the length penalty) with transformers' semantics, on the decode
engine's rows (`infer/slots.py`): one row per beam, reordered to the survivors each step.

Each step keeps the best `num_beams` unfinished hypotheses by summed log-probability. A candidate that
ends in EOS and ranks among the top `num_beams` of the step joins the finished set with score
sum_logprob / generated_len ** length_penalty (EOS counted); at `max_new_tokens` the top candidates all
finish. Search stops early (transformers' `early_stopping=False` heuristic) once `num_beams` hypotheses
are finished and the best running one, scored at its current length, cannot beat the worst of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lmforge.errors import LmforgeError
from lmforge.infer.decoding import StopIds, fit_prompt, stop_id_set
from lmforge.infer.generate import bad_option
from lmforge.infer.slots import BatchSlots
from lmforge.model.attention import fused_qkv
from lmforge.model.decoder import DecoderLM


def check_beam_options(num_beams: int, length_penalty: float) -> None:
    """ConfigError for a bad beam count or length penalty (`lmforge generate` checks them before loading a model)."""
    if num_beams < 1:
        raise bad_option("num_beams", ">= 1", num_beams)
    if not math.isfinite(length_penalty):
        raise bad_option("length_penalty", "a finite number", length_penalty)


@torch.inference_mode()
def beam_search(
    model: DecoderLM,
    prompt_ids: Sequence[int],
    num_beams: int,
    max_new_tokens: int,
    eos_id: StopIds = None,
    length_penalty: float = 1.0,
    num_return: int = 1,
    truncate_prompt: bool = False,
) -> list[tuple[list[int], float]]:
    """The `num_return` best hypotheses as (new ids without the EOS token, score), best first. A prompt too long for
    the context with max_new_tokens is refused, or cut to its last tokens with `truncate_prompt`."""
    check_beam_options(num_beams, length_penalty)
    if not 1 <= num_return <= num_beams:
        raise LmforgeError(f"num_return must be in [1, num_beams={num_beams}], got {num_return}")
    if max_new_tokens < 1:
        raise LmforgeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stops = stop_id_set(eos_id)
    slots = BatchSlots.for_model(model, num_beams)
    prompt_ids = fit_prompt(list(prompt_ids), slots.max_columns, max_new_tokens, truncate_prompt)
    device = model.device
    vocab = model.cfg.vocab_size
    with fused_qkv(model):
        logits = slots.prefill(0, prompt_ids, len(prompt_ids) + max_new_tokens - 1)
        tokens = torch.empty(1, 0, dtype=torch.long, device=device)  # generated ids of the running beams
        scores = torch.zeros(1, device=device)  # their summed log-probs
        finished: list[tuple[float, list[int]]] = []  # (score, ids incl. EOS), best first, at most num_beams
        for step in range(max_new_tokens):
            gen_len = step + 1
            last = gen_len == max_new_tokens
            flat = (logits.float().log_softmax(dim=-1) + scores[:, None]).flatten()
            top_scores, top_idx = flat.topk(min(2 * num_beams, flat.numel()))
            rows, toks = top_idx // vocab, top_idx % vocab
            keep: list[int] = []
            for rank in range(len(top_idx)):
                ends = last or int(toks[rank]) in stops
                if ends and rank < num_beams:
                    ids = tokens[rows[rank]].tolist() + [int(toks[rank])]
                    finished.append((float(top_scores[rank]) / gen_len ** length_penalty, ids))
                elif not ends and len(keep) < num_beams:
                    keep.append(rank)
            finished = sorted(finished, key=lambda f: -f[0])[:num_beams]
            if not keep:
                break
            sel = torch.tensor(keep, device=device)
            tokens = torch.cat([tokens[rows[sel]], toks[sel, None]], dim=1)
            scores = top_scores[sel]
            if len(finished) == num_beams and float(scores[0]) / gen_len ** length_penalty <= finished[-1][0]:
                break
            slots.reorder(rows[sel].tolist())
            logits = slots.decode(dict(enumerate(toks[sel].tolist())))
        return [(ids[:-1] if ids[-1] in stops else ids, score) for score, ids in finished[:num_return]]
