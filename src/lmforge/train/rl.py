"""RL fine-tuning of a chat policy on the shared trainer: PPO with a value head, and GRPO.

PPO (Schulman et al. 2017) with the RLHF reward shaping of Ziegler et al. 2019 / Ouyang et al. 2022: each
response token earns -kl_coef * (log pi - log pi_ref), the last one also the scalar reward; advantages by
GAE (Schulman et al. 2016). GRPO (Shao et al. 2024, DeepSeekMath): G samples per prompt, each sample's
advantage is its reward normalised within its group, and a k3 KL penalty to the reference; no value head.

Both fit `train()`: `batch_at(i)` samples a fresh rollout round from the current policy whenever i enters a
new round and then serves that round's minibatches (`ppo_epochs` passes); the loss function only calls
the model. Per-step metrics (reward, KL, entropy, clip fraction, value loss, response length) are the loss
function's, which the trainer logs to out_dir/metrics.jsonl (a round's own statistics ride along with its rows,
`round_columns`); "kl" is in nats per response (summed over its tokens, averaged over samples).
Resume restores weights and optimizer, but the interrupted round is sampled again from the resumed policy
(and an adaptive KL coefficient restarts), so RL resume is not bit-exact.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

import lmforge
from lmforge.checkpoint import save as save_checkpoint
from lmforge.config import PeftConfig, StrictModel, TrainConfig
from lmforge.errors import ConfigError
from lmforge.manifest import CheckpointManifest
from lmforge.model.decoder import DecoderLM
from lmforge.model.heads import last_token_index
from lmforge.model.value_heads import PolicyWithValue, RewardModel
from lmforge.peft.config import apply_peft
from lmforge.tokenizer import Tokenizer
from lmforge.train.console import report
from lmforge.train.logprobs import frozen_copy, token_logprobs
from lmforge.train.loss import LossResult
from lmforge.train.rollout import (
    Prompt,
    RewardFn,
    eval_mode,
    forward_logps,
    minibatch_stream,
    reward_model_reward,
    rollout_round,
    round_columns,
    round_metrics,
    verifier_reward,
)
from lmforge.train.stage_setup import load_decoder, pad_id_of
from lmforge.train.trainer import Batch, TrainResult, resolve_device, train


# -- the algorithms, on plain tensors ----------------------------------------------------------------------
def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over the positions where mask is true (over all of them, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """x normalised to zero mean, unit variance over the masked positions (zero elsewhere)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16): (advantages, returns), each [B, T].

    A_t = delta_t + gamma * lam * A_{t+1} with delta_t = r_t + gamma * V_{t+1} - V_t; the episode ends after
    each row's last masked position (V and A are zero past it). Returns are A + V (the value targets)."""
    m = mask.to(values.dtype)
    T = rewards.shape[1]
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        next_m = m[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        next_v = values[:, t + 1] * next_m if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        running = delta + gamma * lam * next_m * running
        advantages[:, t] = running
    return advantages * m, (advantages + values) * m


def kl_penalty_rewards(logps: Tensor, ref_logps: Tensor, scores: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards [B, T] (Ouyang et al. 2022, eq. 2): -kl_coef * (log pi - log pi_ref) on every response
    token, plus the sequence's scalar reward `scores` [B] on its last response token."""
    rewards = -kl_coef * (logps - ref_logps) * mask.to(logps.dtype)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, horizon: int, n_samples: int) -> float:
    """Ziegler et al. 2019, sec. 2.2: e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n / horizon)."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_samples / horizon)


def group_advantages(scores: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """GRPO outcome advantages (Shao et al. 2024, sec. 4.1.2): (r - mean(group)) / (std(group) + eps) for
    scores [N] laid out as consecutive groups of `group_size` samples of one prompt (unbiased std)."""
    groups = scores.view(-1, group_size)
    return ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + eps)).flatten()


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token KL(pi || pi_ref) estimate k3 = exp(ref - pol) - (ref - pol) - 1 (Schulman 2020, "Approximating
    KL divergence"; DeepSeekMath eq. 4): unbiased, and >= 0 everywhere, zero where the two agree."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


def clipped_surrogate(logps: Tensor, old_logps: Tensor, advantages: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """PPO's clipped objective as a per-token loss (Schulman et al. 2017, eq. 7):
    max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)), and where the clipped term is the active one."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps, 1.0 + eps)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float) -> Tensor:
    """0.5 * max((V - R)^2, (V_clip - R)^2) averaged over the mask, V_clip = V_old + clip(V - V_old, +-clip)
    (the value clipping of the PPO reference implementation, OpenAI baselines ppo2)."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask)


def entropy(logits: Tensor) -> Tensor:
    """Entropy of the next-token distribution at each position [..., V] -> [...] (nats)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# -- configs -----------------------------------------------------------------------------------------------
