"""Autoregressive generation: greedy, temperature, top-k, top-p (nucleus), stop strings, streaming.

With `use_cache=True` the prompt is run once (prefill) and each new token costs one forward
of a single position over the preallocated KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lmforge.errors import ConfigError
from lmforge.infer.decoding import StopIds, fit_prompt, new_generator, next_token, stop_id_set
from lmforge.model.attention import fused_qkv
from lmforge.model.decoder import DecoderLM
from lmforge.tokenizer import Tokenizer


def bad_option(name: str, rule: str, value: object, flag: str | None = None) -> ConfigError:
    """The error for a bad generation argument, named as the Python keyword and as the `lmforge generate` option."""
    return ConfigError(f"{name} ({flag or '--' + name.replace('_', '-')}) must be {rule}, got {value!r}")


def require_utf8(text: str, name: str) -> None:
    """ConfigError unless `text` is valid UTF-8. On Linux, argv bytes that are not UTF-8 reach Python as lone
    surrogates (U+DC80..U+DCFF, one per byte), which the tokenizer refuses and decoded text never matches."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        what = f"the byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"the lone surrogate U+{code:04X}"
        raise ConfigError(f"{name} is not valid UTF-8 text ({what} at character {err.start}): pass it as UTF-8, "
                          "e.g. convert it with `iconv -t UTF-8`") from None


@dataclass
class SamplingConfig:
    """How generation picks tokens. The defaults decode greedily (as `lmforge generate` and transformers' `generate`
    do); set temperature > 0 to sample, with a seed for reproducible samples. Fields are checked when the config is
    made and again when generation starts (a field may be changed in between)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)
    stop_at_eos: bool = True
    use_cache: bool = True
    # torch.compile the one-token decode step (benchmarks/decode_speed.py --compile times it). It saves a few percent
    # per token after seconds of compiling per process: off by default, it pays only after thousands of tokens (a
    # long-lived server, long generations).
    compile: bool = False
    truncate_prompt: bool = False  # keep the prompt's last tokens when it exceeds the context

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ConfigError naming the first bad field and its `lmforge generate` option."""
        if self.max_new_tokens < 1:
            raise bad_option("max_new_tokens", ">= 1", self.max_new_tokens)
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise bad_option("temperature", "a finite number >= 0 (0 = greedy)", self.temperature)
        if self.top_k < 0:
            raise bad_option("top_k", ">= 0 (0 = off)", self.top_k)
        if not 0 < self.top_p <= 1:
            raise bad_option("top_p", "in (0, 1] (1 = off)", self.top_p)
        if any(s == "" for s in self.stop):
            raise ConfigError("stop strings (--stop) must not be empty")
        for s in self.stop:
            require_utf8(s, "a stop string (--stop)")


@torch.inference_mode()
def generate_ids(
    model: DecoderLM,
    prompt_ids: Sequence[int],
    cfg: SamplingConfig,
    eos_id: StopIds = None,
    on_token: Callable[[int], bool | None] | None = None,
) -> list[int]:
    """Generate up to cfg.max_new_tokens ids after `prompt_ids`; returns only the new ids.

    Generation stops at `eos_id` (one id, or several: e.g. a chat template's end-of-turn and EOS).
    `on_token(id)` is called for each new token; returning True stops generation. With the KV cache (the default)
    this is the decode engine with one row; without it, every step reruns the whole sequence (the baseline the
    cache is measured against)."""
    from lmforge.infer.engine import Engine, GenerationRequest

    cfg.validate()
    stop_ids = stop_id_set(eos_id, cfg.stop_at_eos)
    if not cfg.use_cache:
        ids = fit_prompt(list(prompt_ids), model.cfg.max_seq_len, cfg.max_new_tokens, cfg.truncate_prompt)
        return _generate_without_cache(model, ids, cfg, stop_ids, on_token)
    engine = Engine(model, max_batch=1, compile=cfg.compile)
    ids = fit_prompt(list(prompt_ids), engine.context, cfg.max_new_tokens, cfg.truncate_prompt)
    request = engine.submit(GenerationRequest(ids, cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                              top_k=cfg.top_k, seed=cfg.seed, stop_ids=stop_ids))
    new: list[int] = []
    while engine.has_work:
        for event in engine.step():
            if event.token_id is None:
                continue
            new.append(event.token_id)
            if on_token is not None and on_token(event.token_id):
                engine.cancel(request)
    return new


def _generate_without_cache(model: DecoderLM, ids: list[int], cfg: SamplingConfig, stop_ids: frozenset[int],
                            on_token: Callable[[int], bool | None] | None) -> list[int]:
    generator = new_generator(cfg.seed, cfg.temperature, model.device)
    seq = torch.tensor([ids], device=model.device)
    new: list[int] = []
    with fused_qkv(model):
        for _ in range(cfg.max_new_tokens):
            token = next_token(model(seq, keep_last=1)[:, -1], cfg, generator)
            tid = int(token)
            if tid in stop_ids:
                break
            new.append(tid)
            if on_token is not None and on_token(tid):
                break
            seq = torch.cat([seq, token.view(1, 1)], dim=1)
    return new


class StopStreamer:
    """Turns new token ids into text deltas, holding back text that may begin a stop string (`skip_special_tokens`:
    special tokens decode to nothing)."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], emit: Callable[[str], None] | None,
                 skip_special_tokens: bool = False):
        self.tokenizer, self.stop, self.emit = tokenizer, list(stop), emit
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False

    def __call__(self, tid: int) -> bool:
        self.ids.append(tid)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
        self._flush(final=self.stopped)
        return self.stopped

    def _flush(self, final: bool) -> None:
        end = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
                end -= 1
            for s in self.stop:  # hold back a suffix that could grow into a stop string
                for k in range(min(len(s) - 1, end), 0, -1):
                    if self.text[:end].endswith(s[:k]):
                        end -= k
                        break
        if self.emit is not None and end > self.sent:
            self.emit(self.text[self.sent:end])
            self.sent = end

    def finish(self) -> str:
        self._flush(final=True)
        return self.text


def generate(
    model: DecoderLM,
    tokenizer: Tokenizer,
    prompt: str,
    cfg: SamplingConfig | None = None,
    stream: Callable[[str], None] | None = None,
) -> str:
    """Generate a text continuation of `prompt`; `stream(delta)` receives text as it is produced."""
    cfg = cfg or SamplingConfig()
    streamer = StopStreamer(tokenizer, cfg.stop, stream)
    generate_ids(model, tokenizer.encode(prompt), cfg, tokenizer.eos_id, on_token=streamer)
    return streamer.finish()
