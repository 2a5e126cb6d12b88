"""`lmforge VERB ...` on jsonargparse: parse the arguments, load the config, call one command. Nothing else lives here.

A training stage's options are its flags plus every key of its pydantic config (`--train.lr=1e-4`, `--peft.r=16`);
jsonargparse parses them, and the config, loaded by `load_config` over `--config FILE.yaml`, validates them."""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import typing
from collections.abc import Callable
from functools import partial
from typing import Any

from jsonargparse import SUPPRESS, ArgumentParser, DefaultHelpFormatter, Namespace

from lmforge.agents.command import AGENT_EXAMPLE, agent_options, cmd_agent
from lmforge.calc.command import cmd_calc_linear, cmd_calc_model, linear_options, model_options
from lmforge.commands import (
    chat_options,
    cmd_chat,
    cmd_data_clean,
    cmd_data_prepare,
    cmd_demo,
    cmd_export,
    cmd_generate,
    cmd_merge,
    cmd_quantize,
    cmd_tokenizer_train,
    data_clean_options,
    data_prepare_options,
    demo_options,
    export_options,
    generate_options,
    merge_options,
    quantize_options,
    tokenizer_train_options,
)
from lmforge.errors import LmforgeError
from lmforge.eval.commands import (
    cmd_eval_harness,
    cmd_eval_perplexity,
    cmd_eval_tasks,
    harness_options,
    perplexity_options,
    tasks_options,
)
from lmforge.eval.judge_command import cmd_judge, judge_options
from lmforge.prompting.commands import cmd_prompt, prompt_options
from lmforge.rag.command import ask_options, cmd_rag_ask, cmd_rag_index, index_options
from lmforge.scaling.command import cmd_scaling, scaling_options
from lmforge.serve.command import cmd_serve, serve_options


class _Help(DefaultHelpFormatter):
    """Help as written: descriptions and examples keep their line breaks, nothing is appended to an option's help."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help or ""


class _Parser(ArgumentParser):
    """jsonargparse, with a usage error as an LmforgeError: one line (the full usage is one `--help` away)."""

    help_command: str | None = None  # where an error points (`lmforge sft --help`); default: this parser's prog

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(formatter_class=_Help, allow_abbrev=True, **kwargs)  # as argparse: --max-new works

    def error(self, message: str, ex: Exception | None = None) -> typing.NoReturn:
        command = self.help_command or self.prog.replace(" [options]", "")
        raise LmforgeError(f"{_readable(self, message)} (see `{command} --help`)")


def _readable(parser: argparse.ArgumentParser, message: str) -> str:
    """jsonargparse's message in one line, naming options as the user spells them, with a did-you-mean for each
    unknown option (jsonargparse names an option by its key: `Parser key "max_len"` -> `--max-len`)."""
    message = re.sub(r'Parser key "([^"]+)":\s*Expected a <class \'(\w+)\'>. Got value: (.*)',
                     lambda m: f"argument {_option(parser, m[1])}: invalid {m[2]} value: '{m[3]}'", message)
    missing = re.search(r'expected "([^"]+)" to be one of .* but it was not provided', message)
    if missing:  # `lmforge` or `lmforge tokenizer` alone
        message = f"missing {missing[1].split('.')[-1].upper()}: one of {', '.join(_choices(parser, missing[1]))}"
    if "arguments are required: " in message:
        head, keys = message.split("required: ", 1)
        message = head + "required: " + ", ".join(_option(parser, key) for key in keys.split(", "))
    if message.startswith("unrecognized arguments: "):
        known = [o.removeprefix("--") for a in parser._actions for o in a.option_strings if o.startswith("--")]
        unknown = [a.removeprefix("--").split("=")[0] for a in message.split()[2:] if a.startswith("--")]
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
            message += f"; unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")
    return " ".join(message.split())


def _choices(parser: argparse.ArgumentParser, key: str) -> list[str]:
    """The sub-commands a sub-command key (`verb`, `tokenizer.action`) takes."""
    action = parser._subcommands_action
    verb, _, rest = key.partition(".")
    return _choices(action.choices[verb], rest) if rest else list(action.choices)


def _option(parser: argparse.ArgumentParser, key: str) -> str:
    """The option string of `key` (`tokenizer.train.vocab_size` -> `--vocab-size`), found through sub-commands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            verb, _, rest = key.partition(".")
            if verb in action.choices:
                return _option(action.choices[verb], rest)
        elif action.dest == key and action.option_strings:
            return action.option_strings[0]
    return key


