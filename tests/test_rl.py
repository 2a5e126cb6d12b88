"""RL fine-tuning: GAE, group advantages, k3 KL, clipped losses, the batched sampler, PPO and GRPO on a toy task."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.checkpoint import read_manifest, write_model_files
from lmforge.config import ModelConfig, TrainConfig
from lmforge.errors import ConfigError
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.manifest import CheckpointManifest
from lmforge.model.decoder import DecoderLM
from lmforge.model.value_heads import PolicyWithValue, RewardModel
from lmforge.tokenizer import END_OF_TURN, Tokenizer, train_tokenizer
from lmforge.train.reward import RewardConfig
from lmforge.train.rl import (
    GRPOConfig,
    PPOConfig,
    adaptive_kl_coef,
    clipped_surrogate,
    clipped_value_loss,
    gae,
    group_advantages,
    k3_kl,
    kl_penalty_rewards,
    run_grpo,
    run_ppo,
    train_grpo,
    train_ppo,
    whiten,
)
from lmforge.train.rollout import _seed, collect_rollouts, reward_model_reward, sample_responses, verifier_reward

VOCAB, EOS, TARGET = 32, 0, 5


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_policy(seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(ModelConfig(vocab_size=VOCAB, max_seq_len=32, n_layer=1, n_head=2, d_model=32))


# -- GAE ----------------------------------------------------------------------------------------------------
def gae_by_hand(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """A_t = sum_l (gamma lam)^l delta_{t+l}, the value after the last step being 0."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    return [sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) for t in range(n)]


