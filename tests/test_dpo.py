"""DPO / IPO: the loss against the paper's formulas, implicit rewards, the once-only reference pass, training."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.config import ModelConfig, TrainConfig
from lmforge.data.pairs import stack_pairs
from lmforge.data.sampler import EpochSampler
from lmforge.errors import ConfigError
from lmforge.manifest import CheckpointManifest
from lmforge.model.decoder import DecoderLM
from lmforge.train import dpo
from lmforge.train.dpo import (
    DPOConfig,
    dpo_batch_loss,
    dpo_loss,
    frozen_copy,
    preference_metrics,
    reference_logps,
    with_reference,
)
from lmforge.train.logprobs import sequence_logprob
from lmforge.train.trainer import train
from preference_world import write_preference_world

CFG = ModelConfig(vocab_size=64, max_seq_len=32, n_layer=1, n_head=2, d_model=32)
PAD = 0

# hand-made per-sequence log-probs; the last pair has a log-ratio difference of -200: sigma(beta*h) underflows in fp32
POLICY_CHOSEN = [-10.0, -42.5, -3.0, -7.25, -300.0]
POLICY_REJECTED = [-12.0, -40.0, -3.0, -9.0, -100.0]
REF_CHOSEN = [-11.0, -41.0, -2.0, -7.25, -100.0]
REF_REJECTED = [-11.5, -41.5, -4.0, -8.0, -100.0]


pytestmark = pytest.mark.usefixtures("one_thread")


def by_hand(beta: float, kind: str) -> float:
    """The formulas written out per pair, in Python floats."""
    losses = []
    for pc, pr, rc, rr in zip(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, strict=True):
        h = (pc - rc) - (pr - rr)
        if kind == "sigmoid":  # Rafailov et al. eq. 7: -log sigma(beta * h)
            losses.append(-math.log(1.0 / (1.0 + math.exp(-beta * h))))
        else:  # Azar et al. eq. 17: (h - 1/(2 beta))^2
            losses.append((h - 1.0 / (2.0 * beta)) ** 2)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
def test_dpo_loss_matches_the_formulas(beta: float, kind: str) -> None:
    policy_chosen = torch.tensor(POLICY_CHOSEN, requires_grad=True)
    loss, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen, torch.tensor(POLICY_REJECTED), torch.tensor(REF_CHOSEN), torch.tensor(REF_REJECTED), beta,
        kind)
    assert loss.item() == pytest.approx(by_hand(beta, kind), rel=1e-5)
    # implicit rewards beta * log pi/pi_ref, one per pair, detached
    expected_chosen = [beta * (p - r) for p, r in zip(POLICY_CHOSEN, REF_CHOSEN, strict=True)]
    expected_rejected = [beta * (p - r) for p, r in zip(POLICY_REJECTED, REF_REJECTED, strict=True)]
    assert chosen_rewards.tolist() == pytest.approx(expected_chosen, rel=1e-6, abs=1e-6)
    assert rejected_rewards.tolist() == pytest.approx(expected_rejected, rel=1e-6, abs=1e-6)
    assert not chosen_rewards.requires_grad
    loss.backward()
    assert torch.isfinite(policy_chosen.grad).all()
    if kind == "sigmoid":  # d/d pc of -log sigma(beta h) / B = -beta sigma(-beta h) / B
        h = [(pc - rc) - (pr - rr) for pc, pr, rc, rr in
             zip(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, strict=True)]
        grads = [-beta / (1 + math.exp(beta * x)) / len(h) for x in h]
        assert policy_chosen.grad.tolist() == pytest.approx(grads, rel=1e-5, abs=1e-9)


def test_dpo_loss_rejects_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="kind"):
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), 0.1, "hinge")


def synthetic_pairs(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Stacked pairs: a random prompt, then a chosen reply of tokens 10-19 or a rejected one of tokens 20-29."""
    g = torch.Generator().manual_seed(seed)
    width = 12
    ids = torch.full((2 * n, width), PAD)
    mask = torch.zeros(2 * n, width, dtype=torch.bool)
    for i in range(n):
        prompt = torch.randint(30, 64, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
        for row, low in ((i, 10), (n + i, 20)):
            reply = torch.randint(low, low + 10, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
            ids[row, :len(prompt)] = prompt
            ids[row, len(prompt):len(prompt) + len(reply)] = reply
            mask[row, len(prompt):len(prompt) + len(reply)] = True
    halves = {"ids": ids, "mask": mask, "attention": (ids != PAD).long()}
    return stack_pairs({f"{side}_{k}": v[part] for side, part in (("chosen", slice(0, n)),
                                                                  ("rejected", slice(n, 2 * n)))
                        for k, v in halves.items()}, PAD)


def select(pairs: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
    n = pairs["input_ids"].shape[0] // 2
    both = rows + [n + r for r in rows]
    return {k: v[both] for k, v in pairs.items()}


def test_reference_logps_are_one_pass_over_the_data_and_match_the_policy() -> None:
    torch.manual_seed(0)
    policy = DecoderLM(CFG)
    pairs = synthetic_pairs(10, seed=0)
    batches = [select(pairs, list(range(i, min(i + 4, 10)))) for i in range(0, 10, 4)]
    reference = frozen_copy(policy)
    rows_seen = []
    reference.register_forward_hook(lambda module, args, out: rows_seen.append(args[0].shape[0]))
    ref = reference_logps(reference, batches)
    assert rows_seen == [8, 8, 4]  # each pair once: chosen and rejected rows in one forward per batch
    assert ref.shape == (10, 2) and not ref.is_inference() and not ref.requires_grad
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
    with torch.no_grad():
        direct = sequence_logprob(policy, pairs["input_ids"], pairs["response_mask"])
    assert torch.allclose(ref[:, 0], direct[:10], atol=1e-5) and torch.allclose(ref[:, 1], direct[10:], atol=1e-5)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_a_few_dpo_steps_raise_the_chosen_rejected_margin(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    policy = DecoderLM(CFG)
    pairs, held_out = synthetic_pairs(32, seed=1), synthetic_pairs(32, seed=2)
    reference = frozen_copy(policy)
    calls = []
    reference.register_forward_hook(lambda *_: calls.append(1))
    ref = reference_logps(reference, [select(pairs, list(range(i, i + 8))) for i in range(0, 32, 8)])
    held_ref = reference_logps(reference, [held_out])
    eval_batches = [with_reference(held_out, held_ref)]
    before = preference_metrics(policy, eval_batches, beta=0.1)
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    passes = len(calls)

    cfg = TrainConfig(out_dir=str(tmp_path), batch_size=8, max_steps=15, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                      weight_decay=0.0, save_every=15, log_every=5, device="cpu", progress=False)
    def batch_at(index: int) -> dict[str, torch.Tensor]:
        rows = EpochSampler(32, 8, cfg.seed).batch_ids(index).tolist()
        return with_reference(select(pairs, rows), ref[rows])

    run_config = CheckpointManifest.of_run("dpo", DPOConfig(kind=kind, train=cfg), model=CFG)
    train(policy, cfg, batch_at, partial(dpo_batch_loss, beta=0.1, kind=kind),
          run_config=run_config, perplexity=False)
    assert len(calls) == passes == 5  # training never runs the reference
    after = preference_metrics(policy, eval_batches, beta=0.1)
    assert after["reward_margin"] > before["reward_margin"] + 0.1 and after["reward_accuracy"] > 0.8, after
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "rewards/margin" in r]
    assert [r["step"] for r in logged] == [5, 10, 15]
    assert logged[-1]["rewards/margin"] > logged[0]["rewards/margin"]
    assert logged[-1]["rewards/chosen"] - logged[-1]["rewards/rejected"] == pytest.approx(
        logged[-1]["rewards/margin"], abs=1e-5)
    assert all(r["logps/chosen"] < 0 and r["logps/rejected"] < 0 for r in logged)  # summed log pi(y|x) per reply
    assert after["reward_margin"] == pytest.approx(
        0.1 * (after["chosen_logp_change"] - after["rejected_logp_change"]), abs=1e-5)


def test_the_nll_term_holds_the_chosen_log_probs_up(tmp_path: Path) -> None:
    """The same DPO steps with and without sft_weight: with it, held-out chosen replies end more likely (RPO)."""
    pairs, held_out = synthetic_pairs(32, seed=1), synthetic_pairs(32, seed=2)
    changes = {}
    for sft_weight in (0.0, 1.0):
        torch.manual_seed(0)
        policy = DecoderLM(CFG)
        reference = frozen_copy(policy)
        ref = reference_logps(reference, [pairs])
        eval_batches = [with_reference(held_out, reference_logps(reference, [held_out]))]
        cfg = TrainConfig(out_dir=str(tmp_path / str(sft_weight)), batch_size=8, max_steps=15, lr=3e-3, min_lr=3e-4,
                          warmup_steps=2, weight_decay=0.0, save_every=15, log_every=5, device="cpu", progress=False)

        def batch_at(index: int, ref: torch.Tensor = ref, seed: int = cfg.seed) -> dict[str, torch.Tensor]:
            rows = EpochSampler(32, 8, seed).batch_ids(index).tolist()
            return with_reference(select(pairs, rows), ref[rows])

        train(policy, cfg, batch_at, partial(dpo_batch_loss, beta=0.1, sft_weight=sft_weight),
              run_config=CheckpointManifest.of_run("dpo", DPOConfig(sft_weight=sft_weight, train=cfg), model=CFG),
              perplexity=False)
        changes[sft_weight] = preference_metrics(policy, eval_batches, beta=0.1)["chosen_logp_change"]
        records = [json.loads(line) for line in (tmp_path / str(sft_weight) / "metrics.jsonl").read_text().splitlines()]
        assert ("nll/chosen" in records[-1]) == (sft_weight > 0)
    assert changes[1.0] > changes[0.0] + 0.3, changes


# -- the stage, on JSONL pairs read by lmforge.data.sft ------------------------------------------------


def test_train_dpo_runs_the_reference_once_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    world = write_preference_world(tmp_path, n_train=40, n_eval=20, dropout=0.1)
    forwards: list[tuple[bool, int]] = []  # (during train(), rows) of each reference forward
    training = [False]

    def counting_copy(policy: torch.nn.Module) -> torch.nn.Module:
        reference = frozen_copy(policy)
        reference.register_forward_hook(lambda module, args, out: forwards.append((training[0], args[0].shape[0])))
        return reference

    def marked_train(*args, **kwargs):
        training[0] = True
        try:
            return train(*args, **kwargs)
        finally:
            training[0] = False

    monkeypatch.setattr(dpo, "frozen_copy", counting_copy)
    monkeypatch.setattr(dpo, "train", marked_train)
    cfg = TrainConfig(out_dir=str(tmp_path / "dpo"), batch_size=8, max_steps=20, lr=3e-3, min_lr=3e-4,
                      warmup_steps=2, weight_decay=0.0, eval_every=10, save_every=20, log_every=5, device="cpu",
                      progress=False)
    config = DPOConfig(base=str(world["base"]), train_file=str(world["train"]), eval_file=str(world["eval"]),
                       beta=0.1, max_len=40, train=cfg)
    result, scores = dpo.train_dpo(config)
    assert forwards and not any(during for during, _ in forwards)  # never during training
    assert sum(rows for _, rows in forwards) == 2 * (40 + 20)  # every chosen and rejected sequence, once
    assert scores["reward_margin"] > 0.1 and scores["reward_accuracy"] > 0.8, scores
    records = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "rewards/margin" in r] == [5, 10, 15, 20]
    assert records[-1] == {"step": 20, **{f"eval_{k}": v for k, v in scores.items()}}
    policy, _ = lmforge.load(result.checkpoint)
    assert isinstance(policy, DecoderLM) and policy.cfg.dropout == 0.1  # the saved architecture is the base's
    with pytest.raises(ConfigError, match="max_len=41"):
        dpo.train_dpo(config.model_copy(update={"max_len": 41}))
