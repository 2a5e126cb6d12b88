"""`lmforge demo`: the lifecycle end to end on the synthetic world, ending in report/README.md.

world -> tokenizer -> token shards and instruction data, then one module per stage, each returning its report
sections: `decoder` (GPT pretraining, task accuracy, samples), `alignment` (SFT, reward model, DPO, PPO, GRPO,
distillation with plenty and few labels), `inference` (quantisation, speculative decoding), `evaluation` (held-out
perplexity of every checkpoint, base vs SFT on a task file, the lm-eval cross-check, the LLM judge), `serving`
(lmforge serve under load), `peft` (every PEFT method vs full fine-tuning), `families` (BERT masked-LM and T5 span-
corruption pretraining, and pretrained-vs-scratch fine-tuning), `positions` (the positional-encoding study),
`reasoning` (format SFT, prompting methods, ReAct, CodeAct, RAG), `scale` (calculator figures of the demo decoder,
GPT-3 and Llama-65B, a scaling-law fit on a tiny grid, bf16 vs fp32, fp16 with loss scaling). A stage that later
stages build on also returns its checkpoint, and by name the checkpoints to evaluate (`StageResult`); `run_demo` hands
them on, so no stage knows where another writes. Every budget is a step count, so a run takes the same steps on any
machine, and every number in the report is computed by this run.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.config import EncDecConfig, EncoderConfig, ModelConfig
from lmforge.data.instructions import write_instruction_data
from lmforge.data.readers import read_documents
from lmforge.data.shards import ShardIndex, prepare_shards
from lmforge.data.synthetic import WorldConfig, write_corpus
from lmforge.errors import LmforgeError
from lmforge.eval.report import Section, machine_description, write_report
from lmforge.tokenizer import Tokenizer, train_tokenizer

DEMO_MARKER = ".lmforge-demo"  # written into --out-dir, so a later demo may clear it (and nothing else)


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and budgets of one demo run (`demo_plan` picks the full or the --quick one)."""

    world: WorldConfig
    vocab_size: int
    decoder: ModelConfig
    batch_size: int
    decoder_steps: int  # decoder pretraining steps, each batch_size x decoder.max_seq_len tokens
    eval_per_task: int
    encoder: EncoderConfig
    encdec: EncDecConfig
    family_steps: int  # MLM and span-corruption pretraining steps each
    finetune_steps: int
    task_examples: tuple[int, int]  # (train, test) examples per fine-tuning task
    position_steps: int  # per scheme in the positional-encoding study
    position_model: dict[str, int] = field(default_factory=dict)
    position_len: int = 64
    instruct_examples: tuple[int, int, int] = (1000, 400, 100)  # SFT conversations, preference pairs, eval prompts
    post_steps: dict[str, int] = field(default_factory=dict)  # sft, reward, dpo, rl, distill, distill_few, peft
    rl_prompts: int = 16  # prompts per PPO round (GRPO: a quarter of them, 4 samples each)
    student: dict[str, int] = field(default_factory=dict)  # the distillation student's size
    peft_eval: int = 50  # held-out instructions scoring each PEFT method
    speculative_tokens: int = 64
    eval_items: tuple[int, int] = (40, 100)  # evaluation stage: documents per held-out set (perplexity), items per task
    # the LLM judge: judging transcripts, held-out pairs, its SFT steps and batch, and each DPO run's steps
    judge: dict[str, int] = field(default_factory=lambda: dict(train=640, pairs=200, steps=40, batch=16, dpo_steps=16))
    samples: tuple[str, ...] = ("Question: What is the capital of", "One morning,", "Question: A coin is heads up.")
    serve_servers: tuple[str, ...] = ("lmforge", "transformers", "transformers-cb")  # `lmforge.serve.load_test.SERVERS`
    serve_clients: tuple[int, ...] = (1, 8)
    serve_requests: int = 2  # streamed completions each client sends
    serve_tokens: int = 32  # max_tokens of each
    # reasoning stage: format-SFT conversations and steps, held-out items per set of the format data, and the
    # reasoning problems and arithmetic problems asked per set (in-domain, out-of-domain) of those, and the tokens
    # each reasoning reply may take
    reasoning: dict[str, int] = field(default_factory=lambda: dict(
        conversations=1600, sft_steps=200, eval=60, reasoning_per_set=10, agent_per_set=20, new_tokens=80))
    # scale stage: the scaling grid (sizes as D_MODELxLAYERS, steps per token budget, tokens per step), the bf16 vs
    # fp32 pair of runs, and the tiny fp16 run with loss scaling (at most 50 steps: fp16 is very slow on CPUs)
    scaling: dict = field(default_factory=lambda: dict(sizes=("16x1", "32x1", "48x2"), steps=(8, 24, 72), seq_len=64,
                                                       batch_size=8, eval_batches=16))
    precision_run: dict[str, int] = field(default_factory=lambda: dict(
        n_layer=2, n_head=4, d_model=128, seq_len=64, batch_size=16, steps=100))
    fp16_run: dict[str, int] = field(default_factory=lambda: dict(
        d_model=32, seq_len=32, batch_size=4, steps=40, growth_interval=10))


