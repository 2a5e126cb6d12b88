"""Speculative decoding vs plain greedy decoding on the synthetic world: wall clock, acceptance, target forwards.

A target decoder and a draft at least 4x smaller are trained on the synthetic world's token shards (or loaded:
--target / --draft take any lmforge checkpoint sharing one tokenizer), then both decode the world's held-out
prompts (task questions and story openings), greedy, with EOS. Plain `generate_ids` and `speculative_generate`
at each --num-draft are timed in interleaved rounds on the same prompts; the outputs must be identical.

Why the target here is bigger than the demo's 2M-parameter decoder: at that size one forward costs ~0.6 ms of
per-operator overhead whatever its width, so a 1-layer draft costs a quarter of a target step and verifying 5
tokens costs 1.5 steps; speculation cannot pay (the demo's report shows it). It pays when a target step is
dominated by its weights, as for any model worth speeding up.

    python benchmarks/speculative.py                                  # builds the world, trains, measures
    python benchmarks/speculative.py --work-dir runs/bench-spec       # reuses what an earlier run trained
    python benchmarks/speculative.py --target runs/demo/pretrain --draft runs/demo/post/distill-alpha0.5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import lmforge  # noqa: E402
from lmforge.checkpoint import LATEST_FILE  # noqa: E402
from lmforge.config import DataConfig, ModelConfig, PretrainConfig, TrainConfig  # noqa: E402
from lmforge.data.synthetic import EVAL_SETS, eval_sets  # noqa: E402
from lmforge.demo import DemoPlan, demo_plan, prepare_world  # noqa: E402
from lmforge.infer.generate import SamplingConfig, generate_ids  # noqa: E402
from lmforge.infer.layout import column_major_linears  # noqa: E402
from lmforge.infer.speculative import speculative_generate  # noqa: E402
from lmforge.train.distill import DistillConfig, distill  # noqa: E402
from lmforge.train.pretrain import pretrain  # noqa: E402

STORY_OPENINGS = ("One morning,", "In Velmoran, the word for", "Long ago, the people of")


def shape(text: str) -> tuple[int, int, int]:
    try:
        layers, heads, width = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAYERS,HEADS,D_MODEL such as 6,6,384; got {text!r}") from None
    return layers, heads, width


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Speculative vs plain greedy decoding on the synthetic world (wall clock, acceptance rate, "
        "target forwards, identical outputs), with a target and a >= 4x smaller draft trained here or loaded.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench-speculative"),
                   help="where the world, the tokenizer and the trained models go; finished models are reused")
    p.add_argument("--target", type=Path, default=None, help="an lmforge checkpoint to use as the target")
    p.add_argument("--draft", type=Path, default=None, help="an lmforge checkpoint to use as the draft")
    p.add_argument("--target-shape", type=shape, default=(6, 6, 384), help="LAYERS,HEADS,D_MODEL of the target")
    p.add_argument("--draft-shape", type=shape, default=(1, 2, 128), help="LAYERS,HEADS,D_MODEL of the draft")
    p.add_argument("--target-steps", type=int, default=500, help="pretraining steps of the target (batch 16x256)")
    p.add_argument("--draft-steps", type=int, default=600, help="training steps of the draft (batch 16x256)")
    p.add_argument("--draft-alpha", type=float, default=0.9,
                   help="the draft is distilled from the target (weight of the soft term, temperature 1: it learns "
                   "the target's choices, which is what acceptance rewards); 0 trains it on the tokens alone")
    p.add_argument("--num-draft", type=int, nargs="+", default=[2, 4, 6], help="draft tokens per round to time")
    p.add_argument("--min-confidence", type=float, nargs="+", default=[0.0, 0.5],
                   help="speculative_generate's min_confidence values to time (0: always draft --num-draft tokens; "
                   "0.5: end a round after a draft token below 50%% probability)")
    p.add_argument("--new-tokens", type=int, default=64, help="max new tokens per prompt (EOS may stop earlier)")
    p.add_argument("--prompts", type=int, default=4, help="held-out prompts per task set (plus story openings)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median reported)")
    return p.parse_args(argv)


def train_decoder(plan: DemoPlan, data_dir: Path, out: Path, dims: tuple[int, int, int], steps: int,
                  teacher: Path | None = None, alpha: float = 0.0) -> Path:
    """Train a GPT-2-family decoder of `dims` on the world's shards (distilled from `teacher` when given), unless
    `out` already holds one."""
    if (out / LATEST_FILE).exists():
        print(f"reusing {out}")
        return out
    layers, heads, width = dims
    model = ModelConfig(**{**plan.decoder.model_dump(), "n_layer": layers, "n_head": heads, "d_model": width})
    data = DataConfig(dir=str(data_dir / "shards"))
    train = TrainConfig(out_dir=str(out), batch_size=16, max_steps=steps, warmup_steps=max(1, steps // 20),
                        lr=3e-3 if width < 256 else 1.5e-3, precision="bf16", eval_every=steps, save_every=steps,
                        log_every=max(1, steps // 20), eval_batches=4)
    how = f"distilled from {teacher} (alpha {alpha:g})" if teacher and alpha > 0 else "pretrained"
    print(f"training {out.name}: {layers} layers, {heads} heads, d_model {width}, {steps} steps, {how}")
    if teacher is not None and alpha > 0:
        distill(DistillConfig(teacher=str(teacher), student_model=model, alpha=alpha, temperature=1.0, data=data,
                              train=train))
    else:
        pretrain(PretrainConfig(model=model, data=data, train=train))
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    plan = demo_plan(quick=False)
    data_dir = args.work_dir / "data"
    target_dir, draft_dir = args.target, args.draft
    if target_dir is None or draft_dir is None:
        if not (data_dir / "shards" / "index.json").exists():
            print(f"building the synthetic world in {data_dir}")
            prepare_world(plan, data_dir)
        target_dir = target_dir or train_decoder(plan, data_dir, args.work_dir / "target", args.target_shape,
                                                 args.target_steps)
        draft_dir = draft_dir or train_decoder(plan, data_dir, args.work_dir / "draft", args.draft_shape,
                                               args.draft_steps, teacher=target_dir, alpha=args.draft_alpha)
    target, tokenizer = lmforge.load(target_dir)
    draft, _ = lmforge.load(draft_dir)
    column_major_linears(target)  # as `lmforge generate` runs them
    column_major_linears(draft)
    ratio = common.num_params(target) / common.num_params(draft)

    sets = eval_sets(plan.world)
    texts = [ex.prompt for name in EVAL_SETS for ex in sets[name][: args.prompts]] + list(STORY_OPENINGS)
    prompts = [tokenizer.encode(t) for t in texts]
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0)
    eos = tokenizer.eos_id

    plain = [generate_ids(target, p, cfg, eos) for p in prompts]
    n_tokens = sum(len(o) for o in plain)
    variants = [(m, c) for m in args.num_draft for c in args.min_confidence]
    stats = {}
    for m, c in variants:
        runs = [speculative_generate(target, draft, p, cfg, num_draft=m, eos_id=eos, min_confidence=c)
                for p in prompts]
        same = sum(ids == ref for (ids, _), ref in zip(runs, plain, strict=True))
        proposed, accepted = sum(s.proposed for _, s in runs), sum(s.accepted for _, s in runs)
        stats[m, c] = (same, accepted / max(proposed, 1), sum(s.target_forwards for _, s in runs))

    def plain_all() -> None:
        for p in prompts:
            generate_ids(target, p, cfg, eos)

    def spec_all(m: int, c: float):
        return lambda: [speculative_generate(target, draft, p, cfg, num_draft=m, eos_id=eos, min_confidence=c)
                        for p in prompts]

    fns = {"plain": plain_all, **{v: spec_all(*v) for v in variants}}
    with common.OtherLoad() as load:
        t = common.time_alternating(fns, rounds=args.rounds)

    print(f"\nspeculative decoding | target {target_dir} ({common.num_params(target) / 1e6:.2f}M params) | draft "
          f"{draft_dir} ({common.num_params(draft) / 1e6:.2f}M, {ratio:.1f}x fewer) | greedy, EOS on | "
          f"{len(prompts)} held-out prompts, {n_tokens} new tokens in all | {args.rounds} interleaved rounds, medians")
    print(f"machine: {common.machine_line()}")
    base = n_tokens / t["plain"].median
    header = f"{'contender':<40}{'tok/s':>9}{'vs plain':>10}{'accepted':>10}{'target fwds':>13}{'same ids':>10}"
    print(header)
    print("-" * len(header))
    print(f"{'plain greedy (generate_ids)':<40}{common.fmt_rate(base):>9}{'1.00x':>10}{'-':>10}{n_tokens:>13}"
          f"{'-':>10}")
    best = 0.0
    for m, c in variants:
        same, acceptance, forwards = stats[m, c]
        rate = n_tokens / t[m, c].median
        best = max(best, rate / base)
        print(f"{f'speculative, {m} draft tokens, conf >= {c:g}':<40}{common.fmt_rate(rate):>9}{rate / base:>9.2f}x"
              f"{acceptance:>10.0%}{forwards:>13}{f'{same}/{len(prompts)}':>10}")
    print(load.describe())
    identical = all(stats[v][0] == len(prompts) for v in variants)
    verdict = "met" if best >= 1.5 and ratio >= 4 and identical else "MISSED"
    print(f"target: >= 1.5x over plain greedy, draft >= 4x smaller, identical output: best {best:.3f}x, draft "
          f"{ratio:.1f}x smaller, outputs {'identical' if identical else 'DIFFERENT'} -> {verdict}")


if __name__ == "__main__":
    main()
