"""The model a server answers for: its name and adapters, its chat template, and how an OpenAI request becomes
prompt ids and engine requests (each length checked against the context, so the client gets a 400 that says why)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError, LmforgeError
from lmforge.serve.errors import APIError
from lmforge.serve.schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


@dataclass
class ServedModel:
    name: str  # the base model's name in /v1/models and in requests
    model: Any  # a DecoderLM
    tokenizer: Any
    template: Any  # the ChatTemplate chat requests are rendered with, or None (then only completions work)
    adapters: tuple[str, ...] = ()
    max_batch: int = 8  # the engine's slots: the most choices (n) one request may ask for
    # the ids a text completion ends at: EOS, and the end of turn of a model trained with a chat template (what
    # its HF export lists in generation_config.json, where transformers serve and vLLM stop)
    completion_stop_ids: frozenset[int] = frozenset()
    chat_stop_ids: frozenset[int] = frozenset()  # the chat template's end of turn and EOS

    @property
    def context(self) -> int:
        return self.model.cfg.max_seq_len

    @property
    def model_names(self) -> list[str]:
        return [self.name, *self.adapters]

    def adapter_for(self, model_name: str) -> str | None:
        """The adapter a request's `model` names (None: the base), or a 404."""
        if model_name == self.name:
            return None
        if model_name in self.adapters:
            return model_name
        raise APIError(404, f"the model {model_name!r} does not exist; this server has {', '.join(self.model_names)}",
                       param="model", code="model_not_found")

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        if self.template is None:
            raise APIError(400, f"{self.name} has no chat template (it records none and its tokenizer lacks "
                                "lmforge's role tokens): use /v1/completions, or restart with --template NAME",
                           param="messages")
        try:
            return self.template.render([m.as_template_message() for m in body.messages],
                                        add_generation_prompt=True).ids
        except LmforgeError as err:
            raise APIError(400, str(err), param="messages") from None

    def completion_prompts(self, body: CompletionRequest) -> list[list[int]]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            bad = [t for t in prompt if not 0 <= t < self.model.cfg.vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{self.model.cfg.vocab_size - 1})",
                               param="prompt")
            return [list(prompt)]
        texts = [prompt] if isinstance(prompt, str) else prompt
        prompts = [self.tokenizer.encode(text) for text in texts]
        if not prompts or not all(prompts):
            raise APIError(400, "the prompt is empty; give at least one character", param="prompt")
        return prompts

    def stop_ids(self, chat: bool) -> frozenset[int]:
        """A chat reply ends at its template's end of turn or EOS; a text completion at `completion_stop_ids`."""
        return self.chat_stop_ids if chat else self.completion_stop_ids

    def max_new_tokens(self, body: SamplingRequest, prompt_len: int, default: int | None) -> int:
        """The request's max_tokens, checked: the prompt and the reply must fit the context together."""
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        room = self.context - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens, but this model's context is {self.context} "
                                "tokens, the reply included; shorten the prompt (or the conversation)",
                           param="messages" if hasattr(body, "messages") else "prompt", code="context_length_exceeded")
        if asked is None:
            return room if default is None else min(default, room)
        if asked > room:
            raise APIError(400, f"max_tokens={asked} with a {prompt_len}-token prompt exceeds this model's "
                                f"{self.context}-token context; ask for at most {room}", param="max_tokens",
                           code="context_length_exceeded")
        return asked

    def generation_requests(self, body: SamplingRequest, prompts: list[list[int]], chat: bool) -> list[Any]:
        """One engine request per choice: for each prompt, n of them. With a seed, choice i gets seed + i (as
        `lmforge generate --num-samples` does), so n choices differ and each is reproducible alone. A chat reply's
        text leaves special tokens out, as `lmforge chat` does: sent back as history, one would be refused."""
        from lmforge.infer.engine import GenerationRequest

        if body.n > self.max_batch:
            raise APIError(400, f"n={body.n} is more choices than this server decodes at once (--max-batch "
                                f"{self.max_batch}); ask for at most {self.max_batch}", param="n")
        adapter = self.adapter_for(body.model)
        stops = body.stop_strings()
        requests = []
        for ids in prompts:
            max_new = self.max_new_tokens(body, len(ids), None if chat else COMPLETION_DEFAULT_MAX_TOKENS)
            for i in range(body.n):
                requests.append(GenerationRequest(
                    prompt_ids=ids, max_new_tokens=max_new, temperature=body.temperature, top_p=body.top_p,
                    seed=None if body.seed is None else body.seed + i, stop_ids=self.stop_ids(chat),
                    stop_strings=stops, adapter=adapter, skip_special_tokens=chat))
        return requests


def chat_template_for(path: str | Path, tokenizer: Any, name: str | None, own: Any) -> Any:
    """The template chat requests use: `name` if given; else `own`, the model's own; else lmforge's, when the
    tokenizer has its role tokens; else None."""
    from lmforge.data.chat import get_chat_template

    if tokenizer is None:
        return None
    if name is not None:
        return get_chat_template(name, tokenizer, path)
    if own is not None:
        return own
    try:
        return get_chat_template("lmforge", tokenizer)
    except LmforgeError:
        return None


def load_served(path: str | Path, *, name: str | None, template: str | None, adapters: dict[str, str],
                max_batch: int) -> ServedModel:
    """Load the run/checkpoint at `path` (and its adapters) for serving; one line when it cannot be served: no
    tokenizer, or not a decoder (an encoder or a task model answers neither chat nor completions)."""
    from lmforge.data.chat import ending_ids
    from lmforge.infer.chat_repl import optional_chat_template
    from lmforge.infer.model_kind import load_for_verb

    model, tokenizer, _ = load_for_verb(str(path), "serve", ("decoder",))
    if adapters:
        load_adapters(model, adapters)
    own = optional_chat_template(str(path), tokenizer) if tokenizer is not None else None
    chat = chat_template_for(path, tokenizer, template, own)
    return ServedModel(name=name or Path(path).resolve().name, model=model.eval(), tokenizer=tokenizer,
                       template=chat, adapters=tuple(adapters), max_batch=max_batch,
                       chat_stop_ids=frozenset(ending_ids(tokenizer, chat)) if chat is not None else frozenset(),
                       completion_stop_ids=frozenset(ending_ids(tokenizer, own)))


def load_adapters(model: Any, adapters: dict[str, str]) -> None:
    """Add each named LoRA adapter to `model` for per-request use (`lmforge.peft.row_adapters`)."""
    try:
        from lmforge.peft.row_adapters import load_named_adapters
    except ImportError:
        raise ConfigError("--adapter needs per-request LoRA adapters (lmforge.peft.row_adapters), which this "
                          "lmforge does not have yet; serve a merged model instead (lmforge merge RUN --out DIR)"
                          ) from None
    load_named_adapters(model, adapters)