def demo_plan(quick: bool) -> DemoPlan:
    """The full plan's step budgets keep `make demo` within 25 minutes, with 20% to spare, on 2 cores of an AMD
    Zen 4 (bf16 through AVX512-BF16, without AMX), where the decoder trains slowest; the same steps run on every
    CPU."""
    if quick:
        return DemoPlan(
            world=WorldConfig(seed=0, n_documents=2000, n_eval=8), vocab_size=512,
            decoder=ModelConfig(family="gpt2", vocab_size=512, max_seq_len=256, n_layer=2, n_head=2, d_model=64),
            batch_size=8, decoder_steps=200, eval_per_task=4,
            encoder=EncoderConfig(vocab_size=512, max_seq_len=128, n_layer=1, n_head=2, d_model=64),
            encdec=EncDecConfig(vocab_size=512, n_layer=1, n_head=2, head_dim=32, d_model=64, d_ff=128),
            family_steps=20, finetune_steps=20, task_examples=(100, 40), position_steps=10,
            position_model=dict(n_layer=1, n_head=2, d_model=32), position_len=32,
            instruct_examples=(100, 40, 8), peft_eval=4, eval_items=(4, 8),
            judge=dict(train=32, pairs=16, steps=4, batch=8, dpo_steps=2),
            post_steps=dict(sft=20, reward=10, dpo=10, rl=3, distill=10, distill_few=3, peft=6),
            rl_prompts=4, student=dict(n_layer=1, n_head=2, d_model=32),
            serve_servers=("lmforge",), serve_clients=(1, 4), serve_requests=1, serve_tokens=8,
            reasoning=dict(conversations=40, sft_steps=4, eval=3, reasoning_per_set=1, agent_per_set=1, new_tokens=24),
            scaling=dict(sizes=("16x1", "32x1"), steps=(2, 4, 8), seq_len=32, batch_size=4, eval_batches=2),
            precision_run=dict(n_layer=1, n_head=2, d_model=32, seq_len=32, batch_size=4, steps=6),
            fp16_run=dict(d_model=16, seq_len=16, batch_size=2, steps=6, growth_interval=2))
    return DemoPlan(
        world=WorldConfig(seed=0), vocab_size=1024,
        decoder=ModelConfig(family="gpt2", vocab_size=1024, max_seq_len=256, n_layer=4, n_head=6, d_model=192),
        batch_size=16, decoder_steps=1100, eval_per_task=40,
        encoder=EncoderConfig(vocab_size=1024, max_seq_len=128, n_layer=4, n_head=4, d_model=128),
        encdec=EncDecConfig(vocab_size=1024, n_layer=3, n_head=4, head_dim=32, d_model=128, d_ff=512),
        family_steps=300, finetune_steps=300, task_examples=(600, 300), position_steps=300,
        position_model=dict(n_layer=2, n_head=4, d_model=128), position_len=64,
        instruct_examples=(1500, 600, 100),
        post_steps=dict(sft=300, reward=60, dpo=60, rl=40, distill=100, distill_few=66, peft=40),
        rl_prompts=16, student=dict(n_layer=2, n_head=4, d_model=96))


@dataclass
class DemoData:
    """What every stage shares: the world's files, the tokenizer, the token shards and the instruction data, all in
    `dir` (where a stage may add data of its own)."""

    dir: Path
    files: dict[str, Path]
    tokenizer: Tokenizer
    shards: ShardIndex
    shards_dir: Path
    instructions: dict[str, Path]  # SFT conversations, preference pairs, prompts (`write_instruction_data`)


def prepare_world(plan: DemoPlan, data_dir: Path) -> DemoData:
    files = write_corpus(plan.world, data_dir / "world")
    tokenizer = train_tokenizer(read_documents([files["train"]]), plan.vocab_size, show_progress=False)
    tokenizer.save(data_dir / "tokenizer")
    shards = prepare_shards([files["train"]], tokenizer, data_dir / "shards", val_fraction=0.02, progress=False)
    instructions = write_instruction_data(plan.world, data_dir / "instructions", *plan.instruct_examples)
    return DemoData(data_dir, files, tokenizer, shards, data_dir / "shards", instructions)


