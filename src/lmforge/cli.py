"""`lmforge VERB ...`: parse arguments, load the config, call one stage. Nothing else lives here."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import ConfigError, LmforgeError


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (the full usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _parser(sub, name: str, help: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_input_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="text files: .txt (one document per file), .jsonl (one per line), .parquet")
    p.add_argument("--text-field", default="text", help="JSONL key / parquet column holding the text (default: text)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip (and count) malformed JSONL lines instead of stopping at the first")


# ---- verbs ------------------------------------------------------------------------------------


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from lmforge.data.readers import read_documents
    from lmforge.io import require_dir_path
    from lmforge.tokenizer import train_tokenizer

    require_dir_path(Path(args.out), "--out")  # before training, which may take minutes
    docs = read_documents(args.input, text_field=args.text_field, skip_bad_lines=args.skip_bad_lines)
    tokenizer = train_tokenizer(docs, args.vocab_size, min_frequency=args.min_frequency)
    docs.require_text()
    path = tokenizer.save(args.out)
    skipped = f", {docs.skipped} bad lines skipped" if docs.skipped else ""
    print(f"trained a {tokenizer.vocab_size}-token byte-level BPE on {docs.documents} documents{skipped} -> {path}")


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from lmforge.data.shards import prepare_shards
    from lmforge.tokenizer import Tokenizer

    index = prepare_shards(args.input, Tokenizer.from_file(args.tokenizer), args.out, text_field=args.text_field,
                           val_fraction=args.val_fraction, seed=args.seed, skip_bad_lines=args.skip_bad_lines)
    skipped = f"; skipped {index.skipped_lines} bad lines" if index.skipped_lines else ""
    print(f"wrote {index.num_tokens['train']:,} train and {index.num_tokens['val']:,} validation tokens "
          f"({index.dtype}) to {args.out}{skipped}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from lmforge.config import PretrainConfig, load_config
    from lmforge.train.pretrain import pretrain

    overrides = args.overrides + ([f"objective={args.objective}"] if args.objective else [])
    config = load_config(PretrainConfig, args.config, overrides)
    result = pretrain(config, resume=args.resume, accept_config_change=args.accept_config_change)
    val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(f"done: step {result.step}, train loss {result.train_loss:.4f}{val}; checkpoint {result.checkpoint}")


# ---- config-driven stages: flags map onto config keys, then `load_config` validates everything ---------------


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one config key (`--train-file X` -> `train_file=X`)."""

    name: str
    help: str
    options: dict = field(default_factory=dict)  # extra add_argument options (type, choices, action, nargs)
    config_key: str | None = None  # default: the flag's name with dashes as underscores

    @property
    def dest(self) -> str:  # argparse's attribute name
        return self.name.removeprefix("--").replace("-", "_")

    @property
    def key(self) -> str:
        return self.config_key or self.dest


@dataclass(frozen=True)
class Stage:
    config: str  # "module:Class" of the stage's pydantic config
    run: str  # "module:function(config, resume, accept_config_change) -> result"
    flags: tuple[Flag, ...]


