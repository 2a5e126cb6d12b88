"""Reward model: Bradley-Terry loss, last-real-token reading, training to separate pairs, checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import lmforge
from lmforge.checkpoint import load_weights, resolve_checkpoint, write_model_files
from lmforge.config import EncoderConfig, ModelConfig, TrainConfig
from lmforge.data.pairs import stack_pairs
from lmforge.data.sampler import EpochSampler
from lmforge.errors import ConfigError
from lmforge.manifest import CheckpointManifest
from lmforge.model import build_model
from lmforge.model.decoder import DecoderLM
from lmforge.model.value_heads import RewardModel, build_reward_model
from lmforge.train.reward import (
    RewardConfig,
    bradley_terry_loss,
    pairwise_accuracy,
    reward_pair_loss,
    train_reward_model,
)
from lmforge.train.trainer import train
from preference_world import write_preference_world

CFG = ModelConfig(vocab_size=64, max_seq_len=32, n_layer=1, n_head=2, d_model=32)
PAD = 0
GOOD, BAD = range(10, 20), range(20, 30)  # chosen responses use GOOD tokens, rejected ones BAD tokens


pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic_pairs(n: int, seed: int) -> dict[str, torch.Tensor]:
    """`collate_preferences`-style pairs: a shared random prompt, then a GOOD (chosen) or BAD (rejected) reply
    of random length; the two sides are padded to different widths."""
    g = torch.Generator().manual_seed(seed)

    def side(tokens: range, prompts: list[list[int]], width: int) -> dict[str, torch.Tensor]:
        ids = torch.full((n, width), PAD)
        mask = torch.zeros(n, width, dtype=torch.bool)
        attention = torch.zeros(n, width, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            reply = torch.randint(tokens.start, tokens.stop, (int(torch.randint(2, 6, (1,), generator=g)),),
                                  generator=g).tolist()
            row = prompt + reply
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, len(prompt):len(row)] = True
            attention[i, :len(row)] = 1
        return {"ids": ids, "mask": mask, "attention": attention}

    prompts = [torch.randint(30, 64, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    chosen, rejected = side(GOOD, prompts, 12), side(BAD, prompts, 14)
    return {**{f"chosen_{k}": v for k, v in chosen.items()}, **{f"rejected_{k}": v for k, v in rejected.items()}}


def rows_of(pairs: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
    return stack_pairs({k: v[rows] for k, v in pairs.items()}, PAD)


def test_bradley_terry_loss_matches_the_formula_even_when_saturated() -> None:
    chosen = [1.0, -2.0, 0.5, 30.0, -150.0]
    rejected = [0.0, 1.0, 0.5, -50.0, 50.0]  # the last pair is 200 nats wrong: sigma underflows in fp32
    by_hand = sum(math.log1p(math.exp(-(c - r))) for c, r in zip(chosen, rejected, strict=True)) / len(chosen)
    loss = bradley_terry_loss(torch.tensor(chosen), torch.tensor(rejected))
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert bradley_terry_loss(torch.tensor([3.0]), torch.tensor([1.0])).item() == pytest.approx(
        -math.log(1 / (1 + math.exp(-2.0))), rel=1e-6)


def test_stack_pairs_puts_chosen_rows_first_padded_to_one_width() -> None:
    pairs = synthetic_pairs(3, seed=0)
    batch = stack_pairs(pairs, PAD)
    assert batch["input_ids"].shape == batch["response_mask"].shape == batch["attention_mask"].shape == (6, 14)
    assert torch.equal(batch["input_ids"][:3, :12], pairs["chosen_ids"])
    assert torch.equal(batch["input_ids"][3:], pairs["rejected_ids"])
    assert (batch["input_ids"][:3, 12:] == PAD).all() and not batch["response_mask"][:3, 12:].any()
    assert batch["response_mask"].dtype == torch.bool
    assert torch.equal(batch["response_mask"][:3, :12], pairs["chosen_mask"])


def test_reward_is_read_at_the_last_real_token() -> None:
    torch.manual_seed(0)
    model = RewardModel(DecoderLM(CFG)).eval()
    ids = torch.tensor([[5, 6, 7, 8, PAD, PAD], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        rewards = model(ids, mask)
        alone = model(ids[:1, :4])  # the first row without padding, no mask
        # extra right padding, filled with arbitrary tokens, must not matter
        longer = torch.cat([ids, torch.randint(1, 64, (2, 5))], 1)
        padded = model(longer, torch.cat([mask, torch.zeros(2, 5, dtype=torch.long)], 1))
        changed_last = model(torch.tensor([[5, 6, 7, 9]]))
    assert rewards.shape == (2,)
    assert torch.allclose(padded, rewards, atol=1e-5)
    assert torch.allclose(alone, rewards[:1], atol=1e-5)
    assert not torch.allclose(changed_last, rewards[:1], atol=1e-3)  # it does read the last real token


def test_reward_model_learns_to_rank_separable_pairs_and_its_checkpoint_loads(tmp_path: Path) -> None:
    train_pairs, held_out = synthetic_pairs(64, seed=1), synthetic_pairs(64, seed=2)
    held_out_batches = [rows_of(held_out, list(range(i, i + 16))) for i in range(0, 64, 16)]
    torch.manual_seed(0)
    model = build_reward_model(DecoderLM(CFG))
    before = pairwise_accuracy(model, held_out_batches)
    cfg = TrainConfig(out_dir=str(tmp_path / "rm"), batch_size=16, max_steps=40, lr=3e-3, min_lr=3e-4,
                      warmup_steps=5, save_every=40, log_every=10, device="cpu", progress=False)
    run_config = CheckpointManifest.of_run("reward", RewardConfig(train=cfg), model=CFG, task="reward")
    sampler = EpochSampler(64, 16, cfg.seed)
    result = train(model, cfg, lambda i: rows_of(train_pairs, sampler.batch_ids(i).tolist()), reward_pair_loss,
                   run_config=run_config, perplexity=False)
    after = pairwise_accuracy(model, held_out_batches)
    assert after > 0.9 and after > before, (before, after)
    assert model.training  # pairwise_accuracy restores the mode

    ckpt = resolve_checkpoint(result.checkpoint)
    tree = yaml.safe_load((ckpt / "config.yaml").read_text())
    assert tree["task"] == "reward"
    reloaded = build_reward_model(build_model(ModelConfig(**tree["model"])))
    load_weights(reloaded, ckpt)  # strict: every key of backbone.* and score.* must match
    batch = held_out_batches[0]
    with torch.no_grad():
        expected = model.eval()(batch["input_ids"], batch["attention_mask"])
        assert torch.allclose(reloaded.eval()(batch["input_ids"], batch["attention_mask"]), expected, atol=1e-5)


def test_lmforge_load_rebuilds_a_reward_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_reward_model(DecoderLM(CFG)).eval()
    manifest = CheckpointManifest.of_run("reward", RewardConfig(), model=CFG, task="reward")
    write_model_files(tmp_path / "rm", model, None, manifest)
    loaded, _ = lmforge.load(tmp_path / "rm")
    batch = rows_of(synthetic_pairs(4, seed=3), [0, 1, 2, 3])
    assert isinstance(loaded, RewardModel)
    with torch.no_grad():
        assert torch.allclose(loaded(batch["input_ids"], batch["attention_mask"]),
                              model(batch["input_ids"], batch["attention_mask"]), atol=1e-6)


def test_build_reward_model_needs_a_decoder_and_freezes_an_untied_lm_head() -> None:
    with pytest.raises(ConfigError, match="decoder"):
        build_reward_model(build_model(EncoderConfig(vocab_size=64, max_seq_len=32, n_layer=1, n_head=2,
                                                     d_model=32)))
    llama = build_reward_model(DecoderLM(ModelConfig(family="llama", vocab_size=64, max_seq_len=32, n_layer=1,
                                                     n_head=2, d_model=32)))
    assert not llama.backbone.lm_head.weight.requires_grad and llama.backbone.tok_emb.weight.requires_grad
    tied = build_reward_model(DecoderLM(CFG))
    assert all(p.requires_grad for p in tied.parameters())


# -- the stage, on JSONL pairs read by lmforge.data.sft ------------------------------------------------


def test_train_reward_model_stage_reports_held_out_accuracy(tmp_path: Path) -> None:
    world = write_preference_world(tmp_path, n_train=96, n_eval=48)
    with open(world["train"], "a") as f:
        f.write("{not json\n")  # skipped with skip_bad_lines
    cfg = TrainConfig(out_dir=str(tmp_path / "rm"), batch_size=16, max_steps=40, lr=3e-3, min_lr=3e-4,
                      warmup_steps=5, eval_every=20, save_every=40, log_every=10, device="cpu", progress=False)
    config = RewardConfig(base=str(world["base"]), train_file=str(world["train"]), eval_file=str(world["eval"]),
                          max_len=32, skip_bad_lines=True, train=cfg)
    result, scores = train_reward_model(config)
    assert scores["pairwise_accuracy"] > 0.9, scores
    records = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1] == {"step": 40, "eval_pairwise_accuracy": scores["pairwise_accuracy"]}
    assert [r["step"] for r in records if "rewards/accuracy" in r] == [10, 20, 30, 40]
    assert sum("val_loss" in r for r in records) == 2
    assert yaml.safe_load((resolve_checkpoint(result.checkpoint) / "config.yaml").read_text())["task"] == "reward"
    with pytest.raises(ConfigError, match="max_len=40 lets this stage feed 41 tokens"):
        train_reward_model(config.model_copy(update={"max_len": 40}))