# ---- training stages: flags and config keys set keys of the stage's config; `load_config` validates them ------


def _stage_run(verb: str) -> Callable:
    """The stage's run(config, resume, accept_config_change); its `config` annotation is the stage's config class.
    Imported on use: a stage's module imports torch."""
    if verb == "pretrain":
        from lmforge.train.pretrain import pretrain as run
    elif verb == "finetune":
        from lmforge.train.finetune import finetune as run
    elif verb == "sft":
        from lmforge.train.sft import sft as run
    elif verb == "reward":
        from lmforge.train.reward import train_reward_model as run
    elif verb == "dpo":
        from lmforge.train.dpo import train_dpo as run
    elif verb == "ppo":
        from lmforge.train.rl import train_ppo as run
    elif verb == "grpo":
        from lmforge.train.rl import train_grpo as run
    else:
        from lmforge.train.distill import distill as run
    return run


def stage_config(verb: str) -> type:
    """The pydantic config class of a training stage: the `config` annotation of its run function."""
    return typing.get_type_hints(_stage_run(verb))["config"]


# Options shared by several stages: name -> add_argument keywords. Each sets the config key of its name
# (`--train-file` -> train_file); `--peft.method` (also spelt `--peft`) sets peft.method.
OPTIONS: dict[str, dict[str, Any]] = {
    "--base": dict(help="the starting model: lmforge run/checkpoint dir or Hugging Face dir"),
    "--train-file": dict(help="JSONL training data"),
    "--eval-file": dict(help="JSONL held-out data, scored after training"),
    "--template": dict(help="chat template: lmforge | llama2 | alpaca | hf (the base dir's Jinja template)"),
    "--max-len": dict(type=int, help="longest rendered example in tokens; longer lines are errors"),
    "--skip-bad-lines": dict(action="store_true", help="skip (and count) bad JSONL lines instead of stopping"),
    "--peft.method": dict(metavar="METHOD", help="parameter-efficient method, also spelt --peft METHOD: {choices} "
                                                 "(hyperparameters as --peft.r=16 --peft.targets=[attn.q,mlp] ...)"),
    "--policy": dict(help="the SFT checkpoint the policy and the frozen reference start from"),
    "--reward": dict(help="'verifier' (the synthetic tasks' checker) or a reward-model checkpoint dir"),
    "--prompts": dict(help="JSONL of {prompt, meta} lines (meta feeds the verifier)"),
    "--max-new-tokens": dict(type=int, help="response length limit"),
    "--temperature": dict(type=float, help="sampling temperature of the rollouts"),
}
CHAT_OPTIONS = ("--base", "--train-file", "--eval-file", "--template", "--max-len", "--skip-bad-lines", "--peft.method")
RL_OPTIONS = ("--policy", "--reward", "--prompts", "--template", "--max-new-tokens", "--temperature", "--peft.method")

