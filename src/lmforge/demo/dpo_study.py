"""Post-training's DPO, two ways from the same SFT model on the same pairs: plain DPO (the sigmoid loss alone) and the
demo's recipe, DPO plus the NLL of the chosen replies (RPO, Pang et al. 2024; Llama 3). Plain DPO only widens the
gap between chosen and rejected log-probs, and can do so by lowering both, so its greedy replies can get worse while
its implicit-reward accuracy is high; the NLL term holds the chosen replies up. The report compares both with SFT on
the same held-out instructions (Wilson intervals, McNemar's exact test) and plots their log-prob curves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.demo.training import short_run
from lmforge.demo.verdicts import logp_change_note, paired_accuracy_note
from lmforge.eval.instruct import InstructScores
from lmforge.eval.report import Section, markdown_table, metric_series, plot_series
from lmforge.eval.stats import mcnemar_exact, wilson_interval
from lmforge.train.dpo import DPOConfig, train_dpo

LR, BETA = 1e-4, 0.1
SFT_WEIGHT = 1.0  # the recipe's NLL weight on the chosen replies (RPO's alpha)
PLAIN, RECIPE = "DPO (plain)", f"DPO + NLL on chosen (weight {SFT_WEIGHT:g})"
CURVES_PNG = "dpo_logps.png"


@dataclass
class DPORun:
    path: Path
    held_out: dict[str, float]  # `preference_metrics` on the held-out pairs


def train_both(files: dict[str, Path], sft_dir: Path, runs: Path, steps: int, max_len: int) -> dict[str, DPORun]:
    """{PLAIN, RECIPE}: each trained `steps` steps from `sft_dir`; the recipe's run dir is `runs / "dpo"`."""
    out = {}
    for name, run_dir, sft_weight in ((PLAIN, runs / "dpo-plain", 0.0), (RECIPE, runs / "dpo", SFT_WEIGHT)):
        _, held_out = train_dpo(DPOConfig(
            base=str(sft_dir), train_file=str(files["prefs_train"]), eval_file=str(files["prefs_eval"]),
            max_len=max_len, beta=BETA, sft_weight=sft_weight,
            train=short_run(run_dir, steps, LR, batch_size=8, weight_decay=0.0)))
        out[name] = DPORun(run_dir, held_out)
    return out


def accuracy_cell(scores: InstructScores) -> str:
    low, high = wilson_interval(sum(scores.correct), scores.n)
    return f"{scores.accuracy:.1%} [{low:.1%}, {high:.1%}]"


def section(sft: InstructScores, runs: dict[str, DPORun], scores: dict[str, InstructScores], steps: int,
            report_dir: Path) -> Section:
    """The side-by-side section: `scores` holds each of `runs`' instruction scores on the prompts `sft` was
    scored on, in the same order."""
    rows = [("SFT", accuracy_cell(sft), "(baseline)", "", "", "")]
    notes = []
    for name, run in runs.items():
        test = mcnemar_exact(sft.correct, scores[name].correct)
        held = run.held_out
        rows.append((name, accuracy_cell(scores[name]),
                     f"{test.difference:+.1%} (p = {test.p_value:.3g}; {test.detail['only_a']} items only SFT right, "
                     f"{test.detail['only_b']} only this one)", f"{held['reward_accuracy']:.1%}",
                     f"{held['chosen_logp_change']:+.2f}", f"{held['rejected_logp_change']:+.2f}"))
        notes += [paired_accuracy_note(name, "SFT", test, sft.n),
                  logp_change_note(name, held["chosen_logp_change"], held["rejected_logp_change"])]
    curves = {}  # log pi/pi_ref = implicit reward / beta: the change from SFT, free of the batches' own spread
    for name, run in runs.items():
        for side in ("chosen", "rejected"):
            steps_logged, rewards = metric_series(run.path / "metrics.jsonl", f"rewards/{side}")
            curves[f"{name}: {side}"] = (steps_logged, [r / BETA for r in rewards])
    plot_series(report_dir / CURVES_PNG, "log-prob change from SFT of the training batches' replies",
                "optimizer step", "mean log pi(y|x) - log pi_sft(y|x), nats", curves)
    return Section("DPO: plain vs with the NLL of the chosen replies", "\n".join([
        f"Both from the SFT model, {steps} steps on the same preference pairs (beta {BETA:g}, learning rate {LR:g}); "
        f"the recipe adds {SFT_WEIGHT:g} x the mean NLL per chosen-reply token (trl's loss_type=[\"sigmoid\", "
        "\"sft\"]). Instruction accuracy on the held-out instructions above, with its Wilson 95% interval; the change "
        "from SFT by McNemar's exact test on the same prompts; implicit-reward accuracy and the mean change of the "
        "chosen and rejected replies' log-probs from the SFT model's (nats per reply) on the held-out pairs.", "",
        markdown_table(["model", "instruction accuracy [95% CI]", "vs SFT (paired)", "implicit-reward accuracy",
                        "chosen log-prob change", "rejected log-prob change"], rows), "",
        " ".join(notes),
    ]), images=[CURVES_PNG])
