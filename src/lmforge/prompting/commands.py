"""`lmforge prompt`: its options (added to the sub-command by `lmforge.cli`) and its command. Nothing here imports
torch until the command runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from lmforge.errors import DataError
from lmforge.prompting.examples import ORDERS, SELECTIONS
from lmforge.prompting.methods import DEFAULT_SC_TEMPERATURE, DEFAULT_SHOTS, METHODS

CHAT_TEMPLATES = ("lmforge", "llama2", "alpaca", "hf", "none")


def prompt_options(p: ArgumentParser) -> None:
    p.add_argument("checkpoint", help="the model: run dir, checkpoint dir or Hugging Face dir of a decoder, e.g. "
                                      "runs/demo/sft (a chat model: prompts use its chat template) or "
                                      "runs/demo/pretrain (a base model: plain text)")
    p.add_argument("--method", required=True, choices=METHODS,
                   help="standard (direct answers after --shots demonstrations: zero/one/few-shot), many-shot (as "
                        "many direct demonstrations as fit --budget), cot (demonstrations worked step by step), "
                        "zero-shot-cot (\"Let's think step by step\", then an answer-extraction prompt), "
                        "self-consistency (--k samples at --temperature, majority vote), auto-cot (demonstrations "
                        "written by the model for one question per k-means cluster), e.g. --method cot")
    p.add_argument("--tasks", required=True, metavar="FILE.jsonl",
                   help="the questions, in the task file of `lmforge eval tasks` (generate lines only): the prompt "
                        "is the question, e.g. --tasks arithmetic.jsonl with lines like {\"type\": \"generate\", "
                        "\"prompt\": \"Mia has 3 pens. She buys 4 more. How many pens does Mia have now?\", "
                        "\"answer\": \"7\", \"rationale\": \"Mia starts with 3 pens. She buys 4, so 3 + 4 = 7.\"}; "
                        "optional keys: "
                        "task (lines of a task share demonstrations), rationale (needed by cot demonstrations), "
                        "pattern (extracts the answer when the reply has no \"The answer is X.\"), stop (strings "
                        "ending a reply)")
    p.add_argument("--demos", metavar="FILE.jsonl",
                   help="demonstrations from this task file (same format, same task names) instead of the other "
                        "questions of --tasks, e.g. --demos train_tasks.jsonl")
    p.add_argument("--shots", type=int, default=None,
                   help="demonstrations per prompt (auto-cot: clusters), e.g. --shots 0 for zero-shot, --shots 1 "
                        f"for one-shot (defaults: {', '.join(f'{m} {k}' for m, k in DEFAULT_SHOTS.items())}; "
                        "many-shot and zero-shot-cot take none)")
    p.add_argument("--selection", default="fixed", choices=SELECTIONS,
                   help="which demonstrations: fixed (the first of the pool), random (a seeded draw per question) or "
                        "nearest (the most similar questions by all-MiniLM-L6-v2 embedding), e.g. --selection "
                        "nearest (default: fixed)")
    p.add_argument("--order", default="selected", choices=ORDERS,
                   help="their order: selected (best first), reversed (best next to the question) or shuffled "
                        "(seeded), e.g. --order reversed (default: selected)")
    p.add_argument("--k", type=int, default=5,
                   help="self-consistency: samples per question, e.g. --k 10 (default: 5)")
    p.add_argument("--temperature", type=float, default=None,
                   help=f"sampling temperature, e.g. --temperature 0.5 (default: {DEFAULT_SC_TEMPERATURE} for "
                        "self-consistency, 0 = greedy for the other methods)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of random selection, shuffled order, k-means and sampling, e.g. --seed 1 (default: 0)")
    p.add_argument("--max-new-tokens", type=int, default=96,
                   help="length limit of each reply, e.g. --max-new-tokens 64 (default: 96)")
    p.add_argument("--budget", type=int, default=None,
                   help="many-shot: prompt tokens to fill with demonstrations, e.g. --budget 200 (default: the "
                        "context less --max-new-tokens)")
    p.add_argument("--repeat", action="store_true",
                   help="prompt repetition: write the question twice (<QUERY><QUERY>), e.g. --repeat")
    p.add_argument("--slot-template", default="Question: [x]\nAnswer: [z]",
                   help="plain-text prompts: [x] takes the question, [z] the answer, e.g. --slot-template "
                        "'[x] Overall, it was [z]' (default: 'Question: [x]\\nAnswer: [z]', the synthetic world's)")
    p.add_argument("--chat-template", choices=CHAT_TEMPLATES, default=None,
                   help="render with this chat template, or none for plain text, e.g. --chat-template none (default: "
                        "the model's own when it has one, else plain text)")
    p.add_argument("--transcript", metavar="OUT.jsonl",
                   help="write every prompt and completion, one JSON line per question, e.g. --transcript cot.jsonl")
    p.add_argument("--json", metavar="OUT", help="write the accuracy (with its 95% interval) as JSON, e.g. --json "
                                                  "cot.json")


def _chat_template(source: str, tokenizer, name: str | None):
    from lmforge.infer.chat_repl import model_chat_template, recorded_chat_template

    if name == "none" or (name is None and recorded_chat_template(source)[0] is None):
        return None
    return model_chat_template(source, tokenizer, name)


def cmd_prompt(args: Namespace) -> None:
    from lmforge.infer.model_kind import load_for_verb
    from lmforge.io import atomic_write_jsonl, atomic_write_text, require_dir_path
    from lmforge.prompting.methods import PromptingConfig
    from lmforge.prompting.run import prompt_model, read_questions
    from lmforge.prompting.template import SlotTemplate

    config = PromptingConfig(args.method, args.shots, args.selection, args.order, args.k, args.temperature, args.seed,
                             args.max_new_tokens, args.repeat, args.budget)
    template = SlotTemplate(args.slot_template.replace("\\n", "\n"))  # a newline typed as \n in a shell
    for flag, out in (("--transcript", args.transcript), ("--json", args.json)):
        if out:
            require_dir_path(Path(out).parent, flag)
    questions = read_questions(args.tasks)  # before the model loads: a bad line costs nothing
    pools = None
    if args.demos:
        pools = {}
        for q in read_questions(args.demos):
            pools.setdefault(q.task, []).append(q.example)
        missing = sorted({q.task for q in questions} - set(pools))
        if missing:
            raise DataError(f"--demos {args.demos} has no lines of task(s) {', '.join(map(repr, missing))} that "
                            f"--tasks asks; give demonstrations for every task (lines with the same \"task\")")
    model, tokenizer, _ = load_for_verb(args.checkpoint, "lmforge prompt", ("decoder",))
    chat = _chat_template(args.checkpoint, tokenizer, args.chat_template)
    run = prompt_model(model, tokenizer, questions, config, chat=chat, template=template, pools=pools)
    summary = run.summary()
    _print_summary(summary, chat is not None)
    if args.transcript:
        print(f"wrote {atomic_write_jsonl(args.transcript, run.transcript())}")
    if args.json:
        print(f"wrote {atomic_write_text(args.json, json.dumps({'model': args.checkpoint, **summary}, indent=2))}")


def _print_summary(summary: dict, chat: bool) -> None:
    def line(name: str, s: dict) -> str:
        low, high = s["ci95"]
        return f"{name}: accuracy {s['accuracy']:.3f} ({s['correct']}/{s['n']}), 95% CI [{low:.3f}, {high:.3f}]"

    print(f"{summary['method']} ({'chat template' if chat else 'plain text'}, "
          f"{summary['mean_shots']:.1f} demonstrations per prompt on average)")
    if len(summary["tasks"]) > 1:
        for task, s in summary["tasks"].items():
            print("  " + line(task, s))
    print(line("all", summary))
    for task, built in summary.get("auto_cot", {}).items():
        if built["demonstrations"] < built["clusters"]:
            print(f"note: auto-cot on task {task!r}: {built['demonstrations']} of {built['clusters']} clusters have a "
                  f"question passing the rules; {built['rejected']} candidates were turned down (the transcript's "
                  "demonstrations line says why)", file=sys.stderr)
    if summary["questions_with_dropped_shots"]:
        print(f"note: {summary['questions_with_dropped_shots']} of {summary['n']} prompts did not fit the context "
              f"with all their demonstrations; {summary['dropped_shots']} demonstrations were dropped (the transcript "
              "records each prompt's dropped_shots)", file=sys.stderr)
