"""Demo stage: post-training. SFT from the pretrained decoder, then a reward model, DPO, PPO and GRPO
from the SFT model, each scored on the same held-out instructions; and distillation of the pretrained
decoder into a smaller student, against the same student trained without a teacher, with plenty and with few labels
(`distill_study`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import lmforge
from lmforge.config import ModelConfig
from lmforge.data.chat import get_chat_template
from lmforge.data.sft import read_prompts
from lmforge.demo import StageResult, distill_study, dpo_study
from lmforge.demo.training import short_run
from lmforge.eval.instruct import instruct_scores
from lmforge.eval.report import Section, markdown_table, metric_series, plot_series
from lmforge.train.reward import RewardConfig, train_reward_model
from lmforge.train.rl import GRPOConfig, PPOConfig, train_grpo, train_ppo
from lmforge.train.sft import SFTConfig, sft

if TYPE_CHECKING:
    from lmforge.demo import DemoData, DemoPlan


def run(plan: DemoPlan, data: DemoData, pretrained: Path, out_dir: Path, report_dir: Path) -> StageResult:
    """Sections for post-training and distillation; the checkpoint is the student distilled on every train token."""
    files = data.instructions
    steps = plan.post_steps
    runs = out_dir / "post"
    ctx = plan.decoder.max_seq_len  # every stage's examples must fit the decoder's context
    sft(SFTConfig(base=str(pretrained), train_file=str(files["sft_train"]), max_len=ctx,
                  train=short_run(runs / "sft", steps["sft"], 1e-3)))
    sft_dir = runs / "sft"
    _, reward_metrics = train_reward_model(RewardConfig(
        base=str(sft_dir), train_file=str(files["prefs_train"]), eval_file=str(files["prefs_eval"]), max_len=ctx - 1,
        train=short_run(runs / "reward", steps["reward"], 5e-4)))
    dpo_runs = dpo_study.train_both(files, sft_dir, runs, steps["dpo"], ctx)
    dpo_metrics = dpo_runs[dpo_study.RECIPE].held_out
    rl_train = dict(weight_decay=0.0)
    rollouts = dict(policy=str(sft_dir), reward="verifier", prompts=str(files["prompts_train"]), max_new_tokens=48,
                    max_prompt_len=ctx - 48, minibatch_size=plan.rl_prompts)
    ppo = train_ppo(PPOConfig(**rollouts, prompts_per_round=plan.rl_prompts,
                              train=short_run(runs / "ppo", steps["rl"], 5e-5, **rl_train)))
    grpo = train_grpo(GRPOConfig(**rollouts, prompts_per_round=max(1, plan.rl_prompts // 4), group_size=4,
                                 train=short_run(runs / "grpo", steps["rl"], 5e-5, **rl_train)))

    reference, tokenizer = lmforge.load(sft_dir)
    template = get_chat_template("lmforge", tokenizer)
    prompts = read_prompts(files["prompts_eval"], tokenizer, template, ctx - 48).examples
    models = {"base (pretrained)": pretrained, "SFT": sft_dir, "DPO": dpo_runs[dpo_study.RECIPE].path,
              "PPO": ppo.policy_dir, "GRPO": grpo.policy_dir}
    scores = {}
    for name, path in models.items():
        model, _ = lmforge.load(path)
        scores[name] = instruct_scores(model, template, prompts, reference=None if name == "SFT" else reference)
    rows = [(name, f"{s.accuracy:.1%}", f"{s.reward:.3f}", "0 (reference)" if s.kl is None else f"{s.kl:.2f}")
            for name, s in scores.items()]
    plain, _ = lmforge.load(dpo_runs[dpo_study.PLAIN].path)
    dpo_scores = {dpo_study.PLAIN: instruct_scores(plain, template, prompts), dpo_study.RECIPE: scores["DPO"]}

    curves = {name: metric_series(path / "metrics.jsonl", "reward")
              for name, path in (("PPO", runs / "ppo"), ("GRPO", runs / "grpo"))}
    curves = {name: series for name, series in curves.items() if series[0]}
    plot_series(report_dir / "rl_reward.png", "verifier reward of the rollouts", "optimizer step",
                "mean reward per round", curves)

    student = ModelConfig(**{**plan.decoder.model_dump(), **plan.student})
    students = distill_study.train_students(student, pretrained, data.shards_dir, runs, steps["distill"],
                                            steps["distill_few"])
    n_sft, n_pref, n_eval = plan.instruct_examples
    return StageResult([
        Section("Post-training: SFT, reward model, DPO, PPO, GRPO", "\n".join([
            f"From the pretrained decoder: SFT on {n_sft} synthetic conversations ({steps['sft']} steps); then, each "
            f"from the SFT model, a reward model and DPO on {n_pref} preference pairs, PPO and GRPO with the "
            f"programmatic verifier as reward ({steps['rl']} steps each). Scored on {len(prompts)} held-out "
            "instructions: accuracy = share of greedy replies the verifier gives 1.0 (right answer in the asked "
            "format), reward = its mean score (0.5 for a right answer in the wrong format), KL = sequence-level "
            "KL from the SFT model in nats per reply, estimated on sampled replies.", "",
            markdown_table(["model", "instruction accuracy", "verifier reward", "KL from SFT"], rows), "",
            f"Reward model: held-out pairwise accuracy {reward_metrics['pairwise_accuracy']:.1%}. "
            f"DPO ({dpo_study.RECIPE}, compared with plain DPO below): held-out implicit-reward accuracy "
            f"{dpo_metrics['reward_accuracy']:.1%}, margin {dpo_metrics['reward_margin']:.3f}.",
        ]), images=["rl_reward.png"] if curves else []),
        dpo_study.section(scores["SFT"], dpo_runs, dpo_scores, steps["dpo"], report_dir),
        distill_study.section(students, data.shards_dir, student),
    ], students[0].distilled, {**models, "distilled student": students[0].distilled})

