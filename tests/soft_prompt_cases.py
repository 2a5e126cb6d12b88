"""Prefix- and prompt-tuned tiny decoders and the outputs the soft-prompt checkpoints in
`fixtures/soft_prompts` were saved with (logits with and without cache and padding mask, greedy ids)."""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.config import ModelConfig
from lmforge.infer.batched import generate_batch
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.model.decoder import DecoderLM
from lmforge.peft.config import PeftConfig

V = 48
CASES = {
    f"{family}-{name}": (family, cfg)
    for family in ("gpt2", "llama")
    for name, cfg in (("prefix", PeftConfig(method="prefix", prefix_len=3, reparam=False)),
                      ("prefix-reparam", PeftConfig(method="prefix", prefix_len=3, reparam_hidden=8)),
                      ("prompt", PeftConfig(method="prompt", prompt_len=4)))
}


def tiny_model(family: str) -> DecoderLM:
    torch.manual_seed(0)
    kv = 1 if family == "llama" else None  # grouped-query attention
    return DecoderLM(ModelConfig(family=family, vocab_size=V, max_seq_len=24, n_layer=2, n_head=2, n_kv_head=kv,
                                 d_model=16, init_std=0.3)).eval()


def case_ids() -> Tensor:
    return torch.randint(V, (2, 9), generator=torch.Generator().manual_seed(2))


def greedy_prompts() -> list[list[int]]:
    ids = case_ids()
    return [ids[0, :7].tolist(), ids[1, :4].tolist()]


@torch.no_grad()
def compute_outputs(model: DecoderLM) -> dict[str, Tensor]:
    ids = case_ids()
    cache = model.new_cache(2, 9)
    steps = [model(ids[:, :5], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(5, 9)]
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 left-padded
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0, stop_at_eos=False)
    prompts = greedy_prompts()
    return {
        "logits": model(ids),
        "cached_logits": torch.cat(steps, dim=1),
        "masked_logits": model(ids, attention_mask=mask),
        "greedy_ids": torch.tensor([generate_ids(model, p, greedy) for p in prompts]),
        "batched_greedy_ids": torch.tensor(generate_batch(model, prompts, greedy)),
    }
