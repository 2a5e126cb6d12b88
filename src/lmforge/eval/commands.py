"""The actions of `lmforge eval`: each has its options (`*_options`, added to its sub-command by `lmforge.cli`) and
its command (`cmd_eval_*`), which takes the parsed options and prints the result. Nothing here imports torch until a
command runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from lmforge.errors import ConfigError


def _load_model(source: str, archs: tuple[str, ...], action: str):
    """(model, tokenizer) of `source`; LmforgeError when it has no tokenizer or is not one of `archs` (naming the
    verbs it works with)."""
    from lmforge.infer.model_kind import load_for_verb

    model, tokenizer, _ = load_for_verb(source, f"lmforge eval {action}", archs)
    return model.eval(), tokenizer


def perplexity_options(p: ArgumentParser) -> None:
    p.add_argument("checkpoint", help="the model: run dir, checkpoint dir or Hugging Face dir of a decoder, "
                                      "e.g. runs/demo/pretrain")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="text files read as `lmforge data prepare` reads them: .txt (one document per file), .jsonl "
                        "(one per line), .parquet (one per row), e.g. --input held_out.jsonl notes.txt")
    p.add_argument("--text-field", default="text",
                   help="JSONL key / parquet column holding the text, e.g. --text-field content (default: text)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip (and count) malformed JSONL lines instead of stopping at the first")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens each window moves on over a document longer than the context; each window scores "
                        "only its new tokens, so a smaller stride gives each token more context and costs more "
                        "forwards, e.g. --stride 256 (1 to context - 1; default: half the context)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="windows per forward, e.g. --batch-size 32 (default: 8)")
    p.add_argument("--json", metavar="OUT", help="also write the numbers as JSON, e.g. --json ppl.json")


def cmd_eval_perplexity(args: Namespace) -> None:
    from lmforge.eval.perplexity import default_stride, file_perplexity
    from lmforge.eval.report import markdown_table
    from lmforge.io import atomic_write_text, require_dir_path

    if args.json:
        require_dir_path(Path(args.json).parent, "--json")
    model, tokenizer = _load_model(args.checkpoint, ("decoder",), "perplexity")
    stride = default_stride(model.cfg.max_seq_len) if args.stride is None else args.stride
    results = file_perplexity(model, tokenizer, args.input, stride, args.batch_size, args.text_field,
                              args.skip_bad_lines)
    print(markdown_table(["file", "documents", "tokens", "perplexity", "bits per byte"],
                         [(r.source, r.documents, r.tokens, f"{r.perplexity:.4f}", f"{r.bits_per_byte:.4f}")
                          for r in results]))
    if results[-1].skipped_lines:
        print(f"skipped {results[-1].skipped_lines} bad lines")
    if args.json:
        atomic_write_text(args.json, json.dumps({"model": args.checkpoint, "context": model.cfg.max_seq_len,
                                                 "stride": stride, "files": [r.as_dict() for r in results[:-1]],
                                                 "overall": results[-1].as_dict()}, indent=2))
        print(f"wrote {args.json}")


def tasks_options(p: ArgumentParser) -> None:
    p.add_argument("checkpoint", help="the model: run dir, checkpoint dir or Hugging Face dir of a decoder or an "
                                      "encoder-decoder (T5), e.g. runs/sft")
    p.add_argument("--tasks", required=True, metavar="FILE.jsonl",
                   help='task lines, e.g. --tasks my_tasks.jsonl with lines like {"type": "choice", "prompt": "The '
                        'sky is", "choices": ["blue", "green"], "answer": 0}, {"type": "generate", "prompt": "2+2=", '
                        '"answer": "4", "pattern": "(\\\\d+)"} or {"type": "text2text", "prompt": "...", '
                        '"reference": "..."}; optional keys: "task" (a name grouping lines), "stop" (strings)')
    p.add_argument("--out", default="eval-results",
                   help="directory for results.json and results.md, e.g. --out runs/sft/eval (default: eval-results)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="generation length limit of generate and text2text lines, e.g. --max-new-tokens 32 "
                        "(default: 64)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); > 0 samples, e.g. --temperature 0.7 --seed 1")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, e.g. --top-p 0.9 (1 = off)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of sampling (item i uses seed + i: reproducible), e.g. --seed 0")
    p.add_argument("--batch-size", type=int, default=16,
                   help="choice continuations scored per forward, e.g. --batch-size 64 (default: 16)")


def cmd_eval_tasks(args: Namespace) -> None:
    from lmforge.eval.task_file import read_tasks
    from lmforge.eval.task_suite import evaluate_tasks, results_table, write_results
    from lmforge.infer.generate import SamplingConfig
    from lmforge.io import require_dir_path

    require_dir_path(Path(args.out), "--out")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)
    tasks = read_tasks(args.tasks)  # before the model loads: a bad line costs nothing
    model, tokenizer = _load_model(args.checkpoint, ("decoder", "encdec"), "tasks")
    results = evaluate_tasks(model, tokenizer, tasks, sampling, args.batch_size)
    generation = {k: getattr(sampling, k) for k in ("max_new_tokens", "temperature", "top_p", "seed")}
    header = {"model": args.checkpoint, "tasks_file": args.tasks, "generation": generation}
    json_path, md_path = write_results(Path(args.out), header, results)
    print(results_table(results))
    print(f"wrote {json_path} and {md_path}")


def harness_options(p: ArgumentParser) -> None:
    p.add_argument("checkpoint", help="lmforge run or checkpoint dir (or Hugging Face dir) of a decoder")
    p.add_argument("--tasks", nargs="+", required=True, metavar="NAME",
                   help="lm-eval task, group or tag names (space- or comma-separated)")
    p.add_argument("--include-path", metavar="DIR",
                   help="a directory of your own lm-eval task YAML files; only these are indexed (default: lm-eval's "
                        "bundled tasks, whose data sets must be in the Hugging Face cache: nothing is downloaded)")
    p.add_argument("--output", metavar="FILE", help="write lm-eval's results dict here as JSON, e.g. results.json")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N items of each task")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="requests per forward (default: 16)")


def cmd_eval_harness(args: Namespace) -> None:
    from lmforge.io import atomic_write_text, require_dir_path

    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if args.output and Path(args.output).is_dir():
        raise ConfigError(f"--output {args.output} is a directory; give the path of the JSON file to write")
    if args.output:
        require_dir_path(Path(args.output).parent, "--output")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded; read when lm-eval imports the hub libraries
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lmforge.eval.harness import evaluate, results_json, results_table

    tasks = [name for arg in args.tasks for name in arg.split(",") if name]
    results = evaluate(args.checkpoint, tasks, args.include_path, args.limit, args.batch_size)
    print(results_table(results))
    if args.output:
        print(f"results -> {atomic_write_text(args.output, results_json(results))}")
