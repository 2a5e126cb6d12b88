"""The pieces every decode loop shares: token choice (greedy, temperature, top-k, top-p), the sampling generator made
from a seed, the set of stop ids, fitting a prompt into the context, and the compiled decode step.

The engine (`infer/engine.py`) and the loops on its rows (`infer/slots.py`: beam search, speculative decoding,
encoder-decoder generation) all pick and stop through these.
"""

from __future__ import annotations

import weakref
from collections.abc import Collection
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    from lmforge.infer.generate import SamplingConfig
    from lmforge.model.decoder import DecoderLM

StopIds = int | Collection[int] | None  # one stop id (e.g. EOS), several (a chat template's end of turn and EOS), none


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Set logits outside the top-k and outside the smallest set with mass >= top_p to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def greedy_ids(logits: Tensor) -> Tensor:
    """logits.argmax(-1), with the same tie-break (the first maximum): on CPU `max(-1).indices` is the faster kernel
    for a large vocabulary."""
    return logits.max(dim=-1).indices


def sampling_probs(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """The distribution [..., V] sampling draws from: `logits` after temperature, top-k and top-p."""
    return filter_logits(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p).softmax(dim=-1)


def next_token(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> Tensor:
    """Pick the next token ids [B] from last-position logits [B, V]."""
    if cfg.temperature == 0:
        return greedy_ids(logits)
    return torch.multinomial(sampling_probs(logits, cfg), 1, generator=generator).squeeze(-1)


def new_generator(seed: int | None, temperature: float, device: torch.device | str) -> torch.Generator | None:
    """The generator a seeded sampling run draws from; None when greedy (nothing is drawn) or unseeded (torch's
    global generator)."""
    if seed is None or temperature == 0:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def stop_id_set(eos_id: StopIds, stop_at_eos: bool = True) -> frozenset[int]:
    """The ids that end a generation: `eos_id` as a set, empty when `stop_at_eos` is off."""
    if not stop_at_eos or eos_id is None:
        return frozenset()
    return frozenset({eos_id} if isinstance(eos_id, int) else eos_id)


def fit_prompt(ids: list[int], context: int, max_new_tokens: int, truncate: bool) -> list[int]:
    """`ids` with room for `max_new_tokens` in a `context`-token window: its last tokens when `truncate`, else
    LmforgeError (one line, naming the fix) when it does not fit; LmforgeError when it is empty."""
    if not ids:
        raise LmforgeError("the prompt is empty; give at least one token (e.g. the BOS token)")
    room = context - max_new_tokens
    if room < 1:
        raise LmforgeError(
            f"max_new_tokens={max_new_tokens} (--max-new-tokens) leaves no room for a prompt in the "
            f"{context}-token context window"
        )
    if len(ids) > room:
        if not truncate:
            raise LmforgeError(
                f"the prompt has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it must fit "
                f"{room} tokens of the {context}-token context window: shorten it, lower max_new_tokens, "
                "or pass --truncate-prompt to keep its last tokens"
            )
        ids = ids[-room:]
    return ids


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_decoder(model: DecoderLM) -> torch.nn.Module:
    """The model under torch.compile (dynamic shapes: the cache grows each step), compiled once per model and
    kept outside it (an attribute would register the wrapper as a submodule of the model it wraps). The C++ wrapper
    calls the kernels without Python in between, a little faster per token than the Python one."""
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model, dynamic=True, options={"cpp_wrapper": True})
    return _COMPILED[model]
