"""`lmforge judge`: label preference pairs with a chat model as the judge (options, then the command). Nothing here
imports torch until the command runs."""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from lmforge.errors import ConfigError, DataError


def judge_options(p: ArgumentParser) -> None:
    p.add_argument("--judge", required=True, help="the judge: run dir, checkpoint dir or Hugging Face dir of a chat "
                                                  "decoder, e.g. --judge runs/judge (lmforge sft on judging "
                                                  "transcripts: lmforge.data.judging)")
    p.add_argument("--pairs", required=True, metavar="FILE.jsonl",
                   help="one JSON object per line with instruction, response_a and response_b (other fields are "
                        "copied to the output), e.g. --pairs pairs.jsonl")
    p.add_argument("--out", required=True, metavar="FILE.jsonl",
                   help="where to write each pair with answer_ab, answer_ba (the judge's raw answers in both orders), "
                        "label (A, B or tie) and outcome (agree, disagree, unparseable), e.g. --out labelled.jsonl")
    p.add_argument("--template", help="this chat template instead of the judge's own (the one its run trained with, or "
                                      "its Hugging Face chat_template): lmforge | llama2 | alpaca | hf, e.g. "
                                      "--template lmforge")
    p.add_argument("--max-new-tokens", type=int, default=8,
                   help="longest answer in tokens; an answer is read for 'Better: A' or 'Better: B', e.g. "
                        "--max-new-tokens 16 (default: 8)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts generated together, e.g. --batch-size 64 "
                                                              "(default: 32)")


def _check_out(out: Path, pairs: Path) -> None:
    from lmforge.io import require_dir_path

    if out.resolve() == pairs.resolve():
        raise ConfigError(f"--out {out} is the --pairs file, which the judge reads; choose another --out")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file path, e.g. {out / 'labelled.jsonl'}")
    require_dir_path(out.parent, "--out")


def cmd_judge(args: Namespace) -> None:
    from lmforge.data.judging import read_judge_pairs
    from lmforge.eval.judge import both_orders, judge_pairs, model_decider, prompt_ids
    from lmforge.infer.chat_repl import model_chat_template
    from lmforge.infer.layout import column_major_linears
    from lmforge.infer.model_kind import load_for_verb
    from lmforge.io import atomic_write_jsonl

    for option, value in (("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(f"{option} must be >= 1, got {value}")
    out = Path(args.out)
    _check_out(out, Path(args.pairs))
    located = read_judge_pairs(args.pairs)  # a bad line fails before the model loads
    model, tokenizer, _ = load_for_verb(args.judge, "lmforge judge", ("decoder",))
    template = model_chat_template(args.judge, tokenizer, args.template)
    room = model.cfg.max_seq_len - args.max_new_tokens
    for where, pair in located:  # every prompt checked before any is generated
        for prompt in both_orders(pair):
            try:
                n = len(prompt_ids(template, prompt))
            except DataError as err:
                raise DataError(f"{where}: {err}") from None
            if n > room:
                context = model.cfg.max_seq_len
                raise DataError(f"{where}: the judge prompt has {n} tokens; with --max-new-tokens "
                                f"{args.max_new_tokens} it must fit {room} of the judge's {context}-token context: "
                                "shorten the pair or lower --max-new-tokens")
    column_major_linears(model)  # faster small-batch matmuls; generation only reads the weights
    labelled, counts = judge_pairs([pair for _, pair in located],
                                   model_decider(model, template, args.max_new_tokens, args.batch_size))
    atomic_write_jsonl(out, labelled)
    print(f"judged {counts.summary()} -> {out}")
