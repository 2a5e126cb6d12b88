"""`lmforge agent`: answer questions with the ReAct loop and a chosen set of tools, or with CodeAct (Python run in the
sandbox) (options, then the command).
Nothing here imports torch until the command runs; lmforge.rag is imported only for --index."""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from lmforge.errors import ConfigError, DataError

AGENT_EXAMPLE = ('lmforge agent runs/sft --tools calculator --question "What is 347 * 28 + 1250?"\n'
           '  lmforge agent runs/sft --tools calculator,search --index runs/docs-index --tasks questions.jsonl '
           '--transcript react.jsonl --max-steps 4\n'
           '  lmforge agent runs/sft --method codeact --question "What is 347 * 28 + 1250?" --timeout 2')


def agent_options(p: ArgumentParser) -> None:
    p.add_argument("checkpoint", help="the chat model: run dir, checkpoint dir or Hugging Face dir of a decoder, "
                                      "e.g. runs/sft")
    p.add_argument("--method", choices=("react", "codeact"), default="react",
                   help="react: Thought / Action: tool[input] / Observation turns with --tools; codeact: the model "
                        "writes Python blocks, run in the sandbox (lmforge.agents.sandbox; see docs/SANDBOX.md), "
                        "their printed output the observation (--tools does not apply), e.g. --method codeact "
                        "(default: react)")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="codeact: wall-clock seconds each code block may run before the sandbox kills it, e.g. "
                        "--timeout 2 (default: 5)")
    p.add_argument("--tools", default="calculator",
                   help="comma-separated tools: calculator (arithmetic, parsed safely), search (top passages of "
                        "--index), lookup (the next sentence of the last search's passages naming a term), e.g. "
                        "--tools calculator,search (default: calculator)")
    p.add_argument("--question", help="one question, e.g. --question 'What is 347 * 28?'")
    p.add_argument("--tasks", metavar="FILE.jsonl",
                   help="instead of --question: one JSON object per line with \"question\" (and \"answer\", which "
                        "makes the command report accuracy), e.g. --tasks questions.jsonl")
    p.add_argument("--index", help="the document index search and lookup read (written by `lmforge rag index`), "
                                   "e.g. --index runs/docs-index")
    p.add_argument("--max-steps", type=int, default=5,
                   help="completions (thought and action) per question before it ends without an answer, which is "
                        "then recorded as null (default: 5)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="longest completion per step (default: 96)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (step i of a question uses seed + i)")
    p.add_argument("--template", help="this chat template instead of the model's own: lmforge | llama2 | alpaca | hf")
    p.add_argument("--transcript", metavar="OUT.jsonl",
                   help="write every question's transcript (question, method, steps, answer, stop_reason, prompt) "
                        "as JSON lines, e.g. --transcript react.jsonl")


def read_tasks(path: str) -> list[dict]:
    """{"question": str, "answer"?: str | number} lines; a bad line is a one-line DataError naming file:line."""
    from lmforge.data.readers import jsonl_objects

    if not Path(path).is_file():
        raise DataError(f"--tasks {path}: file not found")
    tasks = []
    for where, obj in jsonl_objects(Path(path)):
        if isinstance(obj, DataError):
            raise DataError(f"{where}: {obj}; fix the line")
        question = obj.get("question")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: needs a non-empty string \"question\" (keys present: "
                            f"{', '.join(sorted(obj)) or 'none'})")
        if "answer" in obj and not isinstance(obj["answer"], str | int | float):
            raise DataError(f"{where}: \"answer\" must be a string or a number, got {type(obj['answer']).__name__}")
        tasks.append(obj)
    if not tasks:
        raise DataError(f"--tasks {path}: no questions in the file")
    return tasks


def _load_index(path: str):
    """lmforge.rag's Index at `path` (the search tool takes any object with search(query, k))."""
    from lmforge.rag import Index

    return Index.load(path)


def _check(args: Namespace) -> list[str]:
    from lmforge.data.formats import TOOL_NAMES

    if (args.question is None) == (args.tasks is None):
        raise ConfigError("give one of --question TEXT or --tasks FILE.jsonl (see `lmforge agent --help`)")
    for option, value in (("--max-steps", args.max_steps), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise ConfigError(f"{option} must be >= 1, got {value}")
    if not args.timeout > 0:
        raise ConfigError(f"--timeout must be > 0 seconds, got {args.timeout}")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in tools if t not in TOOL_NAMES]
    if unknown or not tools:
        raise ConfigError(f"--tools {args.tools!r}: {'unknown tool ' + repr(unknown[0]) if unknown else 'no tools'}; "
                          f"choose from {', '.join(TOOL_NAMES)}, e.g. --tools calculator,search")
    if args.index is None and {"search", "lookup"} & set(tools):
        raise ConfigError("--tools search and lookup read a document index: pass --index INDEX (built by "
                          "`lmforge rag index`), or drop them from --tools")
    if args.transcript is not None:
        from lmforge.io import require_dir_path

        if Path(args.transcript).is_dir():
            raise ConfigError(f"--transcript {args.transcript} is a directory; give a file path, e.g. "
                              f"{Path(args.transcript) / 'react.jsonl'}")
        require_dir_path(Path(args.transcript).parent, "--transcript")
    return tools


def _same(given: str | None, expected: object) -> bool:
    return given is not None and given.strip().lower() == str(expected).strip().lower()


def cmd_agent(args: Namespace) -> None:
    from lmforge.agents.codeact import SandboxLimits, run_codeact_chat
    from lmforge.agents.completer import load_completer
    from lmforge.agents.react import run_react_chat
    from lmforge.agents.tools import make_tools
    from lmforge.agents.transcript import write_transcripts
    from lmforge.infer.generate import SamplingConfig, require_utf8

    tools = _check(args)
    SamplingConfig(temperature=args.temperature)  # checks --temperature before the model loads
    if args.question is not None:
        require_utf8(args.question, "--question")
    tasks = [{"question": args.question}] if args.question is not None else read_tasks(args.tasks)
    retriever = _load_index(args.index) if args.index is not None else None
    complete = load_completer(args.checkpoint, args.template)
    transcripts, correct = [], 0
    options = dict(max_steps=args.max_steps, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   seed=args.seed)
    for task in tasks:
        if args.method == "codeact":
            run = run_codeact_chat(complete, task["question"], limits=SandboxLimits(timeout_s=args.timeout), **options)
        else:
            run = run_react_chat(complete, task["question"], make_tools(tools, retriever), **options)
        transcripts.append(run)
        correct += _same(run.answer, task["answer"]) if "answer" in task else 0
        if args.question is not None:
            print(run.assistant_text)
        calls = sum(s.kind in ("action", "code") for s in run.steps)
        print(f"answer: {run.answer if run.answer is not None else '(none)'} ({run.stop_reason}, "
              f"{calls} {'code blocks run' if args.method == 'codeact' else 'tool calls'})")
    scored = sum("answer" in t for t in tasks)
    if scored:
        print(f"accuracy: {correct}/{scored} = {correct / scored:.3f}")
    if args.transcript is not None:
        print(f"transcripts: {write_transcripts(args.transcript, transcripts)}")
