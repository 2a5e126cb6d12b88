"""The decode engine many requests share: continuous batching over KV-cache rows, with prefix caching.

Requests are submitted from any thread; one thread calls `step`, which admits waiting requests into free rows
(their prompts prefilled together, left-padded, after any cached prefix blocks; each one's first token picked from
its prefill logits), then runs one decode step over every running row at once (`infer/slots.py`); where the rows'
fast decode step applies (`model/decode_step.py`) and no adapter is involved, arrivals are prefilled inside that
step's pass over the weights and join the rows after it. A request leaves
its row when it stops (a stop id, a stop string, max_new_tokens) or is cancelled, and a waiting one takes the row at
the next step. Each request samples with its own settings and its own generator, so its tokens do not depend on
what else runs.

While requests run, the model's attention layers stay fused (`fused_qkv`, entered by the step that starts them and
left by the one that finishes the last): do not train or change the model meanwhile.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from lmforge.errors import ConfigError
from lmforge.infer.decoding import compiled_decoder, greedy_ids, new_generator, sampling_probs
from lmforge.infer.generate import SamplingConfig, StopStreamer
from lmforge.infer.prefix_cache import BLOCK, PrefixCache
from lmforge.infer.slots import PAD_ID, BatchSlots
from lmforge.model.attention import fused_qkv
from lmforge.model.decoder import DecoderLM
from lmforge.peft.lora import lora_layers
from lmforge.peft.row_adapters import check_row_adapters, row_adapters
from lmforge.tokenizer import Tokenizer


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: the engine refuses (ConfigError) a prompt that does not fit the context with max_new_tokens."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None  # the request's own generator: the same seed gives the same tokens, whatever else runs
    stop_ids: frozenset[int] = frozenset()  # ending ids (EOS, end-of-turn), not emitted
    stop_strings: tuple[str, ...] = ()  # text stops (needs the engine's tokenizer); the text before one is emitted
    adapter: str | None = None  # a LoRA adapter already added to the model (None = the base model)
    skip_special_tokens: bool = False  # the text leaves special tokens out (a chat reply: no role token in history)


@dataclass(frozen=True)
class TokenEvent:
    request_id: int
    token_id: int | None  # the new token, or None on a final event that adds none
    text: str  # newly printable text: incremental, whole UTF-8 characters, a possible stop string held back
    finish_reason: str | None  # None while running; "stop", "length" or "cancelled" on the last event
    stop_id: int | None = None  # on a "stop" event for one of the request's stop ids: that id (never emitted)


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    prefill_tokens: int = 0  # prompt tokens run through the model
    prefix_hit_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    generated_tokens: int = 0
    prefix_cache_tokens: int = 0  # positions the prefix cache holds now


_Waiting = tuple[int, GenerationRequest, SamplingConfig]  # a request's id, itself, and its checked settings
PREFILL_SLOTS = 8192  # padded prompt slots one prefill forward may take (its attention bias grows with their square)


class _Running:
    """A request being generated: its sampling state, its text so far, and the token to feed next."""

    def __init__(self, request_id: int, request: GenerationRequest, sampling: SamplingConfig,
                 tokenizer: Tokenizer | None, device: torch.device):
        self.id, self.request, self.sampling = request_id, request, sampling
        self.generator = new_generator(request.seed, request.temperature, device)
        self.pending: list[str] = []
        self.streamer = None if tokenizer is None else StopStreamer(
            tokenizer, request.stop_strings, self.pending.append, skip_special_tokens=request.skip_special_tokens)
        self.generated = 0
        self.token = -1

    def take_text(self, final: bool) -> str:
        if self.streamer is None:
            return ""
        if final:
            self.streamer.finish()
        text = "".join(self.pending)
        self.pending.clear()
        return text


def pick_tokens(logits: Tensor, runs: dict[int, _Running]) -> dict[int, int]:
    """Each run's next token from its row of `logits` [rows, vocab]: the argmax for greedy runs; runs that sample with
    the same settings get their distributions computed together, then draw with their own generator (runs without
    one draw together from torch's global generator)."""
    picks = dict(enumerate(greedy_ids(logits).tolist()))
    groups: dict[tuple[float, int, float], list[int]] = {}
    for row, run in runs.items():
        cfg = run.sampling
        if cfg.temperature > 0:
            groups.setdefault((cfg.temperature, cfg.top_k, cfg.top_p), []).append(row)
    drawn: dict[int, Tensor] = {}
    for rows in groups.values():
        probs = sampling_probs(logits[rows], runs[rows[0]].sampling)
        unseeded = [i for i, row in enumerate(rows) if runs[row].generator is None]
        if unseeded:
            drawn.update(zip((rows[i] for i in unseeded), torch.multinomial(probs[unseeded], 1), strict=True))
        for i, row in enumerate(rows):
            if runs[row].generator is not None:
                drawn[row] = torch.multinomial(probs[i:i + 1], 1, generator=runs[row].generator)[0]
    if drawn:
        picks.update(zip(drawn, torch.cat(list(drawn.values())).tolist(), strict=True))
    return picks


class _Prefill:
    """The inputs of one prefill of `group`'s prompts: left-padded ids `feed` [prompts, width] after the longest
    cached prefix, a cache holding each one's cached prefix blocks in front of its tokens, and the attention `mask`
    (None when no slot is padding; `real` is the mask in any case, or None when every slot is real)."""

    def __init__(self, engine: Engine, group: list[_Waiting]):
        group = sorted(group, key=lambda e: -len(e[1].prompt_ids))  # longest first: rows shift right once at most
        prefixes = [[] if engine.prefix is None else engine.prefix.lookup(r.prompt_ids, r.adapter)
                    for _, r, _ in group]
        self.group, self.hits = group, [len(blocks) * BLOCK for blocks in prefixes]
        cached = max(self.hits)
        width = max(len(r.prompt_ids) - h for (_, r, _), h in zip(group, self.hits, strict=True))
        self.cache = cache = engine.model.new_cache(len(group), cached + width)
        feed = torch.full((len(group), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(group), cached + width), dtype=torch.long)
        for j, ((_, request, _), blocks, hit) in enumerate(zip(group, prefixes, self.hits, strict=True)):
            for b, block in enumerate(blocks):
                at = slice(cached - hit + b * BLOCK, cached - hit + (b + 1) * BLOCK)
                for mine, theirs in zip(cache.keys + cache.values, block, strict=True):
                    mine[j, :, at] = theirs
            suffix = request.prompt_ids[hit:]
            feed[j, width - len(suffix):] = torch.tensor(suffix)
            mask[j, cached - hit:cached] = mask[j, cached + width - len(suffix):] = 1
        cache.length = cached
        device = engine.model.device
        self.feed = feed.to(device)
        self.real = None if mask.all() else mask
        self.mask = None if self.real is None else mask.to(device)


class Engine:
    """Continuous batching over `max_batch` rows of one KV cache, with an LRU prefix cache of
    `prefix_cache_tokens` positions (0 = off). `logits_hook(request_id, logits)`, when set, sees the logits [vocab]
    each token is picked from."""

    def __init__(self, model: DecoderLM, tokenizer: Tokenizer | None = None, *, max_batch: int = 8,
                 prefix_cache_tokens: int = 0, compile: bool = False):
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        if prefix_cache_tokens < 0:
            raise ConfigError(f"prefix_cache_tokens must be >= 0 (0 = off), got {prefix_cache_tokens}")
        self.slots = BatchSlots.for_model(model, max_batch, compiled_decoder(model) if compile else model)
        if self.slots.header and prefix_cache_tokens:
            raise ConfigError("prefix caching (prefix_cache_tokens) does not support prompt-tuned models: set it to 0")
        self.model, self.tokenizer = model, tokenizer
        self.context = self.slots.max_columns
        self.prefix = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None
        self.stats = EngineStats()
        self.logits_hook: Callable[[int, Tensor], None] | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._waiting: deque[_Waiting] = deque()
        self._cancelled: set[int] = set()
        self._rows: dict[int, _Running] = {}  # row of the batch cache -> its request
        # `fused_qkv` from the step that starts running requests to the step that leaves none (or fails): entering
        # it once per step would cost more than a small model's decode step
        self._fused: ExitStack | None = None

    def submit(self, request: GenerationRequest) -> int:
        """Queue `request` (ConfigError, one line, if it cannot run); returns its id. Thread-safe."""
        sampling = self.check(request)
        with self._lock:
            request_id = next(self._ids)
            self._waiting.append((request_id, request, sampling))
            self.stats.waiting = len(self._waiting)
        return request_id

    def cancel(self, request_id: int) -> None:
        """Stop a request at the next step, which frees its row and emits its one "cancelled" event. Thread-safe;
        an unknown or finished id is ignored."""
        with self._lock:
            self._cancelled.add(request_id)

    @property
    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._rows or self._cancelled)

    def step(self) -> list[TokenEvent]:
        """Handle cancellations, admit waiting requests into free rows, then run one decode step."""
        if not torch.is_inference_mode_enabled():  # a caller's loop may already run in it: entering it costs
            with torch.inference_mode():
                return self.step()
        events: list[TokenEvent] = []
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            for entry in [e for e in self._waiting if e[0] in cancelled]:
                self._waiting.remove(entry)
                events.append(TokenEvent(entry[0], None, "", "cancelled"))
        for row, run in list(self._rows.items()):
            if run.id in cancelled:
                events.append(TokenEvent(run.id, None, "", "cancelled"))
                self._leave(row)
        if self._fused is None:
            self._fused = ExitStack()
            self._fused.enter_context(fused_qkv(self.model))
        try:
            group = self._next_group()
            if group and self._rows and self.slots.fast_step() and not self._any_adapter(group):
                self._decode(events, group)  # the prompts prefilled in the decode step's pass over the weights
            else:
                while group:
                    self._admit(group, events)
                    group = self._next_group()
                if self._rows:
                    self._decode(events)
        except BaseException:
            self._unfuse()
            raise
        if not self._rows:
            self._unfuse()
        with self._lock:
            self.stats.waiting, self.stats.running = len(self._waiting), len(self._rows)
        return events

    def check(self, request: GenerationRequest) -> SamplingConfig:
        """`request`'s sampling settings, or a one-line ConfigError saying why this engine cannot run it."""
        ids, context, vocab = request.prompt_ids, self.context, self.model.cfg.vocab_size
        if not ids:
            raise ConfigError("the prompt is empty; give at least one token (e.g. the BOS token)")
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            bad = next(t for t in ids if not (isinstance(t, int) and 0 <= t < vocab))
            raise ConfigError(f"prompt token id {bad!r} is not in the model's vocabulary of {vocab} ids")
        if request.max_new_tokens >= 1 and len(ids) + request.max_new_tokens > context:
            raise ConfigError(f"the prompt has {len(ids)} tokens; with max_new_tokens={request.max_new_tokens} it "
                              f"needs {len(ids) + request.max_new_tokens} of the {context}-token context window: "
                              "shorten the prompt or lower max_new_tokens")
        if request.adapter is not None:
            active = sorted({n for layer in lora_layers(self.model).values() for n, _ in layer.active})
            if active:
                raise ConfigError(f"adapter {request.adapter!r}: the model runs with adapter(s) {active} active, so "
                                  "a request without one would not get the base model; load the adapters with "
                                  "lmforge.peft.row_adapters.load_named_adapters (none active)")
            check_row_adapters(self.model, [request.adapter])
        if request.stop_strings and self.tokenizer is None:
            raise ConfigError("stop strings need a tokenizer: pass one to Engine(model, tokenizer)")
        return SamplingConfig(max_new_tokens=request.max_new_tokens, temperature=request.temperature,
                              top_k=request.top_k, top_p=request.top_p, seed=request.seed, stop=request.stop_strings)

    def _next_group(self) -> list[_Waiting]:
        """The waiting requests (oldest first) that fit the free rows and one prefill of PREFILL_SLOTS padded slots."""
        free = len(self.slots.start) - len(self._rows)
        group: list[_Waiting] = []
        with self._lock:
            while self._waiting and len(group) < free:
                width = max(len(e[1].prompt_ids) for e in [*group, self._waiting[0]])
                if group and (len(group) + 1) * width > PREFILL_SLOTS:
                    break
                group.append(self._waiting.popleft())
        return group

    def _admit(self, group: list[_Waiting], events: list[TokenEvent]) -> None:
        """Prefill the prompts of `group` in one forward, pick each one's first token, and give a row to each that
        has not finished."""
        prefill = _Prefill(self, group)
        with self._adapters([r.adapter for _, r, _ in group]):
            logits = self.model(prefill.feed, cache=prefill.cache, attention_mask=prefill.mask, keep_last=1)[:, -1]
        self._admitted(prefill, logits, events)

    def _admitted(self, prefill: _Prefill, logits: Tensor, events: list[TokenEvent]) -> None:
        """Pick the first token of each prompt of `prefill` from its `logits` [prompts, vocab], store its prefix
        blocks, and give a row to each that has not finished."""
        header, cache, device = self.slots.header, prefill.cache, self.model.device
        if header and self.slots.header_kv is None:
            self.slots.header_kv = [t[0, :, :header].clone() for t in cache.keys + cache.values]
        runs = {j: _Running(request_id, request, sampling, self.tokenizer, device)
                for j, (request_id, request, sampling) in enumerate(prefill.group)}
        picks = pick_tokens(logits, runs)
        for j, ((_, request, _), hit) in enumerate(zip(prefill.group, prefill.hits, strict=True)):
            if prefill.real is None:  # no padding: every slot is real
                kv = [t[j, :, header:] for t in cache.keys + cache.values]
            else:
                real = header + prefill.real[j].nonzero().squeeze(1).to(device)
                kv = [t[j].index_select(1, real) for t in cache.keys + cache.values]
            self.stats.prefill_tokens += len(request.prompt_ids) - hit
            self.stats.prefix_hit_tokens += hit
            if self.prefix is not None:
                self.prefix.store(request.prompt_ids, request.adapter, kv)
                self.stats.prefix_cache_tokens = self.prefix.tokens
            if not self._pick(runs[j], logits, j, picks[j], events):
                row = self.slots.free_row()
                self.slots.join(row, kv, len(request.prompt_ids) + request.max_new_tokens - 1)
                self._rows[row] = runs[j]

    def _any_adapter(self, group: list[_Waiting]) -> bool:
        return any(r.adapter for _, r, _ in group) or any(run.request.adapter for run in self._rows.values())

    def _adapters(self, names: list[str | None]) -> AbstractContextManager:
        """Each row with its request's adapter (`row_adapters`), when any names one; else the model as it is."""
        return row_adapters(self.model, names) if any(names) else nullcontext()

    def _decode(self, events: list[TokenEvent], group: list[_Waiting] | None = None) -> None:
        """One decode step of the running rows; with `group` (no adapter anywhere), its prompts prefilled in the
        same pass over the weights (`BatchSlots.decode`'s `prefill`), and given rows after the step."""
        self._pack_rows()
        used = max(self._rows) + 1
        fed = {row: run.token for row, run in self._rows.items()}
        prefill = _Prefill(self, group) if group else None
        if prefill is not None:
            logits, first = self.slots.decode(fed, prefill=(prefill.feed, prefill.cache, prefill.mask))
        else:
            with self._adapters([self._rows[r].request.adapter if r in self._rows else None for r in range(used)]):
                logits = self.slots.decode(fed)
        picks = pick_tokens(logits, self._rows)
        for row, run in list(self._rows.items()):
            if self._pick(run, logits, row, picks[row], events):
                self._leave(row)
        if prefill is not None:
            self._admitted(prefill, first, events)

    def _pack_rows(self) -> None:
        """Move the highest running rows into the free rows below them: a decode step computes every row up to the
        highest running one, and rows that finish leave gaps the waiting requests did not fill."""
        while (free := self.slots.free_row()) is not None and free < (top := max(self._rows)):
            self.slots.move(top, free)
            self._rows[free] = self._rows.pop(top)

    def _pick(self, run: _Running, logits: Tensor, row: int, token: int, events: list[TokenEvent]) -> bool:
        """Emit `run`'s event for `token`, picked from its row of `logits`; True when the request is done."""
        if self.logits_hook is not None:
            self.logits_hook(run.id, logits[row])
        if token in run.request.stop_ids:
            events.append(TokenEvent(run.id, None, run.take_text(final=True), "stop", stop_id=token))
            return True
        run.generated += 1
        self.stats.generated_tokens += 1
        stopped = run.streamer is not None and run.streamer(token)
        reason = "stop" if stopped else "length" if run.generated == run.request.max_new_tokens else None
        events.append(TokenEvent(run.id, token, run.take_text(final=reason is not None), reason))
        run.token = token
        return reason is not None

    def _unfuse(self) -> None:
        self._fused.close()
        self._fused = None

    def _leave(self, row: int) -> None:
        del self._rows[row]
        self.slots.leave(row)