class RLConfig(StrictModel):
    """What PPO and GRPO share: the policy, the reward, the prompts and how they are sampled, and the clipped
    update's minibatches. `reward`: "verifier" (lmforge.data.instructions.verify) or a reward-model checkpoint dir."""

    policy: str = ""  # the SFT checkpoint the policy (and the frozen reference) start from
    reward: str = "verifier"
    prompts: str = ""  # prompts_*.jsonl: {"prompt": [messages], "meta": {...}}
    template: str = "lmforge"  # chat template the prompts are rendered with (as in SFT)
    max_prompt_len: int = Field(192, ge=2)  # prompts must be shorter; plus max_new_tokens it must fit the context
    skip_bad_lines: bool = False
    peft: PeftConfig | None = None  # parameter-efficient RL on the policy (the value head always trains)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)  # log-probs are of the same tempered distribution
    minibatch_size: int = Field(8, ge=1)  # rollouts per micro-batch (train.batch_size is not used)
    clip_eps: float = Field(0.2, gt=0)


class PPOConfig(RLConfig):
    """PPO-RLHF (Ouyang et al. 2022) with a value head and GAE."""

    prompts_per_round: int = Field(16, ge=1)
    samples_per_prompt: int = Field(1, ge=1)
    ppo_epochs: int = Field(4, ge=1)
    value_clip: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    whiten_advantages: bool = True
    kl_coef: float = Field(0.05, ge=0)
    adaptive_kl: bool = False  # Ziegler et al. 2019's proportional controller towards target_kl
    target_kl: float = Field(6.0, gt=0)  # nats per response
    horizon: int = Field(10000, ge=1)
    train: TrainConfig = TrainConfig(out_dir="runs/ppo", max_steps=200, lr=1e-4, min_lr=1e-5, warmup_steps=0,
                                     weight_decay=0.0, save_every=50, log_every=1)


class GRPOConfig(RLConfig):
    """GRPO (Shao et al. 2024): group-relative advantages, no value head."""

    prompts_per_round: int = Field(4, ge=1)
    group_size: int = Field(8, ge=2)  # G samples per prompt
    ppo_epochs: int = Field(1, ge=1)  # mu: passes over each round
    beta: float = Field(0.04, ge=0)  # KL coefficient (DeepSeekMath uses 0.04)
    std_eps: float = Field(1e-4, gt=0)
    train: TrainConfig = TrainConfig(out_dir="runs/grpo", max_steps=200, lr=1e-4, min_lr=1e-5, warmup_steps=0,
                                     weight_decay=0.0, save_every=50, log_every=1)


@dataclass
class RLResult:
    train: TrainResult
    policy_dir: Path  # out_dir/policy: the trained policy, loads with lmforge.load as a DecoderLM
    rewards: list[float]  # mean reward of each rollout round this process sampled