# verb -> (help, example, shared options, the stage's own options)
STAGES: dict[str, tuple[str, str, tuple[str, ...], dict[str, dict]]] = {
    "pretrain": (
        "pretrain a decoder-only LM (causal LM objective) with the shared trainer",
        "lmforge pretrain --config configs/tiny.yaml --train.max_steps=2000 --model.n_layer=6\n"
        "  lmforge pretrain --config configs/bert-tiny.yaml --objective mlm\n"
        "  lmforge pretrain --config configs/tiny.yaml --init-from runs/demo/pretrain --data.dir=runs/code-data "
        "--train.out_dir=runs/midtrain", (),
        {"--objective": dict(choices=["clm", "mlm", "span"],
                             help="clm: causal LM (decoder, GPT); mlm: masked LM (encoder, BERT; set "
                                  "--model.arch=encoder); span: T5 span corruption (encoder-decoder; "
                                  "--model.arch=encdec). Default: the config's"),
         "--init-from": dict(metavar="CKPT",
                             help="continued pretraining: start from this lmforge run/checkpoint or Hugging Face dir "
                                  "(its weights and architecture; a fresh optimizer and schedule), e.g. --init-from "
                                  "runs/demo/pretrain; the data must use its tokenizer")}),
    "finetune": (
        "fine-tune a pretrained model on a labelled task with a task head",
        "lmforge finetune --task classify --base runs/bert-tiny --train-file sentiment_train.jsonl "
        "--eval-file sentiment_test.jsonl --train.max_steps=300",
        ("--base", "--train-file", "--eval-file", "--max-len", "--peft.method"),
        {"--task": dict(choices=["classify", "tokens", "span", "text2text"],
                        help="classify: {text,label} lines; tokens: {tokens,tags} (NER-style); span: extractive QA "
                             "{context,question,answer,answer_start}; text2text: {input,target}"),
         "--labels": dict(nargs="+", help="the label set (default: every label in --train-file)"),
         "--truncate": dict(action="store_true", help="cut over-long inputs instead of stopping"),
         "--from-scratch": dict(action="store_true", help="re-initialise the base's weights (same architecture, "
                                                          "untrained: a baseline)")}),
    "sft": (
        "supervised fine-tuning on conversations (loss on assistant tokens only)",
        "lmforge sft --base runs/demo/pretrain --train-file sft_train.jsonl --template lmforge",
        CHAT_OPTIONS, {}),
    "reward": (
        "train a reward model (decoder + scalar head, Bradley-Terry loss) on preference pairs",
        "lmforge reward --base runs/sft --train-file prefs_train.jsonl --eval-file prefs_eval.jsonl",
        CHAT_OPTIONS, {}),
    "dpo": (
        "direct preference optimisation (DPO, or IPO with --kind ipo) against a frozen reference",
        "lmforge dpo --base runs/sft --train-file prefs_train.jsonl --eval-file prefs_eval.jsonl --beta 0.1",
        CHAT_OPTIONS,
        {"--beta": dict(type=float, help="KL strength (IPO: margin 1/(2 beta))"),
         "--kind": dict(choices=["sigmoid", "ipo"], help="sigmoid = DPO, ipo = IPO"),
         "--sft-weight": dict(type=float, help="weight of the chosen replies' NLL per token added to the loss "
                                               "(RPO; trl's sigmoid+sft); 0 = plain DPO")}),
    "ppo": (
        "RLHF with PPO: value head, per-token KL penalty to the reference, GAE, clipped losses",
        "lmforge ppo --policy runs/sft --reward verifier --prompts prompts_train.jsonl --train.max_steps=100",
        RL_OPTIONS,
        {"--kl-coef": dict(type=float, help="per-token KL penalty coefficient"),
         "--adaptive-kl": dict(action="store_true", help="adapt the KL coefficient towards --target-kl"),
         "--target-kl": dict(type=float, help="target KL (nats per response) of the adaptive controller")}),
    "grpo": (
        "GRPO: G samples per prompt, group-normalised advantages, KL to the reference, verifier reward",
        "lmforge grpo --policy runs/sft --prompts prompts_train.jsonl --group-size 8 --train.max_steps=100",
        RL_OPTIONS,
        {"--group-size": dict(type=int, help="samples per prompt (G)"),
         "--beta": dict(type=float, help="KL coefficient")}),
    "distill": (
        "knowledge distillation: a student learns the teacher's softened distribution and the labels",
        "lmforge distill --teacher runs/demo/pretrain --student_model.n_layer=2 --data.dir=runs/demo/data/shards",
        ("--peft.method",),
        {"--teacher": dict(help="the teacher checkpoint (shares the student's tokenizer)"),
         "--student": dict(help="a student checkpoint (or build one with --student_model.KEY=VALUE)"),
         "--temperature": dict(type=float, help="softmax temperature tau (soft loss scaled by tau^2)"),
         "--alpha": dict(type=float, help="weight of the soft loss; 1 - alpha on the hard labels")}),
}


def _add_stage_options(p: ArgumentParser, verb: str) -> None:
    """The stage's flags and --config/--resume/--accept-config-change."""
    from lmforge.config import PEFT_METHODS

    _, _, shared, own = STAGES[verb]
    for name, kwargs in [*((n, OPTIONS[n]) for n in shared), *own.items()]:
        if name == "--peft.method":
            kwargs = {**kwargs, "choices": PEFT_METHODS,
                      "help": kwargs["help"].format(choices=" | ".join(PEFT_METHODS))}
        p.add_argument(name, default=SUPPRESS, **kwargs)
    p.add_argument("--config", help="YAML with the same keys (flags and --key.sub=value overrides win over it)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.out_dir "
                                                         "(bit-identical to an unbroken run)")
    p.add_argument("--accept-config-change", action="store_true",
                   help="with --resume: continue although the config changed a key that alters the run (lr, model, "
                        "data...); the change is printed and recorded in train.out_dir/config_changes.jsonl")