@pytest.mark.parametrize("gamma,lam", [(0.9, 0.95), (1.0, 1.0), (0.99, 0.0), (0.0, 0.7), (1.0, 0.0)])
def test_gae_matches_hand_loop_on_each_rows_response(gamma: float, lam: float) -> None:
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 9, generator=g), torch.randn(3, 9, generator=g)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    spans = [(2, 9), (0, 4), (5, 6)]  # a response to the end, one in the middle, a single token
    for row, (s, e) in enumerate(spans):
        mask[row, s:e] = True
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for row, (s, e) in enumerate(spans):
        want = gae_by_hand(rewards[row, s:e].tolist(), values[row, s:e].tolist(), gamma, lam)
        torch.testing.assert_close(adv[row, s:e], torch.tensor(want), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ret[row, s:e], adv[row, s:e] + values[row, s:e])
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gae_edge_cases_lambda_zero_is_td_error_lambda_one_is_monte_carlo() -> None:
    rewards = torch.tensor([[1.0, 0.0, 2.0, -1.0]])
    values = torch.tensor([[0.5, -0.5, 1.0, 2.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    gamma = 0.9
    adv0, _ = gae(rewards, values, mask, gamma, 0.0)
    next_v = torch.tensor([[-0.5, 1.0, 2.0, 0.0]])
    torch.testing.assert_close(adv0, rewards + gamma * next_v - values)
    adv1, ret1 = gae(rewards, values, mask, gamma, 1.0)
    mc = torch.tensor([[1 + 0.9 ** 2 * 2 - 0.9 ** 3, 0.9 * 2 - 0.9 ** 2, 2 - 0.9, -1.0]])
    torch.testing.assert_close(adv1, mc - values)
    torch.testing.assert_close(ret1, mc)  # lambda = 1: the value targets are the discounted returns


def test_kl_penalty_rewards_and_whitening() -> None:
    logps = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, -0.5, 0.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, 0.0], [0.0, -1.0, 0.0, 0.0]])
    mask = torch.tensor([[False, True, True, False], [False, True, False, False]])
    r = kl_penalty_rewards(logps, ref, torch.tensor([3.0, -2.0]), mask, kl_coef=0.1)
    torch.testing.assert_close(r, torch.tensor([[0.0, -0.05, 0.1 + 3.0, 0.0], [0.0, -0.05 - 2.0, 0.0, 0.0]]))
    w = whiten(torch.tensor([[9.0, 1.0, 2.0, 9.0], [9.0, 3.0, 9.0, 9.0]]), mask)
    torch.testing.assert_close(w[mask].mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(w[mask].var(unbiased=False), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert (w[~mask] == 0).all()


def test_adaptive_kl_controller_moves_towards_target_and_clips_the_error() -> None:
    assert adaptive_kl_coef(0.1, kl=6.6, target=6.0, horizon=100, n_samples=10) == pytest.approx(0.1 * 1.01)
    assert adaptive_kl_coef(0.1, kl=3.0, target=6.0, horizon=100, n_samples=10) == pytest.approx(0.1 * 0.98)
    assert adaptive_kl_coef(0.1, kl=600.0, target=6.0, horizon=100, n_samples=10) == pytest.approx(0.1 * 1.02)


# -- GRPO pieces ------------------------------------------------------------------------------------------
def test_group_advantages_normalise_within_each_group() -> None:
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.2, 0.4, 0.6, 0.8, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(scores, 4, eps=1e-4)
    for g in range(3):
        s = scores[4 * g:4 * g + 4]
        torch.testing.assert_close(adv[4 * g:4 * g + 4], (s - s.mean()) / (s.std() + 1e-4))
    assert adv[0] > 0 > adv[1]
    assert (adv[8:] == 0).all()  # a group that all scored the same teaches nothing


def test_k3_kl_is_nonnegative_zero_for_equal_policies_and_unbiased() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    assert (k3_kl(a, b) >= 0).all()
    assert k3_kl(a, a).abs().max() == 0
    # E_{x ~ pi}[k3] = KL(pi || ref)
    pi = torch.log_softmax(torch.randn(6, generator=g), 0)
    ref = torch.log_softmax(torch.randn(6, generator=g), 0)
    x = torch.multinomial(pi.exp(), 200_000, replacement=True, generator=g)
    exact = (pi.exp() * (pi - ref)).sum()
    assert k3_kl(pi[x], ref[x]).mean() == pytest.approx(exact.item(), rel=0.03)


@pytest.mark.parametrize("adv,ratio,loss,clipped", [
    (2.0, 1.1, -2.0 * 1.1, False),   # inside the range
    (-2.0, 1.1, 2.0 * 1.1, False),
    (2.0, 1.5, -2.0 * 1.2, True),    # good action pushed too far up: capped at 1 + eps
    (2.0, 0.5, -2.0 * 0.5, False),   # good action made less likely: unclipped (pessimistic bound)
    (-2.0, 0.5, 2.0 * 0.8, True),    # bad action pushed too far down: capped at 1 - eps
    (-2.0, 1.5, 2.0 * 1.5, False),   # bad action made more likely: unclipped
])
def test_clipped_surrogate_against_the_formula(adv: float, ratio: float, loss: float, clipped: bool) -> None:
    old = torch.tensor([-1.0])
    logps = (old + math.log(ratio)).requires_grad_(True)
    out, was_clipped = clipped_surrogate(logps, old, torch.tensor([adv]), eps=0.2)
    assert out.item() == pytest.approx(loss, rel=1e-5)
    assert bool(was_clipped) == clipped
    out.sum().backward()
    # a clipped token passes no gradient; an unclipped one d/dlogp (-A * ratio) = -A * ratio
    assert logps.grad.item() == pytest.approx(0.0 if clipped else -adv * ratio, rel=1e-5)


def test_clipped_value_loss_against_the_formula() -> None:
    old = torch.tensor([[0.0, 1.0, 2.0, 5.0]])
    values = torch.tensor([[0.1, 2.0, 1.0, 9.0]])
    returns = torch.tensor([[1.0, 3.0, 0.0, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    # V_clip = [0.1, 1.2, 1.8]; per token max of (V-R)^2, (V_clip-R)^2 = [0.81, 3.24, 3.24]
    want = 0.5 * (0.81 + max(1.0, 3.24) + max(1.0, 3.24)) / 3
    assert clipped_value_loss(values, old, returns, mask, clip=0.2).item() == pytest.approx(want, rel=1e-5)
    assert clipped_value_loss(values, old, returns, mask, clip=100.0).item() == pytest.approx(
        0.5 * (0.81 + 1.0 + 1.0) / 3, rel=1e-5)


# -- sampling ---------------------------------------------------------------------------------------------
def test_sampler_stops_each_row_at_eos_and_is_reproducible() -> None:
    policy = tiny_policy().eval()
    prompt = [3, 4, 5]
    cfg = SamplingConfig(max_new_tokens=16, temperature=1.0, seed=7)
    ids, mask = sample_responses(policy, prompt, 48, cfg, EOS)
    assert ids.shape == mask.shape and ids.shape[0] == 48
    assert (ids[:, :3] == torch.tensor(prompt)).all() and not mask[:, :3].any()
    ended = 0
    for row, m in zip(ids, mask, strict=True):
        resp = row[3:]
        eos = (resp == EOS).nonzero()
        n = int(eos[0]) + 1 if len(eos) else len(resp)
        ended += bool(len(eos))
        assert m[3:3 + n].all() and not m[3 + n:].any()  # the EOS is the last masked token
        assert (resp[n:] == EOS).all()  # padding after it
    assert 0 < ended < 48  # some rows stopped early, others ran to max_new_tokens
    assert ids.shape[1] == 3 + 16  # the longest row sets the width
    again = sample_responses(policy, prompt, 48, cfg, EOS)
    assert torch.equal(ids, again[0]) and torch.equal(mask, again[1])
    other, _ = sample_responses(policy, prompt, 48, SamplingConfig(max_new_tokens=16, temperature=1.0, seed=8), EOS)
    assert other.shape != ids.shape or not torch.equal(other, ids)


def test_sampler_stops_at_any_of_several_stop_ids() -> None:
    policy = tiny_policy().eval()
    ids, mask = sample_responses(policy, [3], 40, SamplingConfig(max_new_tokens=12, temperature=1.0, seed=0), [EOS, 7])
    last = []
    for row, m in zip(ids, mask, strict=True):
        response = row[m].tolist()
        assert all(t not in (EOS, 7) for t in response[:-1])
        last.append(response[-1])
    assert EOS in last and 7 in last


def test_one_row_sampler_matches_generate_ids() -> None:
    policy = tiny_policy(1).eval()
    for seed in range(5):
        cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=seed)
        ids, mask = sample_responses(policy, [1, 2], 1, cfg, EOS)
        response = ids[0, mask[0]].tolist()
        assert response[:-1] + [t for t in response[-1:] if t != EOS] == generate_ids(policy, [1, 2], cfg, EOS)


def test_every_sampled_row_is_generate_ids_with_its_own_seed_in_one_engine_batch() -> None:
    policy = tiny_policy(1).eval()
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=3)
    prompts = [([1, 2], {}), ([4, 5, 6, 7], {})]
    ids, mask, _ = collect_rollouts(policy, prompts, 3, cfg, EOS, 0, lambda p, r, m: 0.0)
    for k, (prompt, _) in enumerate(prompts):
        alone, alone_mask = sample_responses(policy, prompt, 3, replace(cfg, seed=_seed(3, k)), EOS)
        for i in range(3):
            row, response = 3 * k + i, alone[i, alone_mask[i]].tolist()
            assert ids[row, mask[row]].tolist() == response  # the round's rows run together, as each prompt alone
            expected = generate_ids(policy, prompt, replace(cfg, seed=_seed(3, k) + i), EOS)
            assert response[:-1] + [t for t in response[-1:] if t != EOS] == expected


def test_collect_rollouts_pads_prompts_of_different_lengths() -> None:
    policy = tiny_policy().eval()
    prompts = [([1, 2], {"k": 0}), ([1, 2, 3, 4, 5], {"k": 1})]
    seen = []

    def reward(prompt: list[int], response: list[int], meta: dict) -> float:
        seen.append((len(prompt), meta["k"]))
        return float(len(response))

    sampling = SamplingConfig(max_new_tokens=4, temperature=1.0, seed=0)
    ids, mask, scores = collect_rollouts(policy, prompts, 3, sampling, None, 0, reward)
    assert ids.shape == (6, 9) and seen == [(2, 0)] * 3 + [(5, 1)] * 3
    assert mask[:3, 2:6].all() and not mask[:3, 6:].any() and mask[3:, 5:].all()
    assert scores.tolist() == [4.0] * 6


def test_policy_with_value_wraps_the_policy() -> None:
    policy = tiny_policy()
    model = PolicyWithValue(policy)
    ids = torch.randint(0, VOCAB, (2, 7))
    logits, values = model(ids)
    torch.testing.assert_close(logits, policy(ids))
    assert values.shape == (2, 7) and (values == 0).all()


# -- end to end on a toy task -----------------------------------------------------------------------------
def target_fraction(prompt: list[int], response: list[int], meta: dict) -> float:
    return sum(t == TARGET for t in response) / max(len(response), 1)


PROMPTS = [([1, 2, 3], {}), ([4, 6], {})]


def toy_train(out: Path, steps: int) -> TrainConfig:
    return TrainConfig(out_dir=str(out), max_steps=steps, lr=1e-2, min_lr=1e-2, warmup_steps=0, weight_decay=0.0,
                       save_every=steps, log_every=1, device="cpu", progress=False)


def check_run(result, out: Path) -> list[dict]:
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in records if "reward" in r]
    assert len(rl) == result.train.step
    assert result.rewards[0] < 0.2 and sum(result.rewards[-3:]) / 3 > 0.5, result.rewards
    assert rl[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    assert all(math.isfinite(r["kl"]) for r in rl) and rl[-1]["kl"] > 0
    assert all({"entropy", "clip_frac", "response_length"} <= set(r) for r in rl)
    reloaded, _ = lmforge.load(result.policy_dir)
    assert isinstance(reloaded, DecoderLM)
    return rl


def test_ppo_raises_the_reward_on_the_toy_task(tmp_path: Path) -> None:
    cfg = PPOConfig(max_new_tokens=8, prompts_per_round=2, samples_per_prompt=8, ppo_epochs=2, minibatch_size=8,
                    kl_coef=0.01, vf_coef=0.5, train=toy_train(tmp_path, 40))
    policy = tiny_policy()
    result = run_ppo(policy, PROMPTS, target_fraction, cfg, eos_id=EOS)
    rl = check_run(result, tmp_path)
    assert all("value_loss" in r and "kl_coef" in r for r in rl)
    ids = torch.tensor([[1, 2, 3, TARGET]])
    torch.testing.assert_close(lmforge.load(result.policy_dir)[0](ids), policy(ids))


def test_ppo_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    cfg = PPOConfig(max_new_tokens=4, prompts_per_round=2, samples_per_prompt=2, ppo_epochs=1, minibatch_size=2,
                    train=toy_train(tmp_path, 3).model_copy(update={"save_every": 2}))
    run_ppo(tiny_policy(), PROMPTS, target_fraction, cfg, eos_id=EOS)
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    (tmp_path / "latest").write_text("checkpoints/step_00000002\n")  # as if killed after step 2
    result = run_ppo(tiny_policy(seed=1), PROMPTS, target_fraction, cfg, eos_id=EOS, resume=True)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if "reward" in ln]
    assert result.train.step == 3 and steps == [1, 2, 3]
    assert ckpt.is_dir() and len(result.rewards) == 1  # one round sampled after resuming


def test_grpo_raises_the_reward_on_the_toy_task(tmp_path: Path) -> None:
    cfg = GRPOConfig(max_new_tokens=8, prompts_per_round=2, group_size=8, ppo_epochs=1, minibatch_size=16,
                     beta=0.04, train=toy_train(tmp_path, 25))
    result = run_grpo(tiny_policy(), PROMPTS, target_fraction, cfg, eos_id=EOS)
    check_run(result, tmp_path)


# -- the stages, from files: SFT-style checkpoint, chat-rendered prompts, verifier or reward model ----------
QUESTIONS = [("What is 3 plus 4?", "7"), ("What is 2 plus 2?", "4"), ("What is 5 plus 1?", "6")]


@pytest.fixture(scope="module")
def stage_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rl_stage")
    texts = [f"{q} The answer is {a}." for q, a in QUESTIONS] * 20
    tokenizer = train_tokenizer(texts, vocab_size=400, show_progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.backend.get_vocab_size(), max_seq_len=64, n_layer=1, n_head=2, d_model=32)
    lmforge.save(DecoderLM(cfg), tokenizer, root / "sft")
    reward_model = RewardModel(DecoderLM(cfg))
    write_model_files(root / "rm", reward_model, tokenizer,
                      CheckpointManifest.of_run("reward", RewardConfig(), model=cfg, task="reward"))
    lines = [{"prompt": [{"role": "user", "content": q + " Answer with just the number."}],
              "meta": {"format": "number", "answer": a}} for q, a in QUESTIONS]
    (root / "prompts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {"sft": root / "sft", "rm": root / "rm", "prompts": root / "prompts.jsonl"}


def test_verifier_reward_decodes_the_reply_without_its_end_of_turn(stage_files: dict[str, Path]) -> None:
    tokenizer = Tokenizer.from_file(stage_files["sft"])
    reward = verifier_reward(tokenizer)
    end = tokenizer.token_id(END_OF_TURN)
    meta = {"format": "number", "answer": "7"}
    assert reward([1], tokenizer.encode("7") + [end], meta) == 1.0
    assert reward([1], tokenizer.encode("The answer is 7.") + [end], meta) == 0.5  # right, but not the format
    assert reward([1], tokenizer.encode("8") + [end], meta) == 0.0


def test_reward_model_reward_scores_prompt_and_response(stage_files: dict[str, Path]) -> None:
    reward_model, _ = lmforge.load(stage_files["rm"])
    assert isinstance(reward_model, RewardModel)
    reward = reward_model_reward(reward_model)
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    assert reward([1, 5], [9, 12, 3], {}) == pytest.approx(reward_model(ids).item())
    assert reward([1, 5], [9, 12, 4], {}) != pytest.approx(reward_model(ids).item())


def stage_train(out: Path) -> dict:
    return {"out_dir": str(out), "max_steps": 2, "save_every": 2, "device": "cpu", "progress": False}


def test_grpo_stage_with_the_verifier(stage_files: dict[str, Path], tmp_path: Path) -> None:
    config = GRPOConfig.model_validate({
        "policy": str(stage_files["sft"]), "prompts": str(stage_files["prompts"]), "max_prompt_len": 40,
        "max_new_tokens": 6, "prompts_per_round": 2, "group_size": 2, "minibatch_size": 4,
        "train": stage_train(tmp_path)})
    result = train_grpo(config)
    assert result.train.step == 2 and all(0.0 <= r <= 1.0 for r in result.rewards)
    model, tokenizer = lmforge.load(result.policy_dir)
    assert isinstance(model, DecoderLM) and tokenizer is not None
    assert isinstance(lmforge.load(tmp_path)[0], DecoderLM)  # GRPO's training checkpoints load as the policy


def test_ppo_stage_with_a_reward_model(stage_files: dict[str, Path], tmp_path: Path) -> None:
    config = PPOConfig.model_validate({
        "policy": str(stage_files["sft"]), "reward": str(stage_files["rm"]), "prompts": str(stage_files["prompts"]),
        "max_prompt_len": 40, "max_new_tokens": 6, "prompts_per_round": 2, "ppo_epochs": 1, "minibatch_size": 2,
        "adaptive_kl": True, "train": {**stage_train(tmp_path), "log_every": 1}})  # RL metrics on every step
    result = train_ppo(config)
    assert result.train.step == 2 and len(result.rewards) == 2  # 2 rollouts per round, minibatches of 2
    records = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    coefs = [r["kl_coef"] for r in records if "kl_coef" in r]
    assert coefs[0] == 0.05 and coefs[1] < coefs[0]  # KL 0 < target: the adaptive controller lowers it
    assert isinstance(lmforge.load(result.policy_dir)[0], DecoderLM)
    # the policy records its chat template, which `lmforge export` carries into the Hugging Face dir
    manifest = read_manifest(result.policy_dir)
    assert (manifest.stage, manifest.run["template"], manifest.base) == ("ppo", "lmforge", str(stage_files["sft"]))


def test_stage_rejects_prompts_and_replies_longer_than_the_context(stage_files: dict[str, Path]) -> None:
    config = GRPOConfig(policy=str(stage_files["sft"]), prompts=str(stage_files["prompts"]), max_prompt_len=40,
                        max_new_tokens=30)
    with pytest.raises(ConfigError, match="max_seq_len=64"):
        train_grpo(config)
    with pytest.raises(ConfigError, match="--policy"):
        train_ppo(PPOConfig(prompts=str(stage_files["prompts"])))


def test_reward_model_with_another_tokenizer_is_refused(stage_files: dict[str, Path], tmp_path: Path) -> None:
    other = train_tokenizer(["a different corpus entirely, with other merges"] * 30, vocab_size=400,
                            show_progress=False)
    reward_model, _ = lmforge.load(stage_files["rm"])
    write_model_files(tmp_path / "rm", reward_model, other,
                      CheckpointManifest.of_run("reward", RewardConfig(), model=reward_model.backbone.cfg,
                                                task="reward"))
    config = PPOConfig(policy=str(stage_files["sft"]), reward=str(tmp_path / "rm"), prompts=str(stage_files["prompts"]),
                       max_prompt_len=40, max_new_tokens=6)
    with pytest.raises(ConfigError, match=r"reward model scoring this policy needs one tokenizer.*sft.*rm"):
        train_ppo(config)
