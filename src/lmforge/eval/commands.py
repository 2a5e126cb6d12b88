"""The actions of `lmforge eval`: each has its options (`*_options`, added to its sub-command by `lmforge.cli`) and
its command (`cmd_eval_*`), which takes the parsed options and prints the result. Nothing here imports torch until a
command runs."""

from __future__ import annotations

import os
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from lmforge.errors import ConfigError


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