def _import(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _describe(result: object) -> str:
    """One line for any stage's result: TrainResult, (TrainResult, metrics), or an object with .train/.metrics."""
    metrics: dict = {}
    if isinstance(result, tuple):
        result, metrics = result
    metrics = getattr(result, "metrics", None) or metrics
    if hasattr(result, "rewards") and result.rewards:
        metrics = {**metrics, "mean reward (last round)": result.rewards[-1]}
    train = getattr(result, "train", result)
    scores = "".join(f", {k} {v:.4f}" for k, v in metrics.items())
    return f"done: step {train.step}, train loss {train.train_loss:.4f}{scores}; checkpoint {train.checkpoint}"


def cmd_stage(args: argparse.Namespace) -> None:
    from lmforge.config import load_config

    stage: Stage = args.stage
    overrides = []
    for flag in stage.flags:
        value = getattr(args, flag.dest)
        if value is None or value is False:
            continue
        if value is True:
            value = "true"
        elif isinstance(value, list):
            value = "[" + ",".join(map(str, value)) + "]"
        overrides.append(f"{flag.key}={value}")
    config = load_config(_import(stage.config), args.config, overrides + args.overrides)
    run = _import(stage.run)
    print(_describe(run(config, resume=args.resume, accept_config_change=args.accept_config_change)))


def _add_accept_config_change(p: argparse.ArgumentParser) -> None:
    p.add_argument("--accept-config-change", action="store_true",
                   help="with --resume: continue although the config changed a key that alters the run (lr, model, "
                        "data...); the change is printed and recorded in train.out_dir/config_changes.jsonl")


def _stage_parser(sub, name: str, help: str, example: str, stage: Stage) -> None:
    p = _parser(sub, name, help, example)
    for flag in stage.flags:
        p.add_argument(flag.name, help=flag.help, **flag.options)
    p.add_argument("--config", help="YAML with the same keys (flags win over it; --train.* overrides win over both)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.out_dir")
    _add_accept_config_change(p)
    p.epilog += ("\n\nany config key can be overridden as --key.sub=value, e.g. --train.max_steps=500 "
                 "--train.out_dir=runs/x --train.lr=1e-4")
    p.set_defaults(func=cmd_stage, stage=stage, accepts_overrides=True)


BASE = Flag("--base", "the starting model: lmforge run/checkpoint dir or Hugging Face dir")
TRAIN_FILE = Flag("--train-file", "JSONL training data")
EVAL_FILE = Flag("--eval-file", "JSONL held-out data, scored after training")
TEMPLATE = Flag("--template", "chat template: lmforge | llama2 | alpaca | hf (the base dir's Jinja template)")
MAX_LEN = Flag("--max-len", "longest rendered example in tokens; longer lines are errors", {"type": int})
SKIP = Flag("--skip-bad-lines", "skip (and count) bad JSONL lines instead of stopping", {"action": "store_true"})
PEFT = Flag("--peft", "parameter-efficient method (hyperparameters as --peft.r=16 --peft.targets=[attn.q,mlp] ...)",
            {"choices": ["lora", "dora", "pissa", "qlora", "adapter", "parallel-adapter", "prefix", "prompt", "bitfit",
                         "topk", "svd-diag"]}, config_key="peft.method")
RL_FLAGS = (Flag("--policy", "the SFT checkpoint the policy and the frozen reference start from"),
            Flag("--reward", "'verifier' (the synthetic tasks' checker) or a reward-model checkpoint dir"),
            Flag("--prompts", "JSONL of {prompt, meta} lines (meta feeds the verifier)"),
            TEMPLATE, Flag("--max-new-tokens", "response length limit", {"type": int}),
            Flag("--temperature", "sampling temperature of the rollouts", {"type": float}), PEFT)
STAGES = {
    "finetune": ("fine-tune a pretrained model on a labelled task with a task head",
                 "lmforge finetune --task classify --base runs/bert-tiny --train-file sentiment_train.jsonl "
                 "--eval-file sentiment_test.jsonl --train.max_steps=300",
                 Stage("lmforge.config:FinetuneConfig", "lmforge.train.finetune:finetune", (
                     Flag("--task", "classify: {text,label} lines; tokens: {tokens,tags} (NER-style); span: "
                          "extractive QA {context,question,answer,answer_start}; text2text: {input,target}",
                          {"choices": ["classify", "tokens", "span", "text2text"]}),
                     BASE, TRAIN_FILE, EVAL_FILE,
                     Flag("--labels", "the label set (default: every label in --train-file)", {"nargs": "+"}),
                     MAX_LEN, Flag("--truncate", "cut over-long inputs instead of stopping", {"action": "store_true"}),
                     Flag("--from-scratch", "re-initialise the base's weights (same architecture, untrained: a "
                          "baseline)", {"action": "store_true"}), PEFT))),
    "sft": ("supervised fine-tuning on conversations (loss on assistant tokens only)",
            "lmforge sft --base runs/demo/pretrain --train-file sft_train.jsonl --template lmforge",
            Stage("lmforge.train.sft:SFTConfig", "lmforge.train.sft:sft",
                  (BASE, TRAIN_FILE, EVAL_FILE, TEMPLATE, MAX_LEN, SKIP, PEFT))),
    "reward": ("train a reward model (decoder + scalar head, Bradley-Terry loss) on preference pairs",
               "lmforge reward --base runs/sft --train-file prefs_train.jsonl --eval-file prefs_eval.jsonl",
               Stage("lmforge.train.reward:RewardConfig", "lmforge.train.reward:train_reward_model",
                     (BASE, TRAIN_FILE, EVAL_FILE, TEMPLATE, MAX_LEN, SKIP, PEFT))),
    "dpo": ("direct preference optimisation (DPO, or IPO with --kind ipo) against a frozen reference",
            "lmforge dpo --base runs/sft --train-file prefs_train.jsonl --eval-file prefs_eval.jsonl --beta 0.1",
            Stage("lmforge.train.dpo:DPOConfig", "lmforge.train.dpo:train_dpo", (
                BASE, TRAIN_FILE, EVAL_FILE, Flag("--beta", "KL strength (IPO: margin 1/(2 beta))", {"type": float}),
                Flag("--kind", "sigmoid = DPO, ipo = IPO", {"choices": ["sigmoid", "ipo"]}),
                TEMPLATE, MAX_LEN, SKIP, PEFT))),
    "ppo": ("RLHF with PPO: value head, per-token KL penalty to the reference, GAE, clipped losses",
            "lmforge ppo --policy runs/sft --reward verifier --prompts prompts_train.jsonl --train.max_steps=100",
            Stage("lmforge.train.rl:PPOConfig", "lmforge.train.rl:train_ppo", (
                *RL_FLAGS, Flag("--kl-coef", "per-token KL penalty coefficient", {"type": float}),
                Flag("--adaptive-kl", "adapt the KL coefficient towards --target-kl", {"action": "store_true"}),
                Flag("--target-kl", "target KL (nats per response) of the adaptive controller", {"type": float})))),
    "grpo": ("GRPO: G samples per prompt, group-normalised advantages, KL to the reference, verifier reward",
             "lmforge grpo --policy runs/sft --prompts prompts_train.jsonl --group-size 8 --train.max_steps=100",
             Stage("lmforge.train.rl:GRPOConfig", "lmforge.train.rl:train_grpo", (
                 *RL_FLAGS, Flag("--group-size", "samples per prompt (G)", {"type": int}),
                 Flag("--beta", "KL coefficient", {"type": float})))),
    "distill": ("knowledge distillation: a student learns the teacher's softened distribution and the labels",
                "lmforge distill --teacher runs/demo/pretrain --student_model.n_layer=2 "
                "--data.dir=runs/demo/data/shards",
                Stage("lmforge.train.distill:DistillConfig", "lmforge.train.distill:distill", (
                    Flag("--teacher", "the teacher checkpoint (shares the student's tokenizer)"),
                    Flag("--student", "a student checkpoint (or build one with --student_model.KEY=VALUE)"),
                    Flag("--temperature", "softmax temperature tau (soft loss scaled by tau^2)", {"type": float}),
                    Flag("--alpha", "weight of the soft loss; 1 - alpha on the hard labels", {"type": float}),
                    PEFT))),
}


def _generate_options(args: argparse.Namespace):
    """The SamplingConfig of `lmforge generate`'s options, each option checked (before any model loads)."""
    from lmforge.infer.beam import check_beam_options
    from lmforge.infer.generate import SamplingConfig, require_utf8
    from lmforge.infer.speculative import check_draft_options

    require_utf8(args.prompt, "--prompt")
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, stop=tuple(args.stop), use_cache=not args.no_cache,
                         truncate_prompt=args.truncate_prompt, compile=args.compile)
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {args.num_samples}")
    check_beam_options(args.num_beams, args.length_penalty)
    if args.draft:
        check_draft_options(args.num_draft, args.draft_min_confidence)
    if args.num_beams > 1 and args.draft:
        raise ConfigError("--num-beams and --draft are two ways to decode; choose one")
    if args.num_samples > 1 and (args.num_beams > 1 or args.draft):
        raise ConfigError("--num-samples works with plain decoding, not with --num-beams or --draft (they print "
                          "one output)")
    return cfg


