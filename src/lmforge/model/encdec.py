"""The T5 encoder-decoder (Raffel et al. 2020, "Exploring the Limits of Transfer Learning ...").

`EncDecLM(cfg)(input_ids, decoder_input_ids, attention_mask)` returns teacher-forced logits
[batch, target, vocab]. Generation runs `encode` once, `cross_kv` once, then `decode` one token
at a time over a `KVCache` (from `model.new_cache`) for the decoder's self-attention.

T5's choices, all kept here: RMSNorm without bias before every sublayer, no biases anywhere,
unscaled attention scores, and no position embeddings: a learned scalar per (bucketed relative
distance, head) added to the attention scores, computed once per stack and shared by its layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import EncDecConfig
from lmforge.model.activation_checkpointing import CheckpointableBlock
from lmforge.model.attention import Attention, KVCache, attention_bias, padding_bias
from lmforge.model.layers import MLP, RMSNorm


def relative_position_bucket(relative_position: Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Tensor:
    """T5's bucket of each `key_pos - query_pos` (Raffel et al. 2020, sec. 2.1; Mesh TF).

    Bidirectional: half the buckets for keys before the query, half for keys after. Unidirectional
    (causal): only the distance into the past counts. Within a half, distances below n/2 get a bucket
    each; larger ones share log-spaced buckets up to `max_distance`, beyond which all share the last."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


def relative_bias(table: nn.Embedding, q_len: int, k_len: int, offset: int, bidirectional: bool,
                  max_distance: int) -> Tensor:
    """Additive [1, H, q_len, k_len] scores for queries at positions offset.. and keys at 0.. ."""
    q_pos = torch.arange(offset, offset + q_len, device=table.weight.device)[:, None]
    k_pos = torch.arange(k_len, device=table.weight.device)[None, :]
    buckets = relative_position_bucket(k_pos - q_pos, bidirectional, table.num_embeddings, max_distance)
    return table(buckets).permute(2, 0, 1)[None]


def _attention(cfg: EncDecConfig) -> Attention:
    return Attention(cfg.d_model, cfg.n_head, cfg.n_head, cfg.head_dim, bias=False, dropout=cfg.dropout, scale=1.0)


class EncoderBlock(CheckpointableBlock):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: EncDecConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = _attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.activation, cfg.gated, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), bias=bias))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class DecoderBlock(CheckpointableBlock):
    """Pre-norm causal self-attention, cross-attention over the encoder output, then the MLP."""

    def __init__(self, cfg: EncDecConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = _attention(cfg)
        self.cross_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.cross_attn = _attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.activation, cfg.gated, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, layer: int, self_bias: Tensor, cross_bias: Tensor | None,
                cross_kv: tuple[Tensor, Tensor], cache: KVCache | None) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), bias=self_bias, cache=cache, layer=layer))
        x = x + self.drop(self.cross_attn(self.cross_norm(x), bias=cross_bias, kv=cross_kv))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Encoder(nn.Module):
    """Bidirectional stack over embedded inputs [B, S, d] -> final-normed hidden states."""

    def __init__(self, cfg: EncDecConfig):
        super().__init__()
        self.max_distance = cfg.relative_max_distance
        self.rel_bias = nn.Embedding(cfg.relative_buckets, cfg.n_head)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layer))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask_bias: Tensor | None) -> Tensor:
        S = x.shape[1]
        bias = relative_bias(self.rel_bias, S, S, 0, bidirectional=True, max_distance=self.max_distance)
        if mask_bias is not None:
            bias = bias + mask_bias
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, bias)
        return self.drop(self.final_norm(x))


class Decoder(nn.Module):
    """Causal stack over embedded targets [B, T, d]; positions continue from `cache.length`."""

    def __init__(self, cfg: EncDecConfig):
        super().__init__()
        self.max_distance = cfg.relative_max_distance
        self.rel_bias = nn.Embedding(cfg.relative_buckets, cfg.n_head)
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.decoder_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cross_kv: list[tuple[Tensor, Tensor]], cross_bias: Tensor | None,
                cache: KVCache | None) -> Tensor:
        T = x.shape[1]
        offset = cache.length if cache is not None else 0
        bias = relative_bias(self.rel_bias, T, offset + T, offset, bidirectional=False,
                             max_distance=self.max_distance)
        bias = bias + attention_bias(T, offset + T, offset, None, x.device)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, i, bias, cross_bias, cross_kv[i], cache)
        if cache is not None:
            cache.length = offset + T
        return self.drop(self.final_norm(x))


