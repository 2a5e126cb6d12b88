"""Completions of many prompts at once through lmforge's decode engine (continuous batching over one KV cache):
every question and every sample of a prompting method is one request of the same engine run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from lmforge.infer.decoding import fit_prompt
from lmforge.infer.engine import Engine, GenerationRequest
from lmforge.infer.generate import SamplingConfig
from lmforge.model.decoder import DecoderLM
from lmforge.prompting.prompt import PromptRenderer, RenderedPrompt

MAX_BATCH = 32  # rows of the engine's KV cache


class BatchCompleter(Protocol):
    def __call__(self, prompts: Sequence[RenderedPrompt], *, max_new_tokens: int, temperature: float = 0.0,
                 seeds: Sequence[int | None] | None = None, stops: Sequence[Sequence[str]] | None = None,
                 keep_last: bool = False) -> list[str]:
        """The text each prompt's reply continues with (its stop string or id left out). `seeds[i]` seeds prompt
        i's sampling; `stops[i]`: more strings that end its reply; `keep_last`: a prompt too long for the context
        keeps its last tokens (else an error)."""
        ...


class EngineCompleter:
    """A BatchCompleter on `model` that stops where the renderer's replies end (end of turn, EOS, a new block)."""

    def __init__(self, model: DecoderLM, renderer: PromptRenderer, max_batch: int = MAX_BATCH):
        self.model, self.renderer, self.max_batch = model, renderer, max_batch
        self.context = Engine(model, max_batch=1).context  # tokens a prompt and its reply share (a soft prompt aside)

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[RenderedPrompt], *, max_new_tokens: int, temperature: float = 0.0,
                 seeds: Sequence[int | None] | None = None, stops: Sequence[Sequence[str]] | None = None,
                 keep_last: bool = False) -> list[str]:
        if not prompts:
            return []
        SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature).validate()
        seeds = [None] * len(prompts) if seeds is None else list(seeds)
        stops = [()] * len(prompts) if stops is None else list(stops)
        engine = Engine(self.model, self.renderer.tokenizer, max_batch=min(len(prompts), self.max_batch))
        ids = [engine.submit(GenerationRequest(
            fit_prompt(list(p.ids), engine.context, max_new_tokens, keep_last), max_new_tokens,
            temperature=temperature, seed=seed, stop_ids=frozenset(self.renderer.stop_ids),
            stop_strings=(*self.renderer.stop_strings, *stop), skip_special_tokens=True,
        )) for p, seed, stop in zip(prompts, seeds, stops, strict=True)]
        text: dict[int, list[str]] = {i: [] for i in ids}
        while engine.has_work:
            for event in engine.step():
                text[event.request_id].append(event.text)
        return ["".join(text[i]).strip() for i in ids]
