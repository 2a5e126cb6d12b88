"""Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding";
Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling").

A small draft model proposes m tokens; the target scores all of them in one forward. Draft token d_i is
accepted with probability min(1, p(d_i) / q(d_i)); at the first rejection a token is drawn from
norm(max(0, p - q)) and the round ends; if all m are accepted a bonus token is drawn from the target's next
distribution. The output is distributed exactly as sampling from the target alone. With temperature 0 a
draft token is accepted iff it is the target's argmax, so the output equals the target's greedy output.
Each model decodes in one row of the engine's cache; rolling back a rejected suffix is `BatchSlots.rewind`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.infer.decoding import StopIds, fit_prompt, greedy_ids, new_generator, sampling_probs, stop_id_set
from lmforge.infer.generate import SamplingConfig, bad_option
from lmforge.infer.slots import BatchSlots
from lmforge.model.attention import fused_qkv
from lmforge.model.decoder import DecoderLM


@dataclass
class SpeculativeStats:
    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens the target accepted
    target_forwards: int = 0  # including the prefill
    draft_forwards: int = 0
    plain_forwards: int = 0  # target forwards plain decoding needs for the same output (one per sampled token)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def forwards_saved(self) -> int:
        return self.plain_forwards - self.target_forwards


def _sample(probs: Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def _feed(row: BatchSlots, ids: list[int], span: int, keep: int) -> Tensor:
    """The logits [keep, vocab] of the last `keep` of `ids`, fed after what `row` holds (its prefill when empty)."""
    return row.extend(ids)[-keep:] if row.busy() else row.prefill(0, ids, span, keep_last=keep)


def check_draft_options(num_draft: int, min_confidence: float) -> None:
    """ConfigError for a bad draft length or confidence (`lmforge generate` checks them before loading a model)."""
    if num_draft < 1:
        raise bad_option("num_draft", ">= 1", num_draft)
    if not 0 <= min_confidence < 1:
        raise bad_option("min_confidence", "in [0, 1) (0 = always draft num_draft tokens)", min_confidence,
                         flag="--draft-min-confidence")


@torch.inference_mode()
def speculative_generate(
    target: DecoderLM,
    draft: DecoderLM,
    prompt_ids: Sequence[int],
    cfg: SamplingConfig,
    num_draft: int = 4,
    eos_id: StopIds = None,
    min_confidence: float = 0.5,
) -> tuple[list[int], SpeculativeStats]:
    """Generate up to cfg.max_new_tokens ids after `prompt_ids` (only the new ids, EOS excluded) and stats.

    Greedy only: a round stops drafting early after a token the draft gives probability < `min_confidence` (a
    likely rejection: its successors would be wasted draft and verify work); the output is unchanged.
    benchmarks/speculative.py times it."""
    cfg.validate()
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise LmforgeError(f"the draft's vocab_size={draft.cfg.vocab_size} differs from the target's "
                           f"{target.cfg.vocab_size}; both models must share one tokenizer")
    check_draft_options(num_draft, min_confidence)
    stop_ids = stop_id_set(eos_id, cfg.stop_at_eos)
    # one row of the decode engine's cache each (`infer/slots.py`), holding a prefix of seq[:-1] between rounds
    t_row, d_row = BatchSlots.for_model(target, 1), BatchSlots.for_model(draft, 1)
    seq = fit_prompt(list(prompt_ids), min(t_row.max_columns, d_row.max_columns), cfg.max_new_tokens,
                     cfg.truncate_prompt)
    device = target.device
    greedy = cfg.temperature == 0
    generator = new_generator(cfg.seed, cfg.temperature, device)
    span = len(seq) + cfg.max_new_tokens - 1
    stats = SpeculativeStats()
    new: list[int] = []
    with fused_qkv(target), fused_qkv(draft):
        while True:
            m = min(num_draft, cfg.max_new_tokens - len(new) - 1)
            proposal: list[int] = []
            q: list[Tensor] = []
            for _ in range(m):
                logits = _feed(d_row, (seq + proposal)[d_row.length:], span, 1)[-1]
                stats.draft_forwards += 1
                if greedy:
                    proposal.append(int(greedy_ids(logits)))
                    if min_confidence > 0 and float(logits.float().softmax(-1)[proposal[-1]]) < min_confidence:
                        break
                else:
                    q.append(sampling_probs(logits, cfg))
                    proposal.append(_sample(q[-1], generator))
            m = len(proposal)
            base = len(seq) - 1
            logits = _feed(t_row, seq[t_row.length:] + proposal, span, m + 1)
            stats.target_forwards += 1
            stats.proposed += m
            k = 0
            if greedy:
                choice = greedy_ids(logits).tolist()
                while k < m and proposal[k] == choice[k]:
                    k += 1
                token = choice[k]
            else:
                p = sampling_probs(logits, cfg)
                token = -1
                while k < m:
                    d = proposal[k]
                    u = torch.rand((), generator=generator, device=device)
                    if u * q[k][d] < p[k, d]:
                        k += 1
                        continue
                    token = _sample((p[k] - q[k]).clamp(min=0), generator)
                    break
                if token < 0:
                    token = _sample(p[m], generator)
            stats.accepted += k
            committed = proposal[:k] + [token]
            # roll back past the rejected draft tokens: seq[:base + 1 + k] stays cached
            t_row.rewind(base + 1 + k)
            d_row.rewind(base + 1 + k)
            for tid in committed:
                stats.plain_forwards += 1
                if tid in stop_ids:
                    return new, stats
                new.append(tid)
                seq.append(tid)
                if len(new) == cfg.max_new_tokens:
                    return new, stats