def _add_config_keys(p: ArgumentParser, verb: str) -> None:
    """Every key of the stage's config that no flag sets, as a hidden option (`--train.lr`, `--peft.r`); the config
    validates the values (loaded as YAML scalars by jsonargparse) when it is built."""
    from lmforge.config_loading import config_keys

    taken = {o for a in p._actions for o in a.option_strings}
    for key in config_keys(stage_config(verb), leaves_only=True):
        if f"--{key}" not in taken:
            p.add_argument(f"--{key}", type=Any, default=SUPPRESS, help=SUPPRESS)


def _describe(verb: str, result: object) -> str:
    """One line for any stage's result: TrainResult, (TrainResult, metrics), or an object with .train/.metrics."""
    if verb == "pretrain":
        val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
        return f"done: step {result.step}, train loss {result.train_loss:.4f}{val}; checkpoint {result.checkpoint}"
    metrics: dict = {}
    if isinstance(result, tuple):
        result, metrics = result
    metrics = getattr(result, "metrics", None) or metrics
    if hasattr(result, "rewards") and result.rewards:
        metrics = {**metrics, "mean reward (last round)": result.rewards[-1]}
    train = getattr(result, "train", result)
    scores = "".join(f", {k} {v:.4f}" for k, v in metrics.items())
    return f"done: step {train.step}, train loss {train.train_loss:.4f}{scores}; checkpoint {train.checkpoint}"


def config_overrides(args: Namespace) -> dict[str, Any]:
    """The parsed stage options as dotted config keys (`{"train.lr": 0.001, "train_file": "x.jsonl"}`)."""
    return {key: value for key, value in args.items() if key not in ("config", "resume", "accept_config_change")}


def run_stage(verb: str, args: Namespace) -> None:
    from lmforge.config_loading import load_config

    config = load_config(stage_config(verb), args.config, config_overrides(args))
    run = _stage_run(verb)
    print(_describe(verb, run(config, resume=args.resume, accept_config_change=args.accept_config_change)))


# ---- parser: one sub-command per verb, built with the options of the verb being run only ----------------------


def _stage(verb: str) -> tuple[str, str, Callable[[ArgumentParser], None], Callable[[Namespace], None]]:
    help_text, example, *_ = STAGES[verb]
    example += ("\n\nany config key can be overridden as --section.key=value, e.g. --train.max_steps=500 "
                "--train.out_dir=runs/x --train.lr=1e-4")
    return help_text, example, partial(_add_stage_options, verb=verb), partial(run_stage, verb)


