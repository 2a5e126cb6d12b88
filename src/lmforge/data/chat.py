"""Chat templates: OpenAI-format messages -> token ids plus a mask of the tokens the assistant wrote.

A conversation is ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``. Rendering it gives
`RenderedChat`: the ids and `assistant_mask`, True exactly on the assistant's tokens including the token that
closes its turn (end-of-turn or EOS), so SFT learns both the reply and when to stop. With
``add_generation_prompt=True`` the ids end exactly where the assistant's reply begins, so a prompt rendered
that way followed by the reply's ids is the full conversation's ids.

Templates:

* ``lmforge``: ``BOS <|system|>s<|end_of_turn|><|user|>u<|end_of_turn|><|assistant|>a<|end_of_turn|>``
  (BOS only if the tokenizer has one); the assistant writes ``a<|end_of_turn|>``.
* ``llama2``: Meta's documented format (``chat_completion`` in the llama repo): ``<s>[INST] <<SYS>>\\n{system}
  \\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s>`` per turn, contents stripped, BOS/EOS being the
  tokenizer's; the assistant writes `` {assistant} </s>``.
* ``alpaca``: ``{system or the Stanford Alpaca preamble}\\n\\n### Instruction:\\n{user}\\n\\n### Response:\\n
  {assistant}EOS``, single-turn, after the tokenizer's BOS if it has one (as the LLaMA tokenizer Alpaca was
  trained with adds it).
* `HFChatTemplate`: a Hugging Face Jinja ``chat_template``, rendered like ``transformers`` does (sandboxed
  Jinja, ``trim_blocks``/``lstrip_blocks``, ``bos_token``, ``eos_token``, ``add_generation_prompt``,
  ``raise_exception``) and tokenized as one string.

The built-in templates encode each piece (text or special token) on its own, so masks are exact by
construction; they reject contents holding their special-token literals (``<|end_of_turn|>`` in a user
message would otherwise become a real turn boundary). Errors are `DataError`s without a location: the
readers add file:line.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError, DataError, LmforgeError, one_line
from lmforge.tokenizer import ASSISTANT, END_OF_TURN, SYSTEM, USER, Tokenizer

ROLES = ("system", "user", "assistant")
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
Message = dict[str, str]
_Piece = tuple[str | int, bool]  # (text to encode, or a token id; whether the assistant wrote it)


@dataclass(eq=False)
class RenderedChat:
    """A conversation's token ids and its assistant mask, which may be given as a function computed on first use: an
    HF template finds the mask by rendering each prefix again, which some templates (Qwen3's, dropping earlier
    turns' reasoning) do not allow; inference only needs the ids."""

    ids: list[int]
    _assistant_mask: list[bool] | Callable[[], list[bool]]

    @property
    def assistant_mask(self) -> list[bool]:
        """True on the tokens the assistant wrote, its closing token included."""
        if callable(self._assistant_mask):
            self._assistant_mask = self._assistant_mask()
        return self._assistant_mask

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RenderedChat):
            return NotImplemented
        return self.ids == other.ids and self.assistant_mask == other.assistant_mask


class ChatTemplate(ABC):
    """Renders conversations for one tokenizer; subclasses define the format."""

    name: str
    multi_turn = True  # False: a conversation is one user turn (and its reply), as Alpaca's format has

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def render(self, messages: list[Message], add_generation_prompt: bool = False, *,
               require_assistant: bool = False) -> RenderedChat:
        """Token ids and assistant mask of `messages`; with `add_generation_prompt` the ids stop where the
        assistant's next reply begins. `require_assistant` (training) rejects a conversation with no reply."""
        _check_messages(messages, self.name)
        if add_generation_prompt and messages[-1]["role"] == "assistant":
            raise DataError("the last message is an assistant turn, so there is no reply to prompt for; "
                            "end the conversation with a user message")
        if require_assistant and not any(m["role"] == "assistant" for m in messages):
            raise DataError("the conversation has no assistant turn, so there is nothing to train on")
        return self._render(messages, add_generation_prompt)

    @property
    @abstractmethod
    def stop_ids(self) -> list[int]:
        """Token ids that end an assistant reply (generation stops at any of them)."""

    @abstractmethod
    def _render(self, messages: list[Message], add_generation_prompt: bool) -> RenderedChat: ...


