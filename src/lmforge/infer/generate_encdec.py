"""Encoder-decoder generation (T5): encode once, then decode token by token.

The encoder runs once per request and each decoder layer's cross-attention keys/values of its output are
projected once; the decoder then runs in a row of the decode engine's cache (`infer/slots.py`), one position per
step. Token
choice (greedy, temperature, top-k, top-p), seeding and stop ids are the shared `infer/decoding.py`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lmforge.errors import LmforgeError
from lmforge.infer.decoding import new_generator, next_token, stop_id_set
from lmforge.infer.generate import SamplingConfig, StopStreamer
from lmforge.infer.slots import BatchSlots
from lmforge.model.attention import KVCache
from lmforge.model.encdec import EncDecLM
from lmforge.tokenizer import Tokenizer


def _fit_input(ids: list[int], mask: list[int] | None, limit: int, cfg: SamplingConfig
               ) -> tuple[list[int], list[int] | None]:
    if not ids:
        raise LmforgeError("the input is empty; give at least one token (T5 inputs usually end with EOS)")
    if mask is not None and len(mask) != len(ids):
        raise LmforgeError(f"attention_mask has {len(mask)} entries for {len(ids)} input tokens")
    if cfg.max_new_tokens > limit:
        raise LmforgeError(f"max_new_tokens={cfg.max_new_tokens} exceeds the decoder's max_seq_len={limit}")
    if len(ids) > limit:
        if not cfg.truncate_prompt:
            raise LmforgeError(f"the input has {len(ids)} tokens, more than max_seq_len={limit}: shorten it, "
                               "or pass --truncate-prompt to keep its last tokens")
        ids, mask = ids[-limit:], None if mask is None else mask[-limit:]
    return ids, mask


@torch.inference_mode()
def generate_encdec(
    model: EncDecLM,
    input_ids: Sequence[int],
    cfg: SamplingConfig,
    eos_id: int | None = None,
    attention_mask: Sequence[int] | None = None,
    on_token: Callable[[int], bool | None] | None = None,
) -> list[int]:
    """Generate up to cfg.max_new_tokens target ids for the input `input_ids` (without the decoder start id).

    `attention_mask` (1 = token, 0 = padding) is for an input that carries padding. `on_token(id)` is
    called for each new token; returning True stops generation."""
    cfg.validate()
    ids, mask = _fit_input(list(input_ids), None if attention_mask is None else list(attention_mask),
                           model.cfg.max_seq_len, cfg)
    device = model.tok_emb.weight.device
    generator = new_generator(cfg.seed, cfg.temperature, device)
    stop_ids = stop_id_set(eos_id, cfg.stop_at_eos)
    enc_mask = None if mask is None else torch.tensor([mask], device=device)
    encoder_hidden = model.encode(torch.tensor([ids], device=device), enc_mask)
    decoder = ConditionedDecoder(model, encoder_hidden, enc_mask)
    start = model.cfg.decoder_start_id
    if not cfg.use_cache:
        return _generate_without_cache(decoder, start, cfg, generator, stop_ids, on_token)
    row = BatchSlots.for_model(decoder, 1)
    logits = row.prefill(0, [start], cfg.max_new_tokens)[-1]
    new: list[int] = []
    for _ in range(cfg.max_new_tokens):
        tid = int(next_token(logits[None], cfg, generator))
        if tid in stop_ids:
            break
        new.append(tid)
        if (on_token is not None and on_token(tid)) or len(new) == cfg.max_new_tokens:
            break
        logits = row.decode({0: tid})[0]
    return new


class ConditionedDecoder(torch.nn.Module):
    """T5's decoder conditioned on one encoded input, with the interface of a decoder-only model, so that it decodes
    in a row of the engine's cache (`infer/slots.py`); the encoder output's cross-attention keys and values are
    projected once."""

    def __init__(self, model: EncDecLM, encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor | None):
        super().__init__()
        self.model, self.cfg, self.device = model, model.cfg, encoder_hidden.device
        self.encoder_hidden, self.encoder_mask = encoder_hidden, encoder_mask
        self.cross = model.cross_kv(encoder_hidden)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return self.model.new_cache(batch_size, max_len)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, attention_mask: torch.Tensor | None = None,
                keep_last: int = 0) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("one encoder-decoder row alone needs no attention mask")
        logits = self.model.decode(input_ids, self.encoder_hidden, self.encoder_mask, cache=cache, cross_kv=self.cross)
        return logits[:, -keep_last:] if keep_last else logits


def _generate_without_cache(decoder: ConditionedDecoder, start: int, cfg: SamplingConfig,
                            generator: torch.Generator | None, stop_ids: frozenset[int],
                            on_token: Callable[[int], bool | None] | None) -> list[int]:
    """Every step reruns the decoder over all its tokens: the baseline the cache is measured against."""
    seq = [start]
    for _ in range(cfg.max_new_tokens):
        tid = int(next_token(decoder(torch.tensor([seq], device=decoder.device))[:, -1], cfg, generator))
        if tid in stop_ids:
            break
        seq.append(tid)
        if (on_token is not None and on_token(tid)) or len(seq) - 1 == cfg.max_new_tokens:
            break
    return seq[1:]


def generate_text2text(
    model: EncDecLM,
    tokenizer: Tokenizer,
    text: str,
    cfg: SamplingConfig | None = None,
    stream: Callable[[str], None] | None = None,
) -> str:
    """The output text for input `text` (EOS appended, as T5 inputs end); `stream(delta)` receives it as made."""
    cfg = cfg or SamplingConfig()
    eos = tokenizer.eos_id
    ids = tokenizer.encode(text) + ([eos] if eos is not None else [])
    streamer = StopStreamer(tokenizer, cfg.stop, stream)
    generate_encdec(model, ids, cfg, eos, on_token=streamer)
    return streamer.finish()
