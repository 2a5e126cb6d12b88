"""The demo's distillation and LLM-judge sections without training: their numbers come from the figures handed in
(per-window losses, judge counts, instruction scores) and their sentences claim a difference only when a paired test
finds one."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import lmforge
from lmforge.config import ModelConfig
from lmforge.data.instructions import write_instruction_data
from lmforge.data.synthetic import WorldConfig, pretraining_documents
from lmforge.demo import demo_plan, rlaif
from lmforge.demo.distill_study import window_losses
from lmforge.demo.verdicts import paired_loss_note
from lmforge.eval.instruct import InstructScores
from lmforge.eval.judge import JudgeCounts
from lmforge.eval.judge_study import JudgeStudy
from lmforge.eval.stats import mcnemar_exact, paired_bootstrap, wilson_interval
from lmforge.model.decoder import DecoderLM
from lmforge.tokenizer import train_tokenizer
from test_demo import num, table

pytestmark = pytest.mark.usefixtures("one_thread")


def test_paired_loss_note_claims_an_effect_only_when_the_bootstrap_finds_one() -> None:
    base = [1.0 + 0.01 * (i % 7) for i in range(80)]
    lower = [x - 0.05 for x in base]  # every window lower: p at its floor
    noisy = [x + (0.02 if i % 2 else -0.021) for i, x in enumerate(base)]
    assert "helped: it lowered" in paired_loss_note("On all tokens", paired_bootstrap(base, lower), 80)
    assert "hurt: it raised" in paired_loss_note("On all tokens", paired_bootstrap(lower, base), 80)
    note = paired_loss_note("On all tokens", paired_bootstrap(base, noisy), 80)
    assert "within noise" in note and "-0.0005 nats per token on 80 windows" in note
    assert "helped" not in note and "hurt" not in note


def test_window_losses_are_each_windows_mean_next_token_nll(tmp_path: Path) -> None:
    tok = train_tokenizer(["a b c d e f g h"] * 20, vocab_size=380, show_progress=False)
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=tok.vocab_size + 8, max_seq_len=8, n_layer=1, n_head=2, d_model=16))
    lmforge.save(model, tok, tmp_path / "m")
    tokens = torch.randint(0, tok.vocab_size, (30,))
    losses = window_losses(tmp_path / "m", tokens, seq_len=8, batch_size=2)
    assert len(losses) == 3  # 30 tokens hold three whole windows of 9; the last 3 tokens are left out
    with torch.no_grad():
        for loss, window in zip(losses, tokens[:27].view(3, 9), strict=True):
            logits = model(window[None, :-1])[0, :, :tok.vocab_size]
            assert loss == pytest.approx(F.cross_entropy(logits, window[1:]).item(), rel=1e-5)


def study(agreed: int, counts: JudgeCounts, prefs: bool = True) -> JudgeStudy:
    decisive = counts.a + counts.b
    path = Path("prefs.jsonl") if prefs else None
    return JudgeStudy(Path("judge"), 40, 4, counts, agreed, wilson_interval(agreed, counts.pairs),
                      wilson_interval(agreed, decisive) if decisive else None, Path("labelled.jsonl"), path, path,
                      Path("all.jsonl"), {"rambling": (counts.pairs, agreed, counts.ties)})


def scores(correct: list[bool], kl: float) -> InstructScores:
    return InstructScores(sum(correct) / len(correct), 0.5, kl, len(correct), correct)


def test_judge_section_reports_agreement_intervals_and_dpo_on_both_labellings() -> None:
    counts = JudgeCounts(pairs=200, a=60, b=52, disagreements=80, unparseable=8)
    judge = [True] * 40 + [False] * 60
    verifier = [True] * 45 + [False] * 55
    body = rlaif.section(rlaif.JudgedDPO(study(105, counts), {"judge": scores(judge, 0.31),
                                                               "verifier": scores(verifier, 0.27)}, 28)).body
    agreement = table(body)
    assert [(num(r["pairs"]), num(r["agreed with the verifier"])) for r in agreement] == [(200, 105), (112, 105)]
    for row, (k, n) in zip(agreement, ((105, 200), (105, 112)), strict=True):
        value, low, high = (num(x) for x in row["agreement [95% CI]"].replace("[", " ").split())
        assert value == pytest.approx(k / n, abs=5e-4)
        assert (low, high) == pytest.approx(wilson_interval(k, n), abs=5e-4)
    assert "better than chance" in body and "no better than chance" not in body
    assert "88 were ties (80 where the two orders disagreed, 8 with an answer naming neither" in body
    dpo = {r["model"]: r for r in table(body, 1)}
    assert list(dpo) == list(rlaif.LABELS.values())
    assert [num(r["training pairs"]) for r in dpo.values()] == [112, 112]
    assert (num(dpo[rlaif.LABELS["judge"]]["KL from SFT"]), num(dpo[rlaif.LABELS["verifier"]]["KL from SFT"])) == (
        0.31, 0.27)
    assert "(7 labels differ)" in body  # 112 labelled, 105 agreed
    test = mcnemar_exact(verifier, judge)
    assert f"within noise ({test.difference:+.1%} on 100 items, p = {test.p_value:.3g}" in body


def test_a_judge_at_chance_says_so_and_one_without_labels_trains_nothing() -> None:
    at_chance = rlaif.section(rlaif.JudgedDPO(study(30, JudgeCounts(pairs=100, a=30, b=28, disagreements=42)),
                                              {"judge": scores([True, False], 0.1),
                                               "verifier": scores([False, True], 0.2)}, 2)).body
    assert "no better than chance (50%)" in at_chance  # 30 of 58 labelled: 51.7%, interval 39.2%-64.1%
    silent = rlaif.section(rlaif.JudgedDPO(study(0, JudgeCounts(pairs=16, disagreements=10, unparseable=6), False),
                                           {}, 2)).body
    assert len(table(silent)) == 1 and "no judge-labelled DPO" in silent and "no better than chance" in silent


def test_rlaif_trains_dpo_on_both_labellings_and_scores_each_on_the_held_out_instructions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`rlaif.run` past the judge (stubbed: judge_study is tested in test_judge.py) on a tiny SFT model."""
    world = WorldConfig(seed=0, n_documents=200, n_eval=4)
    files = write_instruction_data(world, tmp_path / "instructions", 4, 6, 3)
    tok = train_tokenizer(pretraining_documents(world), vocab_size=400, show_progress=False)
    torch.manual_seed(0)
    sft = lmforge.save(DecoderLM(ModelConfig(vocab_size=tok.vocab_size, max_seq_len=256, n_layer=1, n_head=2,
                                             d_model=16)), tok, tmp_path / "sft")
    handed = study(5, JudgeCounts(pairs=6, a=3, b=3))
    handed.judge_prefs = handed.verifier_prefs = files["prefs_train"]
    seen = {}

    def stub(base, world_config, out, **sizes):
        seen.update(base=base, world=world_config, **sizes)
        return handed

    monkeypatch.setattr(rlaif, "judge_study", stub)
    plan = replace(demo_plan(True), world=world, judge=dict(train=8, pairs=6, steps=1, batch=4, dpo_steps=1))
    result = rlaif.run(plan, SimpleNamespace(instructions=files), sft, tmp_path / "judge")
    assert seen == dict(base=sft, world=world, n_train=8, n_pairs=6, steps=1, lr=rlaif.JUDGE_LR, batch_size=4)
    assert list(result.scores) == ["judge", "verifier"] and result.steps == 1
    for key, scored in result.scores.items():
        assert scored.n == 3 and len(scored.correct) == 3 and scored.kl is not None
        assert lmforge.load(tmp_path / "judge" / f"dpo-{key}")[0].cfg.arch == "decoder"
    assert len(table(rlaif.section(result).body, 1)) == 2