def _check_messages(messages: Any, template: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError("messages must be a non-empty list of {\"role\", \"content\"} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"message {i} must be an object with \"role\" and \"content\", got {message!r:.80}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"message {i} has role {role!r}, which the {template} template does not know; "
                            f"known roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"message {i} ({role}) has content of type {type(content).__name__}; "
                            f"content must be a string")


class _PieceTemplate(ChatTemplate):
    """A template given as a list of pieces (text or token id), each encoded on its own."""

    def __init__(self, tokenizer: Tokenizer, reserved_ids: list[int | None]):
        super().__init__(tokenizer)
        self._reserved = [tokenizer.backend.id_to_token(tid) for tid in reserved_ids if tid is not None]

    @abstractmethod
    def _pieces(self, messages: list[Message], add_generation_prompt: bool) -> list[_Piece]: ...

    def _render(self, messages: list[Message], add_generation_prompt: bool) -> RenderedChat:
        for i, message in enumerate(messages):
            found = [literal for literal in self._reserved if literal in message["content"]]
            if found:
                raise DataError(f"message {i} ({message['role']}) contains the special token {found[0]!r}, which "
                                f"the {self.name} template uses for structure; remove it from the text")
        ids: list[int] = []
        mask: list[bool] = []
        for piece, by_assistant in self._pieces(messages, add_generation_prompt):
            piece_ids = [piece] if isinstance(piece, int) else self.tokenizer.encode(piece)
            ids += piece_ids
            mask += [by_assistant] * len(piece_ids)
        return RenderedChat(ids, mask)


def _special(tokenizer: Tokenizer, literal: str, template: str) -> int:
    tid = tokenizer.token_id(literal)
    if tid is None:
        raise LmforgeError(f"the tokenizer has no {literal} token, which the {template} template needs; "
                           f"use a tokenizer trained by lmforge, or another template (llama2, alpaca, hf)")
    return tid


def _eos(tokenizer: Tokenizer, template: str) -> int:
    if tokenizer.eos_id is None:
        raise LmforgeError(f"the {template} template ends replies with EOS, but the tokenizer has no EOS token")
    return tokenizer.eos_id


def ending_ids(tokenizer: Tokenizer, template: ChatTemplate | None) -> list[int]:
    """Every id that ends a reply of a model trained with `template`: its end of turn, then EOS. The HF export
    lists them as generation_config.json's `eos_token_id`, and lmforge serve stops text completions at them too,
    as transformers and vLLM do with that file."""
    stops = list(template.stop_ids) if template is not None else []
    return list(dict.fromkeys(stops + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])))


def token_text(tokenizer: Tokenizer, tid: int | None) -> str:
    """The text of special token `tid` as a template writes it ("" when the tokenizer has none)."""
    return tokenizer.backend.id_to_token(tid) if tid is not None else ""