@dataclass(frozen=True)
class StageResult:
    """A stage's report sections, the checkpoint (run dir) that later stages build on, and the checkpoints it wrote
    that the evaluation stage scores, by their name in the report."""

    sections: list[Section]
    checkpoint: Path | None = None
    checkpoints: dict[str, Path] = field(default_factory=dict)


def fresh_demo_dir(out_dir: Path) -> None:
    """Make `out_dir` an empty, marked demo dir; refuse one that is neither missing, empty nor an earlier demo's."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise LmforgeError(f"--out-dir {out_dir} is an existing file; pass a directory for the demo's files")
        if any(out_dir.iterdir()) and not (out_dir / DEMO_MARKER).is_file():
            raise LmforgeError(f"--out-dir {out_dir} is not empty and was not made by `lmforge demo` (no {DEMO_MARKER} "
                               "in it), and the demo clears its out dir; pass a new or empty directory")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    (out_dir / DEMO_MARKER).write_text("made by `lmforge demo`, which clears this directory on its next run\n")


def run_demo(out_dir: Path, report_dir: Path, quick: bool = False, precision: str = "auto") -> Path:
    from lmforge.demo import (
        alignment,
        decoder,
        evaluation,
        families,
        inference,
        peft,
        positions,
        reasoning,
        scale,
        serving,
    )

    plan = demo_plan(quick)
    t_start = time.perf_counter()
    fresh_demo_dir(out_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    timer = StageTimer(total=11)
    timer.start("the synthetic world: corpus, tokenizer, token shards, instruction data")
    data = prepare_world(plan, out_dir / "data")
    timer.start("decoder (GPT) pretraining, task accuracy, samples")
    pretrained = decoder.run(plan, data, out_dir, report_dir, precision)
    timer.start("post-training: SFT, reward model, DPO, PPO, GRPO; distillation")
    aligned = alignment.run(plan, data, pretrained.checkpoint, out_dir, report_dir)
    timer.start("inference: quantisation, speculative decoding (the distilled student drafts)")
    inferred = inference.run(plan, data, pretrained.checkpoint, aligned.checkpoint, out_dir, report_dir)
    sections = [*pretrained.sections, *aligned.sections, *inferred.sections]
    timer.start("evaluation: held-out perplexity of every checkpoint, base vs SFT on tasks, lm-eval cross-check, "
                "the LLM judge and DPO on its labels")
    checkpoints = {"base (pretrained)": pretrained.checkpoint, **aligned.checkpoints, **inferred.checkpoints}
    sections += evaluation.run(plan, data, checkpoints, pretrained.checkpoint, aligned.checkpoints["SFT"], out_dir)
    timer.start("serving: lmforge serve (and transformers serve) under concurrent clients")
    sections += serving.run(plan, data, pretrained.checkpoint)
    timer.start("parameter-efficient fine-tuning: every method vs full fine-tuning")
    sections += peft.run(plan, data, pretrained.checkpoint, out_dir, report_dir)
    timer.start("encoder (BERT, masked LM) and encoder-decoder (T5, span corruption); fine-tuning")
    sections += families.run(plan, data, out_dir, report_dir)
    timer.start("positional-encoding study")
    sections += positions.run(plan, data, out_dir, report_dir)
    timer.start("reasoning: format SFT; prompting methods, shots, repetition; ReAct, CodeAct, RAG")
    sections += reasoning.run(plan, data, pretrained.checkpoint, out_dir, report_dir)
    timer.start("scale: calculator figures, a tiny scaling-law fit, bf16 vs fp32, fp16 with loss scaling")
    sections += scale.run(plan, data, out_dir, report_dir)
    timer.stop()
    intro = (f"Written by `lmforge demo{' --quick' if quick else ''}` on {time.strftime('%Y-%m-%d %H:%M')} in "
             f"{time.perf_counter() - t_start:.0f} s. Machine: {machine_description()}. "
             "Every number below was computed in this run.")
    path = write_report(report_dir, "lmforge report card", intro, sections)
    print(f"report: {path}")
    return path


class StageTimer:
    """Prints `[i/n] what` as each stage starts and the seconds the previous one took."""

    def __init__(self, total: int) -> None:
        self.total, self.index, self.since = total, 0, 0.0

    def start(self, what: str) -> None:
        self.stop()
        self.index += 1
        self.since = time.perf_counter()
        print(f"[{self.index}/{self.total}] {what}")

    def stop(self) -> None:
        if self.index:
            print(f"      {time.perf_counter() - self.since:.0f} s")