def _write_after(lead: str):
    """sys.stdout.write that puts `lead` (the prompt) before the first text, so that a generation refused at its
    start (a prompt that does not fit the context) prints nothing."""
    pending = [lead]

    def write(text: str) -> None:
        sys.stdout.write((pending.pop() if pending else "") + text)
        sys.stdout.flush()

    return write


def cmd_generate(args: argparse.Namespace) -> None:
    import lmforge
    from lmforge.infer.generate import generate
    from lmforge.infer.layout import column_major_linears

    cfg = _generate_options(args)
    if (args.checkpoint is None) == (args.adapter is None):
        raise LmforgeError("give one model: a checkpoint dir or --adapter DIR (a peft adapter folder)")
    if args.base is not None and args.adapter is None:
        raise LmforgeError("--base is the base model of --adapter DIR; give --adapter too")
    source = args.adapter or args.checkpoint
    model, tokenizer = lmforge.load(source, base=args.base)
    if tokenizer is None:
        raise LmforgeError(f"{source} has no tokenizer.json; generation from text needs one")
    arch = getattr(getattr(model, "cfg", None), "arch", None)
    if arch not in ("decoder", "encdec"):
        raise LmforgeError(f"{source} holds an {arch or type(model).__name__} model, which does not generate "
                           "text; use a decoder (GPT, Llama) or an encoder-decoder (T5)")
    if arch == "encdec":  # T5: the prompt is the encoder's input, the output a new text
        from lmforge.infer.generate_encdec import generate_text2text as generate
    search = args.num_beams > 1 or args.draft
    if search and arch != "decoder":
        raise LmforgeError("--num-beams and --draft work with decoders (GPT, Llama)")
    column_major_linears(model)  # faster small-batch matmuls; generation only reads the weights
    if search:
        print(args.prompt + _search(args, model, tokenizer, cfg))
        return
    for i in range(args.num_samples):
        header = f"--- sample {i + 1}\n" if args.num_samples > 1 else ""
        if args.num_samples > 1:
            cfg.seed = None if args.seed is None else args.seed + i
        write = _write_after(header + (args.prompt if arch == "decoder" else ""))
        text = generate(model, tokenizer, args.prompt, cfg, stream=None if args.no_stream else write)
        write((text if args.no_stream else "") + "\n")


