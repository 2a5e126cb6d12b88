"""The evaluation stage's LLM judge (RLAIF): the SFT model fine-tuned a few steps into a judge on judging transcripts
of one half of the instructions, scored against the verifier on held-out pairs of the other half (each asked in both
orders; a disagreement between the orders is a tie, counted), then DPO from the SFT model on the pairs the judge
labelled against DPO on the same pairs labelled by the verifier: instruction accuracy with Wilson intervals, McNemar's
exact test between the two, and KL from the SFT model. Starting from the SFT model (it already reads instructions and
the chat format) is what lets a judge this small beat chance in a few steps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import lmforge
from lmforge.data.chat import get_chat_template
from lmforge.data.sft import read_prompts
from lmforge.demo.dpo_study import BETA, LR, SFT_WEIGHT, accuracy_cell
from lmforge.demo.training import short_run
from lmforge.demo.verdicts import paired_accuracy_note
from lmforge.eval.instruct import InstructScores, instruct_scores
from lmforge.eval.judge_study import JudgeStudy, judge_study
from lmforge.eval.report import Section, markdown_table
from lmforge.eval.stats import mcnemar_exact
from lmforge.train.dpo import DPOConfig, train_dpo

if TYPE_CHECKING:
    from lmforge.demo import DemoData, DemoPlan

JUDGE_LR = 1e-3  # the SFT model's own learning rate; 2e-3 (judge_study's default, for a pretrained base) overshoots
LABELS = {"judge": "DPO on the judge's labels", "verifier": "DPO on the verifier's labels"}
REPLY_TOKENS = 48  # as the post-training section scores instructions


@dataclass
class JudgedDPO:
    study: JudgeStudy
    scores: dict[str, InstructScores]  # LABELS key -> scores on the held-out instructions; empty without labels
    steps: int


def run(plan: DemoPlan, data: DemoData, sft_dir: Path, work: Path) -> JudgedDPO:
    sizes = plan.judge
    study = judge_study(sft_dir, plan.world, work, n_train=sizes["train"], n_pairs=sizes["pairs"],
                        steps=sizes["steps"], lr=JUDGE_LR, batch_size=sizes["batch"])
    if study.judge_prefs is None:
        return JudgedDPO(study, {}, sizes["dpo_steps"])
    reference, tokenizer = lmforge.load(sft_dir)
    context = reference.cfg.max_seq_len
    template = get_chat_template("lmforge", tokenizer)
    prompts = read_prompts(data.instructions["prompts_eval"], tokenizer, template, context - REPLY_TOKENS).examples
    scores = {}
    for key, prefs in (("judge", study.judge_prefs), ("verifier", study.verifier_prefs)):
        run_dir = work / f"dpo-{key}"
        train_dpo(DPOConfig(base=str(sft_dir), train_file=str(prefs), max_len=context, beta=BETA, sft_weight=SFT_WEIGHT,
                            train=short_run(run_dir, sizes["dpo_steps"], LR, batch_size=8, weight_decay=0.0)))
        policy, _ = lmforge.load(run_dir)
        scores[key] = instruct_scores(policy, template, prompts, reference=reference, max_new_tokens=REPLY_TOKENS)
    return JudgedDPO(study, scores, sizes["dpo_steps"])


def section(result: JudgedDPO) -> Section:
    study = result.study
    agreement = [("every pair (a tie is not agreement)", study.counts.pairs, study.agreed,
                  _interval_cell(study.agreement, study.interval))]
    if study.decisive_interval is not None:
        agreement.append(("the pairs it labelled", study.decisive, study.agreed,
                          _interval_cell(study.agreed / study.decisive, study.decisive_interval)))
    kinds = "; ".join(f"{kind}: {agreed} of {n} agreed, {ties} ties" for kind, (n, agreed, ties)
                      in study.by_rejection.items())
    body = [
        "The SFT model fine-tuned into a judge on judging transcripts (an instruction, two responses, the verifier's "
        "verdict as \"Better: A\" or \"Better: B\") from one half of the instructions, then asked about held-out pairs "
        "from the other half in both orders (`lmforge judge`): a pair gets a label only when both orders name the same "
        "response; otherwise it is a tie. Agreement with the verifier, with Wilson 95% intervals; the judge is better "
        "than chance only when the interval of its agreement on the pairs it labelled lies above 50%.", "",
        markdown_table(["agreement on", "pairs", "agreed with the verifier", "agreement [95% CI]"], agreement), "",
        study.sentence(), f"By the rejected response's kind: {kinds}.",
    ]
    if not result.scores:
        body += ["", "No pair got a label, so there is no judge-labelled DPO to compare."]
        return Section("LLM judge (RLAIF)", "\n".join(body))
    judge, verifier = result.scores["judge"], result.scores["verifier"]
    test = mcnemar_exact(verifier.correct, judge.correct)
    differ = study.decisive - study.agreed
    rows = [(LABELS[key], f"{study.decisive}", accuracy_cell(s), f"{s.kl:.2f}") for key, s in result.scores.items()]
    body += [
        "", f"DPO from the SFT model on the {study.decisive} pairs the judge labelled, once with its labels and once "
        f"with the verifier's ({differ} labels differ), {result.steps} steps each (the post-training DPO recipe: beta "
        f"{BETA:g}, NLL weight {SFT_WEIGHT:g}, learning rate {LR:g}); scored on the post-training section's "
        f"{judge.n} held-out instructions (accuracy with its Wilson 95% interval; KL from the SFT model in nats per "
        "reply, on sampled replies).", "",
        markdown_table(["model", "training pairs", "instruction accuracy [95% CI]", "KL from SFT"], rows), "",
        paired_accuracy_note(LABELS["judge"], LABELS["verifier"], test, judge.n),
    ]
    return Section("LLM judge (RLAIF)", "\n".join(body))


def _interval_cell(value: float, interval: tuple[float, float]) -> str:
    return f"{value:.1%} [{interval[0]:.1%}, {interval[1]:.1%}]"