# "verb" or "verb action" -> (help, example, adds the options, runs the command); no options: a group of actions
VERBS: dict[str, tuple[str, str, Callable[[ArgumentParser], None] | None, Callable[[Namespace], None] | None]] = {
    "demo": ("run the lifecycle on the built-in synthetic world and write report/README.md", "lmforge demo --quick",
             demo_options, cmd_demo),
    "tokenizer": ("tokenizer commands", "lmforge tokenizer train --help", None, None),
    "tokenizer train": ("train a byte-level BPE tokenizer with lmforge's special tokens reserved",
                        "lmforge tokenizer train --input corpus.txt --vocab-size 2048 --out runs/tok",
                        tokenizer_train_options, cmd_tokenizer_train),
    "data": ("data commands", "lmforge data prepare --help", None, None),
    "data prepare": ("tokenize text into train/validation token shards (uses all cores)",
                     "lmforge data prepare --input corpus.jsonl --tokenizer runs/tok --out runs/data",
                     data_prepare_options, cmd_data_prepare),
    "data clean": ("clean text before tokenising: Unicode NFKC, HTML stripping, Gopher quality rules, exact and "
                   "MinHash near-duplicate removal (uses all cores); writes clean.jsonl and summary.json",
                   "lmforge data clean web.jsonl books.txt --out runs/clean --min-words 20 --disable stop_words\n"
                   "  lmforge data prepare --input runs/clean/clean.jsonl --tokenizer runs/tok --out runs/data",
                   data_clean_options, cmd_data_clean),
    **{verb: _stage(verb) for verb in STAGES},
    "merge": ("fold a mergeable PEFT method (LoRA family, SVD-diagonal) into plain base weights",
              "lmforge merge runs/sft-lora --out runs/sft-merged", merge_options, cmd_merge),
    "export": ("write a run or checkpoint as a Hugging Face model dir, a peft adapter folder or a GGUF file",
               "lmforge export runs/sft --out runs/sft-hf\n"
               "  lmforge export runs/sft-lora --format hf --out runs/sft-merged-hf\n"
               "  lmforge export runs/sft-lora --format peft --base-name gpt2 --out runs/sft-adapter\n"
               "  lmforge export runs/sft --format gguf --type q8_0 --out sft.gguf",
               export_options, cmd_export),
    "quantize": ("weight-only int8 (per output channel) or int4 (group-wise) min-max quantisation",
                 "lmforge quantize runs/demo/pretrain --bits 4 --out runs/demo-int4", quantize_options, cmd_quantize),
    "eval": ("evaluate a model on your own data", "lmforge eval perplexity --help", None, None),
    "eval perplexity": ("perplexity and bits per byte of a decoder on text files (sliding window over long texts)",
                        "lmforge eval perplexity runs/demo/pretrain --input held.jsonl --stride 128 --json ppl.json",
                        perplexity_options, cmd_eval_perplexity),
    "eval tasks": ("score a decoder or T5 on a JSONL task file: generation (exact match, F1), multiple choice (acc, "
                   "acc_norm), text-to-text (BLEU, ROUGE); writes results.json and results.md",
                   "lmforge eval tasks runs/sft --tasks my_tasks.jsonl --out runs/sft/eval", tasks_options,
                   cmd_eval_tasks),
    "eval harness": ("run lm-evaluation-harness tasks on a model (needs: pip install 'lmforge[eval]')",
                     "lmforge eval harness runs/demo/pretrain --tasks my_task --include-path my_tasks/ "
                     "--output results.json", harness_options, cmd_eval_harness),
    "judge": ("label which of two responses is better with a chat model as the judge, asked in both orders; "
              "pairs the two orders disagree on, or whose answer names neither response, are ties (counted)",
              "lmforge judge --judge runs/judge --pairs judge_pairs.jsonl --out labelled.jsonl\n"
              "  lmforge judge --judge runs/judge-hf --pairs pairs.jsonl --out labelled.jsonl --template hf",
              judge_options, cmd_judge),
    "rag": ("retrieval-augmented generation: index documents, answer questions from them", "lmforge rag index --help",
            None, None),
    "rag index": ("chunk and embed documents into a retrieval index (an existing index gets only new and changed "
                  "documents embedded)",
                  "lmforge rag index notes/ faq.jsonl --out runs/faq-index --chunk-tokens 64 --overlap 16\n"
                  "  lmforge rag index notes/ --out runs/faq-index-own --embedder mean:runs/demo/sft",
                  index_options, cmd_rag_index),
    "rag ask": ("answer a question with a decoder from passages retrieved from an index, printing its numbered sources",
                'lmforge rag ask runs/demo/sft --index runs/faq-index --question "What is the capital of Velmora?" '
                "--k 3 --mode hybrid", ask_options, cmd_rag_ask),
    "prompt": ("answer task questions with a prompting method (few/many-shot, chain of thought, zero-shot CoT, "
               "self-consistency, Auto-CoT): accuracy with its 95% interval, every prompt and completion in a "
               "transcript",
               "lmforge prompt runs/demo/sft --method cot --tasks arithmetic.jsonl --shots 4 --selection nearest "
               "--transcript cot.jsonl\n"
               "  lmforge prompt runs/demo/sft --method self-consistency --tasks arithmetic.jsonl --k 10 "
               "--temperature 0.7 --seed 0 --json sc.json\n"
               "  lmforge prompt runs/demo/pretrain --method many-shot --tasks arithmetic.jsonl --budget 200 --repeat",
               prompt_options, cmd_prompt),
    "calc": ("the accounting behind scale: parameters, FLOPs, training memory, KV cache, training time",
             "lmforge calc model --help", None, None),
    "calc model": ("parameters, exact per-layer FLOPs, 6ND, training memory (fp32, mixed precision, activation "
                   "checkpointing, LoRA, QLoRA), KV cache and training time of a model config or checkpoint",
                   "lmforge calc model llama-65b --batch 4\n"
                   "  lmforge calc model runs/demo/pretrain --tokens 1e9 --accelerator A100 --mfu 0.5 --json\n"
                   "  lmforge calc model gpt3-175b --tokens 300e9 --devices 1024", model_options, cmd_calc_model),
    "calc linear": ("FLOPs, parameters, activations and fp32 training memory of one linear layer",
                    "lmforge calc linear --n 16384 --d-in 32768 --d-out 8192", linear_options, cmd_calc_linear),
    "scaling": ("train a grid of model sizes x token budgets, fit L(N, D) = E + A/N^alpha + B/D^beta (Chinchilla's "
                "approach 3) and report the compute-optimal N and D for a FLOP budget, with a frontier plot",
                "lmforge scaling --out-dir runs/scaling --json scaling.json\n"
                "  lmforge scaling --data runs/data --sizes 64x2,128x2,192x4 --tokens 1e5,3e5,1e6 --flops 1e15",
                scaling_options, cmd_scaling),
    "generate": ("generate text from a checkpoint (lmforge or Hugging Face dir)",
                 'lmforge generate runs/demo/pretrain --prompt "The capital of" --temperature 0.8 --top-p 0.9\n'
                 '  lmforge generate runs/sft --chat --prompt "Name a colour."\n'
                 '  lmforge generate --adapter runs/sft-adapter --base runs/base-hf --prompt "The capital of"',
                 generate_options, cmd_generate),
    "chat": ("talk to a chat model in the terminal: history kept and rendered with its chat template, replies "
             "streamed; /reset, /system TEXT, /save FILE, /exit",
             'lmforge chat runs/sft --system "Answer briefly." --temperature 0.7 --top-p 0.9\n'
             "  lmforge generate runs/sft --chat --prompt \"Name a colour.\"   (one reply, no REPL)",
             chat_options, cmd_chat),
    "serve": ("serve a decoder over HTTP: OpenAI-compatible API (/v1/chat/completions, /v1/completions, "
              "/v1/models), /health, /metrics and a chat page at /",
              "lmforge serve runs/sft --port 8000\n"
              "  lmforge serve runs/base --adapter support=runs/sft-lora --api-key $KEY --max-batch 16",
              serve_options, cmd_serve),
    "agent": ("answer questions with a ReAct agent (Thought / Action: tool[input] / Observation ... / Final answer) "
              "and tools: a safe calculator, search and lookup over a document index; transcripts as JSON lines",
              AGENT_EXAMPLE, agent_options, cmd_agent),
}


