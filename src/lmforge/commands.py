"""The verbs that are not training stages: tokenizer train, data prepare, data clean, generate, chat, merge, export,
quantize, demo (serve's are in `lmforge.serve.command`). Each has its options (`*_options`, added to its sub-command
by `lmforge.cli`) and its command (`cmd_*`), which takes the parsed options and prints one result."""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from lmforge.errors import ConfigError, DataError, LmforgeError


def _add_input_options(p: ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="text files: .txt (one document per file), .jsonl (one per line), .parquet")
    p.add_argument("--text-field", default="text", help="JSONL key / parquet column holding the text (default: text)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip (and count) malformed JSONL lines instead of stopping at the first")


def tokenizer_train_options(p: ArgumentParser) -> None:
    _add_input_options(p)
    p.add_argument("--vocab-size", type=int, required=True, help="total vocabulary, special tokens included")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge (default: 2)")
    p.add_argument("--out", required=True, help="directory to write tokenizer.json into")


def cmd_tokenizer_train(args: Namespace) -> None:
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


def data_prepare_options(p: ArgumentParser) -> None:
    _add_input_options(p)
    p.add_argument("--tokenizer", required=True, help="directory (or file) with tokenizer.json")
    p.add_argument("--out", required=True, help="output directory for train.bin, val.bin, index.json")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (default: 0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default: 0)")


def cmd_data_prepare(args: Namespace) -> None:
    from lmforge.data.shards import prepare_shards
    from lmforge.tokenizer import Tokenizer

    index = prepare_shards(args.input, Tokenizer.from_file(args.tokenizer), args.out, text_field=args.text_field,
                           val_fraction=args.val_fraction, seed=args.seed, skip_bad_lines=args.skip_bad_lines)
    skipped = f"; skipped {index.skipped_lines} bad lines" if index.skipped_lines else ""
    print(f"wrote {index.num_tokens['train']:,} train and {index.num_tokens['val']:,} validation tokens "
          f"({index.dtype}) to {args.out}{skipped}")


def data_clean_options(p: ArgumentParser) -> None:
    from lmforge.data.clean import STEPS

    p.add_argument("input", nargs="+", metavar="INPUT",
                   help="text files: .txt (one document per file), .jsonl (one per line), .parquet, e.g. web.jsonl")
    p.add_argument("--out", required=True,
                   help="directory for clean.jsonl ({\"text\": ...} lines) and summary.json, e.g. --out runs/clean")
    p.add_argument("--text-field", default="text", help="JSONL key / parquet column holding the text (default: text)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip (and count) malformed JSONL lines instead of stopping at the first")
    p.add_argument("--disable", nargs="+", default=[], metavar="STEP", choices=list(STEPS),
                   help="steps to switch off, e.g. --disable stop_words near_duplicates; the steps: "
                        + ", ".join(STEPS))
    p.add_argument("--min-words", type=int, default=50, help="the words rule's lower bound (Gopher: 50), e.g. 20")
    p.add_argument("--max-words", type=int, default=100_000,
                   help="the words rule's upper bound (Gopher: 100000), e.g. 50000")
    p.add_argument("--bands", type=int, default=16,
                   help="MinHash LSH bands (default 16): more bands catch less similar near duplicates")
    p.add_argument("--rows", type=int, default=8,
                   help="MinHash values per band (default 8): more rows demand more similarity, e.g. --rows 10")
    p.add_argument("--workers", type=int, default=0, help="processes scoring documents (default 0: one per core), "
                                                          "e.g. --workers 1; the output is the same for any number")
    p.add_argument("--examples", type=int, default=3,
                   help="removed documents kept as examples per step in summary.json (default 3)")