# -- the shared trainer glue -------------------------------------------------------------------------------
def _sampling(cfg: PPOConfig | GRPOConfig) -> dict[str, Any]:
    return {"prompts_per_round": cfg.prompts_per_round, "max_new_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature, "seed": cfg.train.seed}


def _single_process(cfg: PPOConfig | GRPOConfig) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("PPO and GRPO run in a single process; launch them without torchrun")
    if cfg.train.parallel == "fsdp":  # the rollouts decode with the whole policy between optimizer steps
        raise ConfigError("PPO and GRPO run in a single process with the whole model; set train.parallel: ddp "
                          "(the default)")


def _finish(policy: DecoderLM, tokenizer: Tokenizer | None, cfg: PPOConfig | GRPOConfig, run_config: CheckpointManifest,
            result: TrainResult, rewards: list[float]) -> RLResult:
    """Save the policy to out_dir/policy with the run's config (its chat template travels to an export)."""
    policy_dir = save_checkpoint(policy, tokenizer, Path(cfg.train.out_dir) / "policy", run_config=run_config)
    return RLResult(result, policy_dir, rewards)


# -- PPO ---------------------------------------------------------------------------------------------------
def run_ppo(policy: DecoderLM, prompts: Sequence[Prompt], reward_fn: RewardFn, config: PPOConfig, *,
            eos_id: int | Sequence[int] | None, pad_id: int = 0, tokenizer: Tokenizer | None = None,
            resume: bool = False, accept_config_change: bool = False) -> RLResult:
    """PPO-RLHF of `policy` (in place) against a frozen copy of itself; single process."""
    _single_process(config)
    cfg, tc = config, config.train
    model, ref = PolicyWithValue(policy), frozen_copy(policy)
    kl_coef, rewards = [cfg.kl_coef], []

    def make_round(round_idx: int) -> Batch:
        ids, mask, scores = rollout_round(policy, prompts, reward_fn, round_idx, n=cfg.samples_per_prompt,
                                          **_sampling(cfg), eos_id=eos_id, pad_id=pad_id)
        ref.to(ids.device)
        with eval_mode(model):
            old_logps, old_values = forward_logps(model, ids, cfg.temperature, cfg.minibatch_size)
        ref_logps, _ = forward_logps(ref, ids, cfg.temperature, cfg.minibatch_size)
        with torch.inference_mode():
            actions = mask[:, 1:]
            kl = ((old_logps - ref_logps) * actions).sum(1).mean().item()
            token_rewards = kl_penalty_rewards(old_logps, ref_logps, scores, actions, kl_coef[0])
            advantages, returns = gae(token_rewards, old_values * actions, actions, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                advantages = whiten(advantages, actions)
        rewards.append(scores.mean().item())
        stats = {"reward": rewards[-1], "kl": kl, "kl_coef": kl_coef[0],
                 "response_length": actions.sum(1).float().mean().item()}
        if cfg.adaptive_kl:
            kl_coef[0] = adaptive_kl_coef(kl_coef[0], kl, cfg.target_kl, cfg.horizon, len(ids))
        return {"input_ids": ids, "response_mask": mask, "old_logps": old_logps, "old_values": old_values,
                "advantages": advantages, "returns": returns, **round_columns(stats, len(ids), ids.device)}

    def loss_fn(m: torch.nn.Module, batch: Batch) -> LossResult:
        ids, actions = batch["input_ids"], batch["response_mask"][:, 1:]
        logits, values = m(ids[:, :-1])
        logits = logits.float() / cfg.temperature
        logps = token_logprobs(logits, ids[:, 1:])
        per_token, clipped = clipped_surrogate(logps, batch["old_logps"], batch["advantages"], cfg.clip_eps)
        policy_loss = masked_mean(per_token, actions)
        value_loss = clipped_value_loss(values.float(), batch["old_values"], batch["returns"], actions,
                                        cfg.value_clip)
        with torch.no_grad():
            metrics = {"policy_loss": policy_loss, "value_loss": value_loss,
                       "clip_frac": masked_mean(clipped.float(), actions),
                       "entropy": masked_mean(entropy(logits), actions), **round_metrics(batch)}
        tokens = actions.sum()  # both terms are means over the minibatch's response tokens
        return LossResult((policy_loss + cfg.vf_coef * value_loss) * tokens, tokens, metrics)

    rows = min(cfg.prompts_per_round, len(prompts)) * cfg.samples_per_prompt
    batch_at = minibatch_stream(make_round, rows, cfg.minibatch_size, cfg.ppo_epochs, tc.seed)
    run_config = CheckpointManifest.of_run("ppo", cfg, model=policy.cfg, peft=cfg.peft)
    result = train(model, tc, batch_at, loss_fn, run_config=run_config, tokenizer=tokenizer, resume=resume,
                   accept_config_change=accept_config_change, perplexity=False)
    return _finish(policy, tokenizer, cfg, run_config, result, rewards)


# -- GRPO --------------------------------------------------------------------------------------------------
def run_grpo(policy: DecoderLM, prompts: Sequence[Prompt], reward_fn: RewardFn, config: GRPOConfig, *,
             eos_id: int | Sequence[int] | None, pad_id: int = 0, tokenizer: Tokenizer | None = None,
             resume: bool = False, accept_config_change: bool = False) -> RLResult:
    """GRPO of `policy` (in place) against a frozen copy of itself; single process.

    Loss (Shao et al. 2024, eq. 3): mean over samples of the mean over its tokens of the clipped surrogate
    plus beta * k3 KL to the reference."""
    _single_process(config)
    cfg, tc = config, config.train
    ref = frozen_copy(policy)
    rewards: list[float] = []

    def make_round(round_idx: int) -> Batch:
        ids, mask, scores = rollout_round(policy, prompts, reward_fn, round_idx, n=cfg.group_size, **_sampling(cfg),
                                          eos_id=eos_id, pad_id=pad_id)
        ref.to(ids.device)
        with eval_mode(policy):
            old_logps, _ = forward_logps(policy, ids, cfg.temperature, cfg.minibatch_size)
        ref_logps, _ = forward_logps(ref, ids, cfg.temperature, cfg.minibatch_size)
        rewards.append(scores.mean().item())
        stats = {"reward": rewards[-1], "response_length": mask[:, 1:].sum(1).float().mean().item()}
        return {"input_ids": ids, "response_mask": mask, "old_logps": old_logps, "ref_logps": ref_logps,
                "advantages": group_advantages(scores, cfg.group_size, cfg.std_eps),
                **round_columns(stats, len(ids), ids.device)}

    def loss_fn(m: torch.nn.Module, batch: Batch) -> LossResult:
        ids, actions = batch["input_ids"], batch["response_mask"][:, 1:]
        logits = m(ids[:, :-1]).float() / cfg.temperature
        logps = token_logprobs(logits, ids[:, 1:])
        per_token, clipped = clipped_surrogate(logps, batch["old_logps"], batch["advantages"][:, None], cfg.clip_eps)
        kl = k3_kl(logps, batch["ref_logps"])
        per_sample = masked_mean(per_token + cfg.beta * kl, actions, dim=1)
        with torch.no_grad():
            metrics = {"kl": (kl * actions).sum(1).mean(), "clip_frac": masked_mean(clipped.float(), actions),
                       "entropy": masked_mean(entropy(logits), actions), **round_metrics(batch)}
        return LossResult(per_sample.sum(), len(per_sample), metrics)

    rows = min(cfg.prompts_per_round, len(prompts)) * cfg.group_size
    batch_at = minibatch_stream(make_round, rows, cfg.minibatch_size, cfg.ppo_epochs, tc.seed)
    run_config = CheckpointManifest.of_run("grpo", cfg, model=policy.cfg, peft=cfg.peft)
    result = train(policy, tc, batch_at, loss_fn, run_config=run_config, tokenizer=tokenizer, resume=resume,
                   accept_config_change=accept_config_change, perplexity=False)
    return _finish(policy, tokenizer, cfg, run_config, result, rewards)


# -- stages: the SFT policy, the prompts and the reward, from files --------------------------------------
def load_rl_inputs(cfg: PPOConfig | GRPOConfig, stage: str) -> tuple[DecoderLM, Tokenizer, list[Prompt], RewardFn,
                                                                      list[int]]:
    """(policy, tokenizer, prompts, reward function, stop ids) for a PPO/GRPO stage; prompts are rendered with
    the chat template's generation prompt and replies stop at its stop ids (end of turn, EOS)."""
    from lmforge.data.chat import get_chat_template
    from lmforge.data.sft import read_prompts
    from lmforge.tokenizer import require_same_vocab

    if not cfg.policy or not cfg.prompts:
        raise ConfigError(f"{stage} needs an SFT policy (--policy DIR) and prompts (--prompts FILE)")
    policy, tokenizer = load_decoder(cfg.policy, stage)
    if cfg.max_prompt_len - 1 + cfg.max_new_tokens > policy.cfg.max_seq_len:
        raise ConfigError(f"prompts of up to max_prompt_len - 1 = {cfg.max_prompt_len - 1} tokens plus "
                          f"max_new_tokens={cfg.max_new_tokens} exceed {cfg.policy}'s max_seq_len="
                          f"{policy.cfg.max_seq_len}; lower one of them")
    template = get_chat_template(cfg.template, tokenizer, cfg.policy)
    data = read_prompts(cfg.prompts, tokenizer, template, cfg.max_prompt_len, skip_bad_lines=cfg.skip_bad_lines)
    prompts = [(e["prompt_ids"], e["meta"]) for e in data.examples]
    if cfg.reward == "verifier":
        reward_fn = verifier_reward(tokenizer)
    else:
        reward_model, reward_tokenizer = lmforge.load(cfg.reward)
        if not isinstance(reward_model, RewardModel):
            raise ConfigError(f"--reward must be 'verifier' or a reward-model checkpoint; {cfg.reward} holds a "
                              f"{type(reward_model).__name__}")
        if reward_tokenizer is None:
            raise ConfigError(f"{cfg.reward} has no tokenizer.json; it cannot be checked against the policy's")
        require_same_vocab(tokenizer, cfg.policy, reward_tokenizer, cfg.reward, "a reward model scoring this policy")
        reward_fn = reward_model_reward(reward_model.to(resolve_device(cfg.train.device)).eval())
    return policy, tokenizer, prompts, reward_fn, template.stop_ids


def _stage(cfg: PPOConfig | GRPOConfig, stage: str, run: Callable[..., RLResult], resume: bool,
           accept_config_change: bool) -> RLResult:
    policy, tokenizer, prompts, reward_fn, stops = load_rl_inputs(cfg, stage)
    if cfg.peft is not None:  # before the reference copy and the value head: both see the adapted policy
        report(apply_peft(policy, cfg.peft))
    pad_id = pad_id_of(tokenizer)
    return run(policy, prompts, reward_fn, cfg, eos_id=stops, pad_id=pad_id, tokenizer=tokenizer, resume=resume,
               accept_config_change=accept_config_change)


def train_ppo(config: PPOConfig, resume: bool = False, accept_config_change: bool = False) -> RLResult:
    """PPO-RLHF from config.policy on config.prompts; the trained policy is saved to train.out_dir/policy."""
    return _stage(config, "ppo", run_ppo, resume, accept_config_change)


def train_grpo(config: GRPOConfig, resume: bool = False, accept_config_change: bool = False) -> RLResult:
    """GRPO from config.policy on config.prompts; the trained policy is saved to train.out_dir/policy."""
    return _stage(config, "grpo", run_grpo, resume, accept_config_change)