def build_parser(verb: str | None = None, with_config_keys: bool = False) -> ArgumentParser:
    """The `lmforge` parser with the options of `verb` (of every verb when None); with `with_config_keys`, the verb's
    config keys too. Building only what runs keeps `lmforge --help` and the non-training verbs from importing the
    configs (pydantic) and the training stages (torch)."""
    parser = _Parser(prog="lmforge", description="The whole life of a language model.")
    groups = {"": parser.add_subcommands(dest="verb", metavar="VERB")}
    for path, (help_text, example, add_options, _) in VERBS.items():
        parent, _, name = path.rpartition(" ")
        p = _Parser(description=help_text, epilog=f"example:\n  {example}")
        groups[parent].add_subcommand(name, p, help=help_text)
        if add_options is None:
            groups[path] = p.add_subcommands(dest="action", metavar="ACTION")
        elif verb in (None, path.split()[0]):
            add_options(p)
            if with_config_keys and path in STAGES:
                _add_config_keys(p, path)
    return parser


# `--peft lora` is read as `--peft.method lora`: beside `--peft.r`, jsonargparse takes an option `--peft` for the
# whole peft section
_PEFT_ALIAS = re.compile(r"^--peft(?==|$)")


def main(argv: list[str] | None = None) -> int:
    """Run one command; 2 and one line on stderr for a user error, 130 when interrupted."""
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = [_PEFT_ALIAS.sub("--peft.method", a) for a in argv]
    try:
        parser = build_parser(argv[0] if argv else None, with_config_keys=not {"-h", "--help"} & set(argv))
        verb_words = next((argv[:n] for n in (2, 1) if " ".join(argv[:n]) in VERBS), None)
        if verb_words:  # errors the top parser reports for a verb's options point at that verb's help
            parser.help_command = "lmforge " + " ".join(verb_words)
        args = parser.parse_args(argv)
        verb, args = args.verb, args[args.verb]
        if "action" in args:  # tokenizer train, data prepare
            verb, args = f"{verb} {args.action}", args[args.action]
        VERBS[verb][3](args)
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
