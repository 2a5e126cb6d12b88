"""`lmforge VERB ...`: parse arguments, load the config, call one stage. Nothing else lives here."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmforge.errors import ConfigError, LmforgeError


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
    from lmforge.tokenizer import train_tokenizer

    docs = read_documents(args.input, text_field=args.text_field, skip_bad_lines=args.skip_bad_lines)
    tokenizer = train_tokenizer(docs, args.vocab_size, min_frequency=args.min_frequency)
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
    result = pretrain(config, resume=args.resume)
    val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(f"done: step {result.step}, train loss {result.train_loss:.4f}{val}; checkpoint {result.checkpoint}")


def cmd_finetune(args: argparse.Namespace) -> None:
    from lmforge.config import FinetuneConfig, load_config
    from lmforge.train.finetune import finetune

    flags = {"task": args.task, "base": args.base, "train_file": args.train_file, "eval_file": args.eval_file,
             "max_len": args.max_len}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
    overrides += (["from_scratch=true"] if args.from_scratch else []) + (["truncate=true"] if args.truncate else [])
    if args.labels:
        overrides.append(f"labels=[{','.join(args.labels)}]")
    config = load_config(FinetuneConfig, args.config, overrides + args.overrides)
    result = finetune(config, resume=args.resume)
    scores = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()) or "no --eval-file given"
    print(f"done: step {result.train.step}, train loss {result.train.train_loss:.4f}; eval: {scores}; "
          f"checkpoint {result.train.checkpoint}")


def cmd_generate(args: argparse.Namespace) -> None:
    import lmforge
    from lmforge.infer.generate import SamplingConfig, generate

    model, tokenizer = lmforge.load(args.checkpoint)
    if tokenizer is None:
        raise LmforgeError(f"{args.checkpoint} has no tokenizer.json; generation from text needs one")
    arch = getattr(getattr(model, "cfg", None), "arch", None)
    if arch not in ("decoder", "encdec"):
        raise LmforgeError(f"{args.checkpoint} holds an {arch or type(model).__name__} model, which does not generate "
                           "text; use a decoder (GPT, Llama) or an encoder-decoder (T5)")
    if arch == "encdec":  # T5: the prompt is the encoder's input, the output a new text
        from lmforge.infer.generate_encdec import generate_text2text as generate
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, stop=args.stop, use_cache=not args.no_cache,
                         truncate_prompt=args.truncate_prompt)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
            cfg.seed = None if args.seed is None else args.seed + i
        if arch == "decoder":
            sys.stdout.write(args.prompt)
        stream = None if args.no_stream else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        text = generate(model, tokenizer, args.prompt, cfg, stream=stream)
        print(text if args.no_stream else "")


def cmd_demo(args: argparse.Namespace) -> None:
    from lmforge.demo import run_demo

    run_demo(out_dir=Path(args.out_dir), report_dir=Path(args.report_dir), quick=args.quick,
             minutes=args.minutes, precision=args.precision)


# ---- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="The whole life of a language model.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = _parser(sub, "demo", "run the lifecycle on the built-in synthetic world and write report/README.md",
                "lmforge demo --quick")
    p.add_argument("--quick", action="store_true", help="a tiny run (under 2 minutes) that exercises every stage")
    p.add_argument("--minutes", type=float, default=None,
                   help="pretraining time budget in minutes (default: 4, or 0.5 with --quick)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto measures fp32 and bf16 training speed first and uses the faster (default: auto)")
    p.add_argument("--out-dir", default="runs/demo", help="where data, tokenizer and checkpoints go")
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
    p.epilog += ("\n\nany config key can be overridden as --section.key=value, e.g. --train.lr=1e-3;"
                 "\nsections: model (architecture), data (dir of prepared shards), train (loop settings)")
    p.set_defaults(func=cmd_pretrain, accepts_overrides=True)

    p = _parser(sub, "finetune", "fine-tune a pretrained model on a labelled task with a task head",
                "lmforge finetune --task classify --base runs/bert-tiny --train-file sentiment_train.jsonl "
                "--eval-file sentiment_test.jsonl --train.max_steps=300")
    p.add_argument("--task", choices=["classify", "tokens", "span", "text2text"], default=None,
                   help="classify: {text,label} lines; tokens: {tokens,tags} (NER-style); span: extractive QA "
                        "{context,question,answer,answer_start}; text2text: {input,target} (T5 or decoder)")
    p.add_argument("--base", help="pretrained model: lmforge run/checkpoint dir or Hugging Face dir")
    p.add_argument("--train-file", help="JSONL training data in the task's format")
    p.add_argument("--eval-file", help="JSONL held-out data; its accuracy/exact match is printed and logged")
    p.add_argument("--labels", nargs="+", help="the label set (default: every label in --train-file)")
    p.add_argument("--max-len", type=int, help="longest input in tokens (default 128); longer lines are errors")
    p.add_argument("--truncate", action="store_true", help="cut over-long inputs instead of stopping")
    p.add_argument("--from-scratch", action="store_true",
                   help="re-initialise the base's weights (the same architecture untrained: a baseline)")
    p.add_argument("--config", help="YAML with the same keys (task, base, ..., train: {...})")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.out_dir")
    p.epilog += "\n\ntraining settings are overridden as --train.key=value, e.g. --train.out_dir=runs/sentiment"
    p.set_defaults(func=cmd_finetune, accepts_overrides=True)

    p = _parser(sub, "generate", "generate text from a checkpoint (lmforge or Hugging Face dir)",
                'lmforge generate runs/demo/pretrain --prompt "The capital of" --temperature 0.8 --top-p 0.9')
    p.add_argument("checkpoint", help="run dir, checkpoint dir or Hugging Face model dir")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); >0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample only from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible output)")
    p.add_argument("--stop", nargs="*", default=[], help="stop when any of these strings appears")
    p.add_argument("--num-samples", type=int, default=1, help="how many continuations to print")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (slow)")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end instead of as it comes")
    p.add_argument("--truncate-prompt", action="store_true",
                   help="keep the prompt's last tokens if it does not fit the context window")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if extra:
            if not getattr(args, "accepts_overrides", False):
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            bad = [a for a in extra if a.startswith("--") and "." not in a.split("=")[0]]
            if bad:
                raise ConfigError(f"unknown option {bad[0]}; config overrides look like --section.key=value")
        args.overrides = extra
        args.func(args)
    except LmforgeError as exc:
        print(f"lmforge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