def _refuse_out_over_input(out: str, source: str) -> None:
    """--out must not be the input, nor hold it: the new dir replaces --out whole."""
    if Path(out).resolve() in (Path(source).resolve(), *Path(source).resolve().parents):
        raise ConfigError(f"--out {out} would replace the input {source}, which this command reads; choose another "
                          "--out")


def cmd_merge(args: argparse.Namespace) -> None:
    import lmforge
    from lmforge.checkpoint import read_config_tree, resolve_checkpoint
    from lmforge.config import PeftConfig
    from lmforge.export import export_run
    from lmforge.peft.config import merge_peft

    _refuse_out_over_input(args.out, args.checkpoint)
    ckpt = resolve_checkpoint(args.checkpoint)
    tree = read_config_tree(ckpt)
    if not tree.get("peft"):
        raise LmforgeError(f"{ckpt} was not trained with --peft; there is nothing to merge (to write a Hugging Face "
                           f"dir use: lmforge export {args.checkpoint} --format hf --out DIR)")
    if tree.get("task"):
        raise LmforgeError(f"{ckpt} is a '{tree['task']}' task model; merge folds language-model adapters "
                           "(sft, text2text); keep the task model as it is")
    if args.hf:  # the export carries the run's chat template too
        print(export_run(ckpt, "hf", args.out).note)
        return
    model, tokenizer = lmforge.load(ckpt)
    model = merge_peft(model, PeftConfig.model_validate(tree["peft"]))
    path = lmforge.save(model, tokenizer, args.out)
    print(f"merged {tree['peft']['method']} into the base weights -> {path}")