class EncDecLM(nn.Module):
    def __init__(self, cfg: EncDecConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)  # shared by encoder, decoder (and tied head)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """T5's init (Mesh TF; as in HF `T5PreTrainedModel._init_weights`), each std times `init_std`.

        Embedding N(0, 1); q N(0, (d*d_kv)^-1/2), the 1/sqrt(d_kv) T5 leaves out of the scores;
        k, v, MLP in, relative bias N(0, d^-1/2); o N(0, (H*d_kv)^-1/2); MLP out N(0, d_ff^-1/2).
        An untied head is N(0, d^-1/2): logits of the same scale as the tied head's d^-1/2 rescaling."""
        cfg, f = self.cfg, self.cfg.init_std
        std = {"q": (cfg.d_model * cfg.head_dim) ** -0.5, "k": cfg.d_model ** -0.5, "v": cfg.d_model ** -0.5,
               "o": (cfg.n_head * cfg.head_dim) ** -0.5, "up": cfg.d_model ** -0.5, "gate": cfg.d_model ** -0.5,
               "down": cfg.d_ff ** -0.5, "rel_bias": cfg.d_model ** -0.5, "lm_head": cfg.d_model ** -0.5,
               "tok_emb": 1.0}
        for name, p in self.named_parameters():
            if "norm" in name:
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, f * std[name.split(".")[-2]])

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache for the decoder's self-attention (cross-attention k/v come from `cross_kv`)."""
        cfg, ref = self.cfg, self.tok_emb.weight
        return KVCache(cfg.decoder_layers, cfg.n_head, cfg.head_dim, batch_size, max_len or cfg.max_seq_len,
                       ref.device, dtype or ref.dtype)

    def _check_length(self, what: str, n: int) -> None:
        if n > self.cfg.max_seq_len:
            raise ValueError(f"{what} of {n} tokens exceeds max_seq_len={self.cfg.max_seq_len}; "
                             "truncate it explicitly")

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Encoder hidden states [B, S, d_model]; `attention_mask` [B, S] is 1 for tokens, 0 for padding."""
        self._check_length("input", input_ids.shape[1])
        mask_bias = None if attention_mask is None else padding_bias(attention_mask)
        return self.encoder(self.tok_emb(input_ids), mask_bias)

    def cross_kv(self, encoder_hidden: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Each decoder layer's cross-attention keys and values of the encoder output (reused every step)."""
        return [block.cross_attn.project_kv(encoder_hidden) for block in self.decoder.blocks]

    def decode(self, decoder_input_ids: Tensor, encoder_hidden: Tensor, encoder_mask: Tensor | None = None,
               cache: KVCache | None = None, cross_kv: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """Logits [B, T, vocab] for decoder inputs at positions cache.length.. (0.. without a cache)."""
        offset = cache.length if cache is not None else 0
        self._check_length("decoder input", offset + decoder_input_ids.shape[1])
        if cross_kv is None:
            cross_kv = self.cross_kv(encoder_hidden)
        cross_bias = None if encoder_mask is None else padding_bias(encoder_mask)
        h = self.decoder(self.tok_emb(decoder_input_ids), cross_kv, cross_bias, cache)
        if self.cfg.tie_embeddings:  # T5 rescales before the tied head (Mesh TF)
            return F.linear(h * self.cfg.d_model ** -0.5, self.tok_emb.weight)
        return self.lm_head(h)

    def forward(self, input_ids: Tensor, decoder_input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Teacher-forced logits [B, T, vocab]; make `decoder_input_ids` with `shift_right(labels)`."""
        encoder_hidden = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, encoder_hidden, attention_mask)

    def shift_right(self, labels: Tensor) -> Tensor:
        """Decoder inputs: `decoder_start_id` then labels[:-1], ignored (-100) labels replaced by the start
        (= pad) id, as T5 does."""
        start = labels.new_full((*labels.shape[:-1], 1), self.cfg.decoder_start_id)
        shifted = torch.cat([start, labels[..., :-1]], dim=-1)
        return shifted.masked_fill(shifted == -100, self.cfg.decoder_start_id)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
