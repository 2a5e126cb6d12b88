"""`lmforge chat` and `lmforge generate --chat`: talking to a chat model through its chat template.

Each turn renders the conversation (system prompt, then user and assistant messages) with the template's generation
prompt, generates until one of the template's stop ids (end of turn, EOS), and adds the reply to the history. When
the rendered conversation and `max_new_tokens` outgrow the context, the oldest exchanges leave the prompt (the
system prompt stays; `/save` still writes them) and a notice says so on stderr.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from lmforge.data.chat import ChatTemplate, Message, get_chat_template
from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.infer.generate import SamplingConfig, StopStreamer, generate_ids, require_utf8
from lmforge.model.decoder import DecoderLM
from lmforge.tokenizer import Tokenizer

COMMANDS = "/reset, /system TEXT, /save FILE, /exit"


def _has_hf_template(directory: Path) -> bool:
    config = directory / "tokenizer_config.json"
    if (directory / "chat_template.jinja").is_file():
        return True
    try:
        return "chat_template" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def recorded_chat_template(source: str, base: str | None = None) -> tuple[str | None, Path]:
    """(the name of the chat template the model at `source` carries, or None; the dir holding it): the one its
    lmforge run trained with (config.yaml), or "hf" for a Hugging Face dir with a chat_template."""
    from lmforge.checkpoint import read_manifest, resolve_checkpoint
    from lmforge.model.hf import is_hf_dir
    from lmforge.peft.peft_import import peft_base, read_peft_config

    path = Path(source)
    if read_peft_config(path) is not None and not _has_hf_template(path):
        path = peft_base(path, base)
    if is_hf_dir(path) or read_peft_config(path) is not None:
        return ("hf" if _has_hf_template(path) else None), path
    manifest = read_manifest(resolve_checkpoint(path))
    return manifest.run.get("template"), manifest.base


def model_chat_template(source: str, tokenizer: Tokenizer, name: str | None = None,
                        base: str | None = None) -> ChatTemplate:
    """The chat template of the model at `source`: `name` (lmforge, llama2, alpaca, hf) when given, else the one its
    lmforge run trained with (config.yaml) or its Hugging Face dir's chat_template. `base`: a peft folder's base."""
    template = optional_chat_template(source, tokenizer, name, base)
    if template is None:
        raise ConfigError(f"{source} records no chat template (it was not trained by lmforge sft, dpo, ppo or grpo, "
                          "and has no Hugging Face chat_template); pass --template lmforge, llama2, alpaca or hf")
    return template


def optional_chat_template(source: str, tokenizer: Tokenizer, name: str | None = None,
                           base: str | None = None) -> ChatTemplate | None:
    """`model_chat_template`, or None when `name` is None and the model records no template (a plain LM)."""
    recorded, template_dir = recorded_chat_template(source, base)
    if name is None and recorded is None:
        return None
    return get_chat_template(name or recorded, tokenizer, template_dir)


def read_messages(path: str) -> list[Message]:
    """A JSON file holding a list of {role, content} objects (checked by the template when it renders)."""
    try:
        messages = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise DataError(f"--messages {path}: cannot read it ({err.strerror})") from None
    except UnicodeDecodeError:
        raise DataError(f"--messages {path}: not UTF-8 text; save it as UTF-8 JSON") from None
    except json.JSONDecodeError as err:
        raise DataError(f"--messages {path}: not valid JSON (line {err.lineno}, column {err.colno}: "
                        f"{err.msg})") from None
    if not isinstance(messages, list) or not messages:
        raise DataError(f"--messages {path}: expected a non-empty JSON list of {{\"role\", \"content\"}} objects, got "
                        f"{'an empty list' if messages == [] else type(messages).__name__}")
    return messages


def chat_prompt(template: ChatTemplate, messages: list[Message]) -> list[int]:
    """The ids generation starts from: `messages` rendered with the template's generation prompt."""
    return template.render(messages, add_generation_prompt=True).ids


def reply(model: DecoderLM, tokenizer: Tokenizer, template: ChatTemplate, messages: list[Message],
          cfg: SamplingConfig, stream: Callable[[str], None] | None = None, interruptible: bool = False) -> str:
    """The assistant's reply to `messages`, ending at the template's stop ids (or cfg.stop strings); `stream(delta)`
    receives its text as it comes. Special tokens are left out of the text: a role token the model writes would
    otherwise make its reply one the template refuses to render on the next turn. `interruptible`: Ctrl-C ends the
    reply (kept as far as it got), not the program."""
    streamer = StopStreamer(tokenizer, cfg.stop, stream, skip_special_tokens=True)
    try:
        generate_ids(model, chat_prompt(template, messages), cfg, template.stop_ids, on_token=streamer)
    except KeyboardInterrupt:
        if not interruptible:
            raise
        print("\n[reply interrupted]", file=sys.stderr)
    return streamer.finish()


