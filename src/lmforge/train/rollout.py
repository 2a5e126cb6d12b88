"""Rollouts for RL fine-tuning: several responses to each prompt, sampled on the shared decode engine, and rewards.

A rollout batch is right-padded `input_ids` [N, T] (prompt, response, padding) with a `response_mask`
[N, T] that is True exactly on the tokens the policy wrote, the closing stop token (EOS or a chat template's
end of turn) included, as SFT's assistant mask marks it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.infer.decoding import StopIds, fit_prompt, stop_id_set
from lmforge.infer.engine import Engine, GenerationRequest
from lmforge.infer.generate import SamplingConfig
from lmforge.model.decoder import DecoderLM
from lmforge.model.heads import last_token_index
from lmforge.tokenizer import Tokenizer
from lmforge.train.logprobs import token_logprobs
from lmforge.train.loss import log_dtype
from lmforge.train.trainer import Batch

Prompt = tuple[list[int], dict[str, Any]]  # prompt token ids, task metadata for the verifier
# reward of one sample: (prompt ids, response ids as written (closing stop token included), metadata) -> float
RewardFn = Callable[[list[int], list[int], dict[str, Any]], float]


def _seed(*parts: int) -> int:
    """A seed derived from several integers (e.g. the run's seed and a round index)."""
    return int(np.random.default_rng(list(parts)).integers(2**62))


@torch.inference_mode()
def sample_responses(policy: DecoderLM, prompt_ids: Sequence[int], n: int, sampling: SamplingConfig,
                     eos_id: StopIds) -> tuple[Tensor, Tensor]:
    """Sample `n` responses to one prompt as rows of the shared decode engine: (ids [n, T], response_mask [n, T]).

    Each row stops at its first `eos_id` (one id or several stop ids; kept, and masked in); positions after
    it hold padding (the first stop id), masked out. T is the prompt length plus the longest response. Row i
    draws with its own generator seeded `sampling.seed + i` (row 0 samples as `generate_ids` does with
    `sampling.seed`), so the draw is reproducible; stop strings are not applied."""
    return _sample_blocks(policy, [list(prompt_ids)], n, sampling, [sampling.seed], eos_id)[0]


def _sample_blocks(policy: DecoderLM, prompts: Sequence[list[int]], n: int, sampling: SamplingConfig,
                   seeds: Sequence[int | None], eos_id: StopIds) -> list[tuple[Tensor, Tensor]]:
    """`n` rows for each prompt, all requests of one engine run; prompt k's row i seeded seeds[k] + i. One
    (ids, response_mask) block per prompt, as `sample_responses` describes."""
    sampling.validate()
    engine = Engine(policy, max_batch=len(prompts) * n)
    max_new = sampling.max_new_tokens
    prompts = [fit_prompt(p, engine.context, max_new, sampling.truncate_prompt) for p in prompts]
    stops = stop_id_set(eos_id, sampling.stop_at_eos)
    pad = next(iter([eos_id] if isinstance(eos_id, int) else eos_id or []), 0)
    rows = {engine.submit(GenerationRequest(prompt, max_new, temperature=sampling.temperature, top_p=sampling.top_p,
                                            top_k=sampling.top_k, seed=None if seed is None else seed + i,
                                            stop_ids=stops)): []
            for prompt, seed in zip(prompts, seeds, strict=True) for i in range(n)}
    while engine.has_work:
        for event in engine.step():
            rows[event.request_id] += [t for t in (event.token_id, event.stop_id) if t is not None]
    responses = list(rows.values())
    device = policy.device
    blocks = []
    for k, prompt in enumerate(prompts):
        block = responses[k * n:(k + 1) * n]
        P, width = len(prompt), max(len(r) for r in block)
        ids = torch.full((n, P + width), pad, dtype=torch.long, device=device)
        ids[:, :P] = torch.tensor(prompt, device=device)
        mask = torch.zeros(n, P + width, dtype=torch.bool, device=device)
        for i, response in enumerate(block):
            ids[i, P:P + len(response)] = torch.tensor(response, device=device)
            mask[i, P:P + len(response)] = True
        blocks.append((ids, mask))
    return blocks


def right_pad(rows: Sequence[tuple[Tensor, Tensor]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Stack (ids [n_i, T_i], mask [n_i, T_i]) blocks into one right-padded batch [sum n_i, max T_i]."""
    T = max(ids.shape[1] for ids, _ in rows)
    ids = torch.cat([F.pad(i, (0, T - i.shape[1]), value=pad_id) for i, _ in rows])
    mask = torch.cat([F.pad(m, (0, T - m.shape[1]), value=False) for _, m in rows])
    return ids, mask


def collect_rollouts(policy: DecoderLM, prompts: Sequence[Prompt], n: int, sampling: SamplingConfig,
                     eos_id: StopIds, pad_id: int,
                     reward_fn: RewardFn) -> tuple[Tensor, Tensor, Tensor]:
    """`n` samples of each prompt (rows grouped by prompt) and their rewards: (ids, response_mask, scores [N]).

    Every row of the round runs in one engine batch; prompt k's rows are seeded from f(sampling.seed, k) as
    `sample_responses` seeds them, so a round is reproducible from one seed."""
    seeds = [None if sampling.seed is None else _seed(sampling.seed, k) for k in range(len(prompts))]
    blocks = _sample_blocks(policy, [list(p) for p, _ in prompts], n, sampling, seeds, eos_id)
    scores = [float(reward_fn(prompt, row[m].tolist(), meta))
              for (prompt, meta), (ids, mask) in zip(prompts, blocks, strict=True)
              for row, m in zip(ids, mask, strict=True)]
    ids, mask = right_pad(blocks, pad_id)
    return ids, mask, torch.tensor(scores, device=ids.device)


def verifier_reward(tokenizer: Tokenizer) -> RewardFn:
    """Reward = `lmforge.data.instructions.verify(meta, response text)` in [0, 1] (a programmatic check); the
    text is decoded without special tokens (the closing end of turn)."""
    from lmforge.data.instructions import verify

    def reward(prompt: list[int], response: list[int], meta: dict[str, Any]) -> float:
        return float(verify(meta, tokenizer.decode(response, skip_special_tokens=True)))

    return reward


def reward_model_reward(reward_model: nn.Module) -> RewardFn:
    """Reward = a trained reward model's score of prompt + response (Ouyang et al. 2022, sec. 3.5); the closing
    stop token is part of the response, as in the rendered pairs the reward model was trained on."""

    @torch.inference_mode()
    def reward(prompt: list[int], response: list[int], meta: dict[str, Any]) -> float:
        device = next(reward_model.parameters()).device
        ids = torch.tensor([prompt + response], device=device)
        return float(reward_model(ids, torch.ones_like(ids))[0])

    return reward


# -- the shared trainer glue: rounds of rollouts served as minibatches ----------------------------------
ROUND_PREFIX = "round/"


def round_columns(stats: dict[str, float], rows: int, device: torch.device) -> Batch:
    """A rollout round's statistics (mean reward, KL, ...) as batch columns, each value repeated on every row, so
    every minibatch of the round carries them to the loss function, which reports them (`round_metrics`)."""
    return {ROUND_PREFIX + key: torch.full((rows,), float(value), dtype=log_dtype(device), device=device)
            for key, value in stats.items()}


def round_metrics(batch: Batch) -> dict[str, Tensor]:
    """The round statistics a minibatch carries (`round_columns`), as the loss function's metrics."""
    return {key.removeprefix(ROUND_PREFIX): value[0] for key, value in batch.items() if key.startswith(ROUND_PREFIX)}


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run a block with `model` in eval mode (no dropout), restoring its mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.inference_mode()
def forward_logps(model: torch.nn.Module, ids: Tensor, temperature: float, chunk: int) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs [B, T-1] of ids[:, 1:] (logits / temperature), and values [B, T-1] when the model
    has a value head; in chunks of `chunk` rows."""
    logps, values = [], []
    for rows in ids.split(chunk):
        out = model(rows[:, :-1])
        logits, value = out if isinstance(out, tuple) else (out, None)
        logps.append(token_logprobs(logits.float() / temperature, rows[:, 1:]))
        values.append(value)
    return torch.cat(logps), None if values[0] is None else torch.cat(values).float()


def rollout_round(policy: DecoderLM, prompts: Sequence[Prompt], reward_fn: RewardFn, round_idx: int, *,
                  prompts_per_round: int, n: int, max_new_tokens: int, temperature: float, seed: int,
                  eos_id: StopIds, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Round `round_idx`: a seeded draw of `prompts_per_round` prompts, `n` samples each from the policy in
    eval mode, and their rewards: (ids, response_mask, scores)."""
    rng = np.random.default_rng([seed, round_idx])
    chosen = rng.choice(len(prompts), size=min(prompts_per_round, len(prompts)), replace=False)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=_seed(seed, round_idx))
    with eval_mode(policy):
        return collect_rollouts(policy, [prompts[i] for i in chosen], n, sampling, eos_id, pad_id, reward_fn)


def minibatch_stream(make_round: Callable[[int], Batch], rows: int, minibatch_size: int, epochs: int,
                     seed: int) -> Callable[[int], Batch]:
    """batch_at(i) for train(): a new round from make_round(r) whenever i enters round r, then `epochs`
    shuffled passes over its rows in minibatches (trimmed to their longest sequence)."""
    per_epoch = math.ceil(rows / minibatch_size)
    state: dict[str, Any] = {"round": None}

    def batch_at(index: int) -> Batch:
        round_idx, k = divmod(index, per_epoch * epochs)
        if state["round"] != round_idx:
            state["round"], state["data"] = round_idx, {key: v.clone() for key, v in make_round(round_idx).items()}
        epoch, j = divmod(k, per_epoch)
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(_seed(seed, round_idx, epoch)))
        data = state["data"]
        pick = order[j * minibatch_size:(j + 1) * minibatch_size].to(data["input_ids"].device)
        T = data["input_ids"].shape[1]
        end = int(last_token_index(data["response_mask"][pick]).max()) + 1
        return {key: v[pick][:, :end - (v.shape[1] < T)] if v.dim() == 2 else v[pick] for key, v in data.items()}

    return batch_at
