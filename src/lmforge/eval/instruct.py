"""Instruction-following scores of a chat model on held-out prompts: what the post-training report compares.

accuracy: share of greedy replies the verifier scores 1.0 (right answer, format followed); reward: the
verifier's mean score; KL from a reference (the SFT model): E_{y ~ pi}[log pi(y|x) - log pi_ref(y|x)],
estimated on replies sampled from pi at temperature 1 (a Monte-Carlo estimate of the sequence-level KL).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.data.chat import ChatTemplate
from lmforge.data.instructions import verify
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.train.logprobs import sequence_logprob


@dataclass
class InstructScores:
    accuracy: float
    reward: float
    kl: float | None  # nats per reply, against the reference; None without one
    n: int
    correct: list[bool]  # per prompt, in order: whether the verifier gave the greedy reply 1.0 (for paired tests)


@torch.inference_mode()
def instruct_scores(model: nn.Module, template: ChatTemplate, prompts: list[dict], reference: nn.Module | None = None,
                    max_new_tokens: int = 48, kl_samples: int = 1, seed: int = 0) -> InstructScores:
    """Score `model` on `prompts` (each {"prompt_ids", "meta"}, as `lmforge.data.sft.read_prompts` gives)."""
    if not prompts:
        raise ValueError("no prompts to evaluate")
    model.eval()
    tokenizer, stop = template.tokenizer, template.stop_ids
    greedy = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    rewards = []
    for p in prompts:
        reply = generate_ids(model, p["prompt_ids"], greedy, stop)
        rewards.append(verify(p["meta"], tokenizer.decode(reply, skip_special_tokens=True)))
    kl = None
    if reference is not None:
        reference.eval()
        total = 0.0
        for i, p in enumerate(prompts):
            for k in range(kl_samples):
                sampled = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed + i * kl_samples + k)
                reply = generate_ids(model, p["prompt_ids"], sampled, stop)
                ids = torch.tensor([p["prompt_ids"] + reply])
                mask = torch.zeros_like(ids, dtype=torch.bool)
                mask[0, len(p["prompt_ids"]):] = True
                total += float(sequence_logprob(model, ids, mask) - sequence_logprob(reference, ids, mask))
        kl = total / (len(prompts) * kl_samples)
    correct = [r == 1.0 for r in rewards]
    return InstructScores(sum(correct) / len(correct), sum(rewards) / len(rewards), kl, len(prompts), correct)