class ChatSession:
    """A conversation with a model: the system prompt, the user and assistant turns, and the first turn that
    still fits the context."""

    def __init__(self, model: DecoderLM, tokenizer: Tokenizer, template: ChatTemplate, cfg: SamplingConfig,
                 system: str | None = None):
        self.model, self.tokenizer, self.template, self.cfg = model, tokenizer, template, cfg
        self.system = system or None
        self.turns: list[Message] = []  # user, assistant, user, ... (oldest first)
        self.first_kept = 0  # turns before this index no longer fit the context
        self.room = model.cfg.max_seq_len - cfg.max_new_tokens  # tokens a prompt may have
        if self.room < 1:
            raise ConfigError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in the model's "
                              f"{model.cfg.max_seq_len}-token context; lower it")

    def messages(self, start: int = 0) -> list[Message]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.turns[start:]

    def _fit(self) -> list[Message]:
        """The messages of the prompt: the system prompt and the latest turns whose rendering fits `room` (a
        single-turn template: the last user turn only)."""
        start = max(self.first_kept, len(self.turns) - 1 if not self.template.multi_turn else 0)
        while len(chat_prompt(self.template, self.messages(start))) > self.room:
            if start == len(self.turns) - 1:
                raise LmforgeError(f"the message does not fit the {self.model.cfg.max_seq_len}-token context with "
                                   f"--max-new-tokens {self.cfg.max_new_tokens}; send a shorter one (or /system to "
                                   "shorten the system prompt)")
            start += 2  # one exchange: a user turn and its reply
        if self.template.multi_turn and start > self.first_kept:
            dropped = (start - self.first_kept) // 2
            kept = "; the system prompt is kept" if self.system else ""
            print(f"[dropped the {dropped} oldest exchange{'s' * (dropped > 1)} to fit the "
                  f"{self.model.cfg.max_seq_len}-token context{kept}]", file=sys.stderr)
            self.first_kept = start
        return self.messages(start)

    def say(self, text: str, stream: Callable[[str], None] | None = None) -> str:
        """Add the user's `text`, generate and add the reply; on an error the user turn is taken back."""
        self.turns.append({"role": "user", "content": text})
        try:
            answer = reply(self.model, self.tokenizer, self.template, self._fit(), self.cfg, stream,
                           interruptible=True)
        except LmforgeError:
            self.turns.pop()
            raise
        self.turns.append({"role": "assistant", "content": answer})
        return answer

    def reset(self) -> None:
        self.turns, self.first_kept = [], 0

    def save(self, path: str) -> Path:
        from lmforge.io import atomic_write_text

        text = json.dumps(self.messages(), ensure_ascii=False, indent=2) + "\n"
        try:
            return atomic_write_text(path, text)
        except OSError as err:
            raise LmforgeError(f"/save {path}: cannot write it ({err.strerror}); the conversation is kept") from None


def _lines(stdin: TextIO) -> Iterator[str]:
    """The user's lines: with a prompt on a terminal (line editing through input()), plain lines otherwise."""
    while True:
        try:
            line = input("> ") if stdin.isatty() else stdin.readline()
        except EOFError:
            return
        if not line and not stdin.isatty():
            return
        yield line.rstrip("\n")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_repl(session: ChatSession, stdin: TextIO) -> None:
    """Read lines until /exit or end of input: a command, or a message answered with a streamed reply. Bytes that
    are not UTF-8 make that line an error, not the end of the chat."""
    if hasattr(stdin, "reconfigure"):
        stdin.reconfigure(errors="surrogateescape")
    for line in _lines(stdin):
        command, _, argument = line.strip().partition(" ")
        try:
            if command == "/exit":
                return
            elif command == "/reset":
                session.reset()
                print("[history cleared]", file=sys.stderr)
            elif command == "/system":
                session.system = argument.strip() or None
                print(f"[system prompt {'set' if session.system else 'removed'}]", file=sys.stderr)
            elif command == "/save":
                if not argument.strip():
                    raise LmforgeError("/save needs a file name, e.g. /save chat.json")
                print(f"[saved {len(session.messages())} messages to {session.save(argument.strip())}]",
                      file=sys.stderr)
            elif command.startswith("/"):
                raise LmforgeError(f"unknown command {command}; the commands are {COMMANDS}")
            elif line.strip():
                require_utf8(line, "the message")
                session.say(line, stream=_write)
                _write("\n")
        except LmforgeError as err:
            print(f"lmforge: error: {err}", file=sys.stderr)