class LmforgeTemplate(_PieceTemplate):
    """lmforge's role tokens: ``<|role|>content<|end_of_turn|>`` per message, after BOS if there is one."""

    name = "lmforge"

    def __init__(self, tokenizer: Tokenizer):
        self._role = {role: _special(tokenizer, literal, self.name)
                      for role, literal in (("system", SYSTEM), ("user", USER), ("assistant", ASSISTANT))}
        self._end = _special(tokenizer, END_OF_TURN, self.name)
        super().__init__(tokenizer, [*self._role.values(), self._end, tokenizer.bos_id, tokenizer.eos_id])

    @property
    def stop_ids(self) -> list[int]:
        return [self._end] + ([self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else [])

    def _pieces(self, messages: list[Message], add_generation_prompt: bool) -> list[_Piece]:
        bos = self.tokenizer.bos_id
        pieces: list[_Piece] = [(bos, False)] if bos is not None else []
        for m in messages:
            by_assistant = m["role"] == "assistant"
            pieces += [(self._role[m["role"]], False), (m["content"], by_assistant), (self._end, by_assistant)]
        if add_generation_prompt:
            pieces.append((self._role["assistant"], False))
        return pieces


def _turns(messages: list[Message], template: str, multi_turn: bool) -> tuple[str | None, list[Message]]:
    """(system content or None, the rest), checking the rest alternates user/assistant from a user turn."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    rest = messages[1:] if system is not None else messages
    expected = "user"
    for i, m in enumerate(rest):
        if m["role"] != expected or (not multi_turn and i > 1):
            shape = "user and assistant turns alternating" if multi_turn else "one user turn and one reply"
            raise DataError(f"the {template} template needs an optional first system message, then {shape}; "
                            f"message {i + (system is not None)} is {m['role']!r}")
        expected = "assistant" if expected == "user" else "user"
    if not rest:
        raise DataError(f"the {template} template needs a user message after the system message")
    return system, rest


class _EosTemplate(_PieceTemplate):
    """A piece template whose assistant turns end with the tokenizer's EOS, where generation stops."""

    def __init__(self, tokenizer: Tokenizer):
        self._eos = _eos(tokenizer, self.name)
        super().__init__(tokenizer, [tokenizer.bos_id, self._eos])

    @property
    def stop_ids(self) -> list[int]:
        return [self._eos]


class Llama2Template(_EosTemplate):
    """Llama-2-chat: ``BOS[INST] <<SYS>>...<</SYS>>\\n\\nuser [/INST] reply EOS`` per turn (Meta's format). A final
    user turn always ends with ``[/INST]``, where the reply begins, with or without the generation prompt."""

    name = "llama2"

    def _pieces(self, messages: list[Message], add_generation_prompt: bool) -> list[_Piece]:
        system, turns = _turns(messages, self.name, multi_turn=True)
        bos = self.tokenizer.bos_id
        pieces: list[_Piece] = []
        for i in range(0, len(turns), 2):
            user = turns[i]["content"]
            if i == 0 and system is not None:
                user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
            pieces += ([(bos, False)] if bos is not None else []) + [(f"[INST] {user.strip()} [/INST]", False)]
            if i + 1 < len(turns):
                pieces += [(f" {turns[i + 1]['content'].strip()} ", True), (self._eos, True)]
        return pieces


class AlpacaTemplate(_EosTemplate):
    """Stanford Alpaca's single-turn instruction format; a system message replaces the standard preamble. A
    prompt without a reply always ends with ``### Response:\\n``, with or without the generation prompt."""

    name = "alpaca"
    multi_turn = False

    def _pieces(self, messages: list[Message], add_generation_prompt: bool) -> list[_Piece]:
        system, turns = _turns(messages, self.name, multi_turn=False)
        bos = self.tokenizer.bos_id
        preamble = ALPACA_PREAMBLE if system is None else system
        pieces: list[_Piece] = [(bos, False)] if bos is not None else []
        pieces.append((f"{preamble}\n\n### Instruction:\n{turns[0]['content']}\n\n### Response:\n", False))
        if len(turns) == 2:
            pieces += [(turns[1]["content"], True), (self._eos, True)]
        return pieces


class HFChatTemplate(ChatTemplate):
    """A Hugging Face Jinja ``chat_template``, rendered in a sandbox as ``transformers`` does.

    The rendered text is tokenized as one string (special-token literals become their ids, as in HF). The
    assistant mask is found by rendering incrementally: for the assistant turn at index i, the text of
    ``messages[:i]`` with the generation prompt (or, if that is not a prefix, without it) and the text of
    ``messages[:i + 1]`` differ by exactly what the assistant wrote plus the template's closing markup; those
    characters, minus trailing whitespace the template adds after the closing token (e.g. ChatML's newline
    after ``<|im_end|>``), are the assistant's, and every token overlapping them is marked. This needs each
    prefix's text to be a prefix of the full text, which holds for ordinary templates; otherwise the
    conversation is rejected with a `DataError`.
    """

    def __init__(self, source: str, tokenizer: Tokenizer, bos_token: str | None = None,
                 eos_token: str | None = None, name: str = "hf"):
        super().__init__(tokenizer)
        self.name = name
        self.bos_token = bos_token if bos_token is not None else token_text(tokenizer, tokenizer.bos_id)
        self.eos_token = eos_token if eos_token is not None else token_text(tokenizer, tokenizer.eos_id)
        self.source = source
        self._template = _compile(source)

    @property
    def stop_ids(self) -> list[int]:
        """EOS and the token closing a probe assistant turn (e.g. ChatML's ``<|im_end|>``)."""
        probe = self.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
        closing = [tid for tid, mine in zip(probe.ids, probe.assistant_mask, strict=True) if mine][-1:]
        eos = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else []
        return list(dict.fromkeys(eos + closing))

    def render_text(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        """The template's text for `messages` (not checked; `render` checks)."""
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.TemplateError as e:
            raise DataError(f"the {self.name} chat template rejected the conversation: {one_line(e)}") from None

    def _render(self, messages: list[Message], add_generation_prompt: bool) -> RenderedChat:
        text = self.render_text(messages, add_generation_prompt)
        encoding = self.tokenizer.backend.encode(text, add_special_tokens=False)

        def mask() -> list[bool]:
            turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            spans = [self._assistant_span(messages, i, text) for i in turns]
            return [any(s < b and e > a for a, b in spans) for s, e in encoding.offsets]

        return RenderedChat(list(encoding.ids), mask)

    def _assistant_span(self, messages: list[Message], i: int, full: str) -> tuple[int, int]:
        """Character span in `full` of what the assistant wrote in turn i (see the class docstring)."""
        with_turn = self.render_text(messages[: i + 1])
        if not full.startswith(with_turn):
            raise DataError(f"the {self.name} chat template renders message {i} differently when more messages "
                            f"follow, so its assistant tokens cannot be found")
        for generation_prompt in (True, False):
            before = self.render_text(messages[:i], generation_prompt)
            if with_turn.startswith(before):
                return len(before), max(len(before), len(with_turn.rstrip()))
        raise DataError(f"the {self.name} chat template's text before message {i} is not a prefix of the text "
                        f"with it, so the assistant tokens cannot be found")


def _compile(source: str) -> Any:
    """A Jinja template compiled like ``transformers`` compiles chat templates (sandboxed)."""
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise LmforgeError("Hugging Face chat templates need jinja2: pip install jinja2") from None

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` (HF's assistant-mask markup) renders its body as-is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    # Llama 3.1+ templates date their system header with it (a fixed date without it), as transformers renders them
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise LmforgeError(f"the chat template does not parse: {e} (line {e.lineno})") from None


def _token_string(value: Any) -> str | None:
    """A tokenizer_config.json token entry: a string or an AddedToken dict with "content"."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def hf_chat_template(model_dir: str | Path, tokenizer: Tokenizer) -> HFChatTemplate:
    """The chat template of a Hugging Face model directory: ``chat_template.jinja`` if present (newer
    ``transformers``), else the ``chat_template`` of ``tokenizer_config.json`` (the "default" one of a list)."""
    model_dir = Path(model_dir)
    config_path, jinja_path = model_dir / "tokenizer_config.json", model_dir / "chat_template.jinja"
    config: dict = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise LmforgeError(f"{config_path}: invalid JSON ({e})") from None
    source = jinja_path.read_text(encoding="utf-8") if jinja_path.is_file() else config.get("chat_template")
    if isinstance(source, list):
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(source, str) or not source.strip():
        problem = "has no chat_template" if config_path.is_file() else "not found"
        raise LmforgeError(f"{config_path} {problem} (and there is no {jinja_path.name}); "
                           f"use --template lmforge, llama2 or alpaca instead")
    return HFChatTemplate(source, tokenizer, _token_string(config.get("bos_token")),
                          _token_string(config.get("eos_token")))


TEMPLATES: dict[str, type[_PieceTemplate]] = {"lmforge": LmforgeTemplate, "llama2": Llama2Template,
                                              "alpaca": AlpacaTemplate}


def get_chat_template(name: str, tokenizer: Tokenizer, model_dir: str | Path | None = None) -> ChatTemplate:
    """The template `name` (lmforge, llama2, alpaca, or hf: the one in `model_dir`) for `tokenizer`."""
    if name == "hf":
        if model_dir is None:
            raise ConfigError("the hf template reads the model directory's tokenizer_config.json; pass its path")
        return hf_chat_template(model_dir, tokenizer)
    if name not in TEMPLATES:
        raise ConfigError(f"unknown chat template {name!r}; choose one of {', '.join([*TEMPLATES, 'hf'])}")
    return TEMPLATES[name](tokenizer)


def render_prompt_response(template: ChatTemplate, prompt: str | list[Message], response: str) -> RenderedChat:
    """A prompt (a string is one user turn) followed by the assistant's `response`; the mask marks only the
    response's tokens and its closing token, not earlier assistant turns of a multi-turn prompt."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    prefix = template.render(messages, add_generation_prompt=True)
    full = template.render([*messages, {"role": "assistant", "content": response}])
    if full.ids[: len(prefix.ids)] != prefix.ids:
        raise DataError(f"the {template.name} template tokenizes the prompt differently once a response follows, "
                        f"so the response tokens cannot be separated")
    start = len(prefix.ids)
    return RenderedChat(full.ids, [False] * start + full.assistant_mask[start:])