def cmd_export(args: argparse.Namespace) -> None:
    from lmforge.export import export_run

    _refuse_out_over_input(args.out, args.checkpoint)
    print(export_run(args.checkpoint, args.format, args.out, base_name=args.base_name).note)


def cmd_quantize(args: argparse.Namespace) -> None:
    from lmforge.infer.quantize_stage import quantize_checkpoint

    _refuse_out_over_input(args.out, args.checkpoint)
    path, report = quantize_checkpoint(args.checkpoint, args.out, args.bits, args.group_size,
                                       tied_embedding=not args.keep_fp32_embedding)
    tied = " (with the tied embedding)" if report["tied_embedding"] else ""
    print(f"int{args.bits}: {len(report['modules'])} Linear layers{tied}, {report['bytes_before']:,} -> "
          f"{report['bytes_after']:,} bytes ({report['bytes_before'] / report['bytes_after']:.2f}x smaller) -> {path}")


def _search(args: argparse.Namespace, model, tokenizer, cfg) -> str:
    """Beam search (the best of --num-beams hypotheses) or speculative decoding with a --draft model."""
    import lmforge
    from lmforge.infer.layout import column_major_linears

    ids = tokenizer.encode(args.prompt)
    if args.num_beams > 1:
        from lmforge.infer.beam import beam_search

        (best, score), *_ = beam_search(model, ids, args.num_beams, args.max_new_tokens, tokenizer.eos_id,
                                        length_penalty=args.length_penalty)
        print(f"[beam search, {args.num_beams} beams: score {score:.4f}]", file=sys.stderr)
        return tokenizer.decode(best)
    from lmforge.infer.speculative import speculative_generate

    draft, _ = lmforge.load(args.draft)
    column_major_linears(draft)
    out, stats = speculative_generate(model, draft, ids, cfg, num_draft=args.num_draft, eos_id=tokenizer.eos_id,
                                      min_confidence=args.draft_min_confidence)
    print(f"[speculative: {stats.accepted}/{stats.proposed} draft tokens accepted, {stats.target_forwards} target "
          f"forwards instead of {stats.plain_forwards}]", file=sys.stderr)
    return tokenizer.decode(out)


def cmd_demo(args: argparse.Namespace) -> None:
    from lmforge.demo import run_demo

    run_demo(out_dir=Path(args.out_dir), report_dir=Path(args.report_dir), quick=args.quick,
             precision=args.precision)