def cmd_data_clean(args: Namespace) -> None:
    from lmforge.data.clean import CleanOptions, clean_documents, summary_lines
    from lmforge.data.quality import QualityThresholds

    if args.min_words < 0 or args.max_words < args.min_words:
        raise ConfigError(f"--min-words {args.min_words} / --max-words {args.max_words}: need 0 <= min <= max")
    options = CleanOptions(disabled=frozenset(args.disable), bands=args.bands, rows=args.rows, workers=args.workers,
                           examples=args.examples,
                           limits=QualityThresholds(min_words=args.min_words, max_words=args.max_words))
    summary = clean_documents(args.input, args.out, options, text_field=args.text_field,
                              skip_bad_lines=args.skip_bad_lines)
    print("\n".join(summary_lines(summary)))
    print(f"wrote {Path(args.out) / 'clean.jsonl'} and {Path(args.out) / 'summary.json'}")


def _add_sampling_options(p: ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default, as in the Python API's SamplingConfig); > 0 samples, e.g. "
                        "--temperature 0.8")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample only from the k most likely tokens, e.g. --top-k 50 (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling mass in (0, 1], e.g. --top-p 0.9 (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible output), e.g. --seed 1")


def generate_options(p: ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", help="run dir, checkpoint dir or Hugging Face model dir")
    p.add_argument("--adapter", help="instead of a checkpoint: a peft LoRA/DoRA adapter folder, put on its base "
                                     "(e.g. the output of lmforge export RUN --format peft)")
    p.add_argument("--base", help="with --adapter: the base model's dir, overriding the adapter's "
                                  "base_model_name_or_path (needed when that is a hub id: lmforge does not download)")
    p.add_argument("--prompt", help="text to continue; with --chat, the user's message, e.g. --prompt 'The capital of'")
    p.add_argument("--chat", action="store_true",
                   help="render --prompt as a user turn with the model's chat template (the one its run trained with, "
                        "or its Hugging Face chat_template) and print the assistant's reply, which ends at the "
                        "template's end of turn, e.g. --chat --prompt 'Name a colour.'")
    p.add_argument("--messages", metavar="FILE",
                   help="with --chat: the conversation so far, a JSON list of {role, content} objects (system, user, "
                        "assistant); --prompt, if given, is one more user turn, e.g. --chat --messages chat.json")
    p.add_argument("--template", help="with --chat: this chat template instead of the model's own: lmforge | llama2 | "
                                      "alpaca | hf, e.g. --template llama2")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    _add_sampling_options(p)
    p.add_argument("--stop", nargs="*", default=[], help="stop when any of these strings appears")
    p.add_argument("--num-samples", type=int, default=1,
                   help="how many continuations to print (>= 1; sample i uses --seed + i)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (slow)")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end instead of as it comes")
    p.add_argument("--truncate-prompt", action="store_true",
                   help="keep the prompt's last tokens if it does not fit the context window")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: 10-20 s of compiling first, then on 2 CPU cores ~10% "
                        "faster per token at GPT-2-small size, ~4% at the demo size (off by default)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1 = off)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score = log p / length^this (default 1)")
    p.add_argument("--draft", help="a smaller decoder with the same vocabulary: speculative decoding (same output "
                                   "distribution as the target alone)")
    p.add_argument("--num-draft", type=int, default=4, help="tokens the draft proposes per round (default 4)")
    p.add_argument("--draft-min-confidence", type=float, default=0.5,
                   help="greedy: end a round's drafting after a token the draft gives less than this probability "
                        "(saves work on likely rejections; output unchanged; 0 = always --num-draft; default 0.5)")


def _sampling_config(args: Namespace):
    """The SamplingConfig of `lmforge generate`'s options, each option checked (before any model loads)."""
    from lmforge.infer.beam import check_beam_options
    from lmforge.infer.generate import SamplingConfig, require_utf8
    from lmforge.infer.speculative import check_draft_options

    if not args.chat and (args.messages or args.template):
        raise ConfigError(f"{'--messages' if args.messages else '--template'} goes with --chat (a conversation "
                          "rendered with a chat template); add --chat")
    if args.prompt is None and not args.messages:
        raise ConfigError("give --prompt TEXT (or --chat --messages FILE.json) (see `lmforge generate --help`)")
    if args.prompt is not None:
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
    if args.chat and (args.num_beams > 1 or args.draft):
        raise ConfigError("--chat works with plain decoding, not with --num-beams or --draft")
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


def cmd_generate(args: Namespace) -> None:
    from functools import partial

    from lmforge.infer.generate import generate
    from lmforge.infer.layout import column_major_linears
    from lmforge.infer.model_kind import load_for_verb

    cfg = _sampling_config(args)
    if (args.checkpoint is None) == (args.adapter is None):
        raise LmforgeError("give one model: a checkpoint dir or --adapter DIR (a peft adapter folder)")
    if args.base is not None and args.adapter is None:
        raise LmforgeError("--base is the base model of --adapter DIR; give --adapter too")
    source = args.adapter or args.checkpoint
    messages = _chat_messages(args)  # a bad messages file fails before the model loads
    verb = "lmforge generate --chat" if args.chat else "lmforge generate"
    model, tokenizer, kind = load_for_verb(source, verb, ("decoder",) if args.chat else ("decoder", "encdec"),
                                             args.base)
    if kind == "encdec":  # T5: the prompt is the encoder's input, the output a new text
        from lmforge.infer.generate_encdec import generate_text2text as generate
    search = args.num_beams > 1 or args.draft
    if search and kind != "decoder":
        raise LmforgeError("--num-beams and --draft work with decoders (GPT, Llama)")
    column_major_linears(model)  # faster small-batch matmuls; generation only reads the weights
    if search:
        print(args.prompt + _search(args, model, tokenizer, cfg))
        return
    if args.chat:  # the reply alone is printed: the rendered prompt is the template's markup
        from lmforge.infer.chat_repl import reply

        template = _chat_template(args, source, tokenizer, messages)
        produce, lead = partial(reply, model, tokenizer, template, messages), ""
    else:
        produce, lead = partial(generate, model, tokenizer, args.prompt), args.prompt if kind == "decoder" else ""
    for i in range(args.num_samples):
        header = f"--- sample {i + 1}\n" if args.num_samples > 1 else ""
        if args.num_samples > 1:
            cfg.seed = None if args.seed is None else args.seed + i
        write = _write_after(header + lead)
        text = produce(cfg=cfg, stream=None if args.no_stream else write)
        write((text if args.no_stream else "") + "\n")


def _chat_messages(args: Namespace) -> list[dict]:
    """The conversation of `generate --chat`: --messages FILE, then --prompt as a user turn."""
    from lmforge.infer.chat_repl import read_messages

    messages = read_messages(args.messages) if args.messages else []
    return messages + ([{"role": "user", "content": args.prompt}] if args.prompt is not None else [])


def _chat_template(args: Namespace, source: str, tokenizer, messages: list[dict]):
    """The model's chat template (or --template's), with `messages` checked by rendering them once (an error names
    --messages FILE)."""
    from lmforge.infer.chat_repl import chat_prompt, model_chat_template

    template = model_chat_template(source, tokenizer, args.template, args.base)
    try:
        chat_prompt(template, messages)
    except DataError as err:
        raise DataError(f"--messages {args.messages}: {err}" if args.messages else str(err)) from None
    return template


def chat_options(p: ArgumentParser) -> None:
    p.add_argument("checkpoint", help="the chat model: run dir, checkpoint dir or Hugging Face dir of a decoder, "
                                      "e.g. runs/sft")
    p.add_argument("--system", help="system prompt, e.g. --system 'Answer in one sentence.' (in the chat: /system "
                                    "TEXT replaces it)")
    p.add_argument("--template", help="this chat template instead of the model's own (the one its run trained with, or "
                                      "its Hugging Face chat_template): lmforge | llama2 | alpaca | hf, e.g. "
                                      "--template lmforge")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest reply in tokens, e.g. --max-new-tokens 128 (default: half the context, at most "
                        "256); the prompt gets the rest of the context")
    _add_sampling_options(p)


def cmd_chat(args: Namespace) -> None:
    from lmforge.infer.chat_repl import COMMANDS, ChatSession, model_chat_template, run_repl
    from lmforge.infer.generate import SamplingConfig, require_utf8
    from lmforge.infer.layout import column_major_linears
    from lmforge.infer.model_kind import load_for_verb

    if args.system is not None:
        require_utf8(args.system, "--system")
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens or 1, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed)  # checks the options before the model loads
    model, tokenizer, _ = load_for_verb(args.checkpoint, "lmforge chat", ("decoder",))
    template = model_chat_template(args.checkpoint, tokenizer, args.template)
    context = model.cfg.max_seq_len
    cfg.max_new_tokens = args.max_new_tokens or min(256, context // 2)
    session = ChatSession(model, tokenizer, template, cfg, args.system)
    column_major_linears(model)  # faster small-batch matmuls; generation only reads the weights
    single = "; single-turn: each message is answered on its own" if not template.multi_turn else ""
    print(f"[chat with {args.checkpoint}: {template.name} template, {context}-token context{single}; commands: "
          f"{COMMANDS}]", file=sys.stderr)
    run_repl(session, sys.stdin)


def _refuse_out_over_input(out: str, source: str) -> None:
    """--out must not be the input, nor hold it: the new dir replaces --out whole."""
    if Path(out).resolve() in (Path(source).resolve(), *Path(source).resolve().parents):
        raise ConfigError(f"--out {out} would replace the input {source}, which this command reads; choose another "
                          "--out")


def merge_options(p: ArgumentParser) -> None:
    p.add_argument("checkpoint", help="run or checkpoint dir trained with --peft")
    p.add_argument("--out", required=True, help="where to write the merged model")
    p.add_argument("--hf", action="store_true", help="write a Hugging Face dir instead of an lmforge checkpoint")


def cmd_merge(args: Namespace) -> None:
    import lmforge
    from lmforge.checkpoint import read_manifest, resolve_checkpoint
    from lmforge.export import export_run
    from lmforge.peft.config import merge_peft

    _refuse_out_over_input(args.out, args.checkpoint)
    ckpt = resolve_checkpoint(args.checkpoint)
    manifest = read_manifest(ckpt)
    if manifest.peft is None:
        raise LmforgeError(f"{ckpt} was not trained with --peft; there is nothing to merge (to write a Hugging Face "
                           f"dir use: lmforge export {args.checkpoint} --format hf --out DIR)")
    if manifest.task:
        raise LmforgeError(f"{ckpt} is a '{manifest.task}' task model; merge folds language-model adapters "
                           "(sft, text2text); keep the task model as it is")
    if args.hf:  # the export carries the run's chat template too
        print(export_run(ckpt, "hf", args.out).note)
        return
    model, tokenizer = lmforge.load(ckpt)
    model = merge_peft(model, manifest.peft)
    path = lmforge.save(model, tokenizer, args.out)
    print(f"merged {manifest.peft.method} into the base weights -> {path}")


def export_options(p: ArgumentParser) -> None:
    p.add_argument("checkpoint", help="lmforge run or checkpoint dir, e.g. runs/sft (its config.yaml says how it was "
                                      "trained: chat template, labels, PEFT method)")
    p.add_argument("--format", choices=["hf", "peft", "gguf"], default="hf",
                   help="hf (default): a save_pretrained dir for transformers (a PEFT run is merged first; a chat "
                        "run's template and stop tokens included), e.g. --format hf; peft: an adapter folder for "
                        "peft's PeftModel / AutoPeftModelForCausalLM (LoRA-family runs), e.g. --format peft; gguf: "
                        "one file llama.cpp and Ollama run (GPT-2 and Llama models; a PEFT run merged first), "
                        "e.g. --format gguf")
    p.add_argument("--type", dest="gguf_type", choices=["f32", "f16", "q8_0", "q4_0"],
                   help="--format gguf: the matrices' type (default f32; q8_0/q4_0 need rows that are multiples "
                        "of 32), e.g. --type q8_0")
    p.add_argument("--out", required=True, help="directory (a .gguf file for --format gguf) to write, e.g. --out "
                                                "runs/sft-hf")
    p.add_argument("--base-name", help="--format peft: the base model as the folder's users will name it, written "
                                       "as base_model_name_or_path: a hub id or a path, e.g. --base-name gpt2 "
                                       "(default: the run's base, if it is a Hugging Face dir)")


def cmd_export(args: Namespace) -> None:
    from lmforge.export import export_run

    _refuse_out_over_input(args.out, args.checkpoint)
    print(export_run(args.checkpoint, args.format, args.out, base_name=args.base_name, gguf_type=args.gguf_type).note)


def quantize_options(p: ArgumentParser) -> None:
    p.add_argument("checkpoint", help="lmforge checkpoint/run dir or Hugging Face dir (a decoder)")
    p.add_argument("--bits", type=int, choices=[8, 4], default=8, help="8 (per channel) or 4 (group-wise); default 8")
    p.add_argument("--group-size", type=int, default=64, help="int4 group along the input dim (default: 64)")
    p.add_argument("--out", required=True, help="where to write the quantised checkpoint (loads with lmforge.load)")
    p.add_argument("--keep-fp32-embedding", action="store_true",
                   help="leave a head tied to the token embedding (GPT-2) in fp32; by default the tied pair is "
                        "quantised once, like the other Linears, and the embedding looks its rows up in the codes")


def cmd_quantize(args: Namespace) -> None:
    from lmforge.infer.quantize_stage import quantize_checkpoint

    _refuse_out_over_input(args.out, args.checkpoint)
    path, report = quantize_checkpoint(args.checkpoint, args.out, args.bits, args.group_size,
                                       tied_embedding=not args.keep_fp32_embedding)
    tied = " (with the tied embedding)" if report["tied_embedding"] else ""
    print(f"int{args.bits}: {len(report['modules'])} Linear layers{tied}, {report['bytes_before']:,} -> "
          f"{report['bytes_after']:,} bytes ({report['bytes_before'] / report['bytes_after']:.2f}x smaller) -> {path}")


def _search(args: Namespace, model, tokenizer, cfg) -> str:
    """Beam search (the best of --num-beams hypotheses) or speculative decoding with a --draft model."""
    import lmforge
    from lmforge.infer.layout import column_major_linears

    ids = tokenizer.encode(args.prompt)
    if args.num_beams > 1:
        from lmforge.infer.beam import beam_search

        (best, score), *_ = beam_search(model, ids, args.num_beams, args.max_new_tokens, tokenizer.eos_id,
                                        length_penalty=args.length_penalty, truncate_prompt=args.truncate_prompt)
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


def demo_options(p: ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a tiny run (under 2 minutes) that exercises every stage")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="decoder pretraining precision; auto = bf16 on a CPU with bf16 instructions (AMX bf16 or "
                        "AVX512-BF16), else fp32; e.g. --precision fp32 (default: auto)")
    p.add_argument("--out-dir", default="runs/demo",
                   help="scratch dir for data, tokenizer and checkpoints (replaced on each demo run; must be "
                        "missing, empty or an earlier demo's)")
    p.add_argument("--report-dir", default="report", help="where README.md and plots go (default: report)")


def cmd_demo(args: Namespace) -> None:
    from lmforge.demo import run_demo

    run_demo(out_dir=Path(args.out_dir), report_dir=Path(args.report_dir), quick=args.quick,
             precision=args.precision)