# ---- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="lmforge", description="The whole life of a language model.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = _parser(sub, "demo", "run the lifecycle on the built-in synthetic world and write report/README.md",
                "lmforge demo --quick")
    p.add_argument("--quick", action="store_true", help="a tiny run (under 2 minutes) that exercises every stage")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="decoder pretraining precision; auto = bf16 on a CPU with AMX bf16 tiles, else fp32 "
                        "(default: auto)")
    p.add_argument("--out-dir", default="runs/demo",
                   help="scratch dir for data, tokenizer and checkpoints (replaced on each demo run; must be "
                        "missing, empty or an earlier demo's)")
    p.add_argument("--report-dir", default="report", help="where README.md and plots go (default: report)")
    p.set_defaults(func=cmd_demo)

    tok = _parser(sub, "tokenizer", "tokenizer commands", "lmforge tokenizer train --help")
    tok_sub = tok.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = _parser(tok_sub, "train", "train a byte-level BPE tokenizer with lmforge's special tokens reserved",
                "lmforge tokenizer train --input corpus.txt --vocab-size 2048 --out runs/tok")
    _add_input_options(p)
    p.add_argument("--vocab-size", type=int, required=True, help="total vocabulary, special tokens included")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge (default: 2)")
    p.add_argument("--out", required=True, help="directory to write tokenizer.json into")
    p.set_defaults(func=cmd_tokenizer_train)

    data = _parser(sub, "data", "data commands", "lmforge data prepare --help")
    data_sub = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = _parser(data_sub, "prepare", "tokenize text into train/validation token shards (uses all cores)",
                "lmforge data prepare --input corpus.jsonl --tokenizer runs/tok --out runs/data")
    _add_input_options(p)
    p.add_argument("--tokenizer", required=True, help="directory (or file) with tokenizer.json")
    p.add_argument("--out", required=True, help="output directory for train.bin, val.bin, index.json")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (default: 0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default: 0)")
    p.set_defaults(func=cmd_data_prepare)

    p = _parser(sub, "pretrain", "pretrain a decoder-only LM (causal LM objective) with the shared trainer",
                "lmforge pretrain --config configs/tiny.yaml --train.max_steps=2000 --model.n_layer=6\n"
                "  lmforge pretrain --config configs/bert-tiny.yaml --objective mlm")
    p.add_argument("--config", help="YAML with model/data/train sections (see configs/tiny.yaml)")
    p.add_argument("--objective", choices=["clm", "mlm", "span"], default=None,
                   help="clm: causal LM (decoder, GPT); mlm: masked LM (encoder, BERT; set --model.arch=encoder); "
                        "span: T5 span corruption (encoder-decoder; --model.arch=encdec). Default: the config's")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in train.out_dir (bit-identical to an unbroken run)")
    _add_accept_config_change(p)
    p.epilog += ("\n\nany config key can be overridden as --section.key=value, e.g. --train.lr=1e-3;"
                 "\nsections: model (architecture), data (dir of prepared shards), train (loop settings)")
    p.set_defaults(func=cmd_pretrain, accepts_overrides=True)

    for name, (help_text, example, stage) in STAGES.items():
        _stage_parser(sub, name, help_text, example, stage)

    p = _parser(sub, "merge", "fold a mergeable PEFT method (LoRA family, SVD-diagonal) into plain base weights",
                "lmforge merge runs/sft-lora --out runs/sft-merged")
    p.add_argument("checkpoint", help="run or checkpoint dir trained with --peft")
    p.add_argument("--out", required=True, help="where to write the merged model")
    p.add_argument("--hf", action="store_true", help="write a Hugging Face dir instead of an lmforge checkpoint")
    p.set_defaults(func=cmd_merge)

    p = _parser(sub, "export", "write a run or checkpoint as a Hugging Face model dir or a peft adapter folder",
                "lmforge export runs/sft --out runs/sft-hf\n"
                "  lmforge export runs/sft-lora --format hf --out runs/sft-merged-hf\n"
                "  lmforge export runs/sft-lora --format peft --base-name gpt2 --out runs/sft-adapter")
    p.add_argument("checkpoint", help="lmforge run or checkpoint dir, e.g. runs/sft (its config.yaml says how it was "
                                      "trained: chat template, labels, PEFT method)")
    p.add_argument("--format", choices=["hf", "peft"], default="hf",
                   help="hf (default): a save_pretrained dir for transformers (a PEFT run is merged first; a chat "
                        "run's template and stop tokens included), e.g. --format hf; peft: an adapter folder for "
                        "peft's PeftModel / AutoPeftModelForCausalLM (LoRA-family runs), e.g. --format peft")
    p.add_argument("--out", required=True, help="directory to write, e.g. --out runs/sft-hf")
    p.add_argument("--base-name", help="--format peft: the base model as the folder's users will name it, written "
                                       "as base_model_name_or_path: a hub id or a path, e.g. --base-name gpt2 "
                                       "(default: the run's base, if it is a Hugging Face dir)")
    p.set_defaults(func=cmd_export)

    p = _parser(sub, "quantize", "weight-only int8 (per output channel) or int4 (group-wise) min-max quantisation",
                "lmforge quantize runs/demo/pretrain --bits 4 --out runs/demo-int4")
    p.add_argument("checkpoint", help="lmforge checkpoint/run dir or Hugging Face dir (a decoder)")
    p.add_argument("--bits", type=int, choices=[8, 4], default=8, help="8 (per channel) or 4 (group-wise); default 8")
    p.add_argument("--group-size", type=int, default=64, help="int4 group along the input dim (default: 64)")
    p.add_argument("--out", required=True, help="where to write the quantised checkpoint (loads with lmforge.load)")
    p.add_argument("--keep-fp32-embedding", action="store_true",
                   help="leave a head tied to the token embedding (GPT-2) in fp32; by default the tied pair is "
                        "quantised once, like the other Linears, and the embedding looks its rows up in the codes")
    p.set_defaults(func=cmd_quantize)

    p = _parser(sub, "generate", "generate text from a checkpoint (lmforge or Hugging Face dir)",
                'lmforge generate runs/demo/pretrain --prompt "The capital of" --temperature 0.8 --top-p 0.9\n'
                '  lmforge generate --adapter runs/sft-adapter --base runs/base-hf --prompt "The capital of"')
    p.add_argument("checkpoint", nargs="?", help="run dir, checkpoint dir or Hugging Face model dir")
    p.add_argument("--adapter", help="instead of a checkpoint: a peft LoRA/DoRA adapter folder, put on its base "
                                     "(e.g. the output of lmforge export RUN --format peft)")
    p.add_argument("--base", help="with --adapter: the base model's dir, overriding the adapter's "
                                  "base_model_name_or_path (needed when that is a hub id: lmforge does not download)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default, as in the Python API's SamplingConfig); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample only from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible output)")
    p.add_argument("--stop", nargs="*", default=[], help="stop when any of these strings appears")
    p.add_argument("--num-samples", type=int, default=1,
                   help="how many continuations to print (>= 1; sample i uses --seed + i)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (slow)")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end instead of as it comes")
    p.add_argument("--truncate-prompt", action="store_true",
                   help="keep the prompt's last tokens if it does not fit the context window")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: 10-20 s of compiling first, then on 2 CPU cores ~10%% "
                        "faster per token at GPT-2-small size, ~4%% at the demo size (off by default)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1 = off)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score = log p / length^this (default 1)")
    p.add_argument("--draft", help="a smaller decoder with the same vocabulary: speculative decoding (same output "
                                   "distribution as the target alone)")
    p.add_argument("--num-draft", type=int, default=4, help="tokens the draft proposes per round (default 4)")
    p.add_argument("--draft-min-confidence", type=float, default=0.5,
                   help="greedy: end a round's drafting after a token the draft gives less than this probability "
                        "(saves work on likely rejections; output unchanged; 0 = always --num-draft; default 0.5)")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if extra and not getattr(args, "accepts_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra  # config keys (--key=value, --section.key=value): load_config validates each
        args.func(args)
    except LmforgeError as exc:
        print(f"lmforge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    from lmforge.train.distributed import shutdown_distributed

    shutdown_distributed()  # after success only: a rank that failed must not wait for the others at a barrier
    return 0


if __name__ == "__main__":  # pragma: no cover
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, skip interpreter teardown: gloo's worker threads can still hold Python objects there and
        # abort the process after the work is done and saved (about 1 run in 40 here; pytorch/pytorch#179291).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
