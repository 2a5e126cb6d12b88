"""The decoder-only language model: GPT-2, Llama, Mistral, Qwen2/3 and GPT-NeoX families from one config.

`DecoderLM(cfg)(input_ids)` returns logits [batch, time, vocab]. Pass a `KVCache` (from
`model.new_cache`) to decode incrementally: the cache remembers how many positions it holds.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.model.activation_checkpointing import CheckpointableBlock
from lmforge.model.attention import Attention, KVCache, attention_bias, mask_positions, masked_attention_bias
from lmforge.model.layers import MLP, alibi_slopes, make_norm, rope_tables, sinusoidal_table
from lmforge.model.linear_cross_entropy import linear_cross_entropy


def _identity(x: Tensor) -> Tensor:
    return x


class Block(CheckpointableBlock):
    """One Transformer layer; pre-norm x + f(norm(x)) or post-norm norm(x + f(x)); with `parallel_residual`,
    x + attn(norm(x)) + mlp(norm'(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_norm, self.parallel = cfg.norm_placement == "pre", cfg.parallel_residual
        self.attn_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        qk_norm = make_norm(cfg.norm, cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.attn = Attention(cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.has_qkv_bias, cfg.dropout,
                              out_bias=cfg.attn_bias, qk_norm=qk_norm)
        self.mlp_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.ff_dim, cfg.activation, cfg.mlp == "swiglu", cfg.mlp_bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, layer: int, rope, bias, cache: KVCache | None) -> Tensor:
        def attend(h: Tensor) -> Tensor:
            return self.attn(h, bias=bias, causal=True, rope=rope, cache=cache, layer=layer)

        drop = self.drop if self.training else _identity  # skips two module calls per layer when decoding
        if self.parallel:
            return x + drop(attend(self.attn_norm(x))) + drop(self.mlp(self.mlp_norm(x)))
        if self.pre_norm:
            x = x + drop(attend(self.attn_norm(x)))
            return x + drop(self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + drop(attend(x)))
        return self.mlp_norm(x + drop(self.mlp(x)))


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.position == "learned":
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self._position_tables()
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        # Post-norm blocks already end in a norm; pre-norm needs one before the head.
        pre = cfg.norm_placement == "pre"
        self.final_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps) if pre else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def _position_tables(self) -> None:
        """The computed (unsaved) position buffers: sinusoidal table, RoPE tables or ALiBi slopes."""
        cfg = self.cfg
        if cfg.position == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)
        elif cfg.position == "rope":
            cos, sin = self._rope_tables(cfg.max_seq_len)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        elif cfg.position == "alibi":
            self.register_buffer("alibi", alibi_slopes(cfg.n_head), persistent=False)

    @classmethod
    def holding(cls, cfg: ModelConfig, state: dict[str, Tensor]) -> DecoderLM:
        """A model whose parameters are the tensors of `state` themselves, in their dtype (a full state dict, checked
        by the caller): built on the meta device, so there is no random init and no second copy of the weights."""
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(state, strict=True, assign=True)
        model._position_tables()
        dtype = model.tok_emb.weight.dtype
        for name, table in model.named_buffers():  # as `.to(dtype)` leaves them
            setattr(model, name, table.to(dtype))
        if cfg.tie_embeddings:
            model.lm_head.weight = model.tok_emb.weight
        return model

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layer)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            elif name.endswith(("attn.o.weight", "mlp.down.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    @property
    def device(self) -> torch.device:
        """Where the model lives, read off a norm: quantisation swaps the embedding and Linears, never norms."""
        return self.blocks[0].attn_norm.weight.device

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache in the dtype of the activations (the embedding's output)."""
        cfg = self.cfg
        emb = self.tok_emb
        dtype = dtype or (emb.weight.dtype if isinstance(emb, nn.Embedding) else emb.dtype)
        return KVCache(cfg.n_layer, cfg.kv_heads, cfg.head_dim, batch_size, max_len or cfg.max_seq_len, self.device,
                       dtype)

    def forward(self, input_ids: Tensor, cache: KVCache | None = None, attention_mask: Tensor | None = None,
                keep_last: int = 0, labels: Tensor | None = None) -> Tensor:
        """Logits [B, T, vocab], or [B, keep_last, vocab] for the last positions only: a prefill needs just the
        last one, which saves a [T, d_model] x [d_model, vocab] matmul. With `labels` [B, T] (-100: no loss), the
        summed cross-entropy of the logits against them instead (fp32), computed chunk by chunk when the head is a
        plain Linear, so the whole [B, T, vocab] fp32 logits are never held (`linear_cross_entropy`)."""
        h = self.hidden(input_ids, cache, attention_mask)
        if labels is None:
            return self.lm_head(h[:, -keep_last:] if keep_last else h)
        if type(self.lm_head) is nn.Linear and self.lm_head.bias is None:
            return linear_cross_entropy(h, self.lm_head.weight, labels)
        logits = self.lm_head(h).float()
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")

    def hidden(self, input_ids: Tensor, cache: KVCache | None = None, attention_mask: Tensor | None = None) -> Tensor:
        """Final hidden states [B, T, d_model] (after the final norm): what task heads read.

        `attention_mask` [B, S] (1 = real, 0 = padding) covers every token in the cache so far plus the new ones;
        with it, padding is hidden from attention and each row's positions count its real tokens from 0, so
        left-padded prompts of different lengths batch together."""
        return self.hidden_of_embeddings(self.tok_emb(input_ids), cache, attention_mask)

    def hidden_of_embeddings(self, x: Tensor, cache: KVCache | None = None,
                             attention_mask: Tensor | None = None) -> Tensor:
        """`hidden` of the input embeddings x [B, T, d_model] rather than of token ids."""
        x, rope, bias = self.layer_inputs(x, cache, attention_mask)
        for i, block in enumerate(self.blocks):
            x = block(x, i, rope, bias, cache)
        if cache is not None:
            cache.length += x.shape[1]
        return self.final_norm(x)

    def layer_inputs(self, x: Tensor, cache: KVCache | None = None, attention_mask: Tensor | None = None
                     ) -> tuple[Tensor, tuple[Tensor, Tensor] | None, Tensor | None]:
        """What the first block takes for input embeddings x [B, T, d_model]: x with its positions added (and
        dropout), the RoPE cos/sin tables of its positions and the additive attention bias (each None when not
        needed). With `attention_mask`, per-row positions and a padding bias from it."""
        cfg = self.cfg
        offset = cache.length if cache is not None else 0
        T = x.shape[1]
        if attention_mask is not None:
            if attention_mask.shape != (x.shape[0], offset + T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                                 f"{(x.shape[0], offset + T)}: the cached tokens plus the new ones")
            return self._masked_inputs(x, offset, attention_mask)
        if cfg.position == "learned" and offset + T > cfg.max_seq_len:
            raise ValueError(
                f"sequence of {offset + T} tokens exceeds the {cfg.max_seq_len} learned positions; "
                "shorten the prompt or truncate it explicitly"
            )
        rope = bias = None
        if cfg.position == "learned":
            x = x + self.pos_emb.weight[offset:offset + T]
        elif cfg.position == "sinusoidal":
            if offset + T > self.pos_table.shape[0]:  # extrapolating past the training length
                self.pos_table = sinusoidal_table(offset + T, cfg.d_model).to(x.device)
            # Vaswani et al. 2017 sec. 3.4: embeddings x sqrt(d_model), or the unit-amplitude
            # sin/cos would drown N(0, 0.02) token embeddings
            x = x * math.sqrt(cfg.d_model) + self.pos_table[offset:offset + T].to(x.dtype)
        elif cfg.position == "rope":
            rope = self._rope(offset, T)
        window = cfg.sliding_window if cfg.sliding_window is not None and offset + T > cfg.sliding_window else None
        if cfg.position == "alibi" or (offset > 0 and T > 1) or window is not None:
            bias = attention_bias(T, offset + T, offset, self.alibi if cfg.position == "alibi" else None, x.device,
                                  window)
        return self.drop(x), rope, bias

    def _masked_inputs(self, x: Tensor, offset: int, attention_mask: Tensor
                       ) -> tuple[Tensor, tuple[Tensor, Tensor] | None, Tensor]:
        """`layer_inputs` with per-row positions and a padding bias from `attention_mask`."""
        cfg = self.cfg
        T = x.shape[1]
        if cfg.position == "learned" and offset + T > cfg.max_seq_len:
            raise ValueError(f"sequence of {offset + T} slots exceeds the {cfg.max_seq_len} learned positions")
        if T == 1:  # a decode step: the new slot's position is the count of real slots before it
            pos = (attention_mask.sum(-1, keepdim=True) - 1).clamp(min=0)
        else:
            pos = mask_positions(attention_mask)[:, -T:]
        rope = None
        if cfg.position == "learned":
            x = x + self.pos_emb(pos)
        elif cfg.position == "sinusoidal":
            if offset + T > self.pos_table.shape[0]:
                self.pos_table = sinusoidal_table(offset + T, cfg.d_model).to(x.device)
            x = x * math.sqrt(cfg.d_model) + self.pos_table[pos].to(x.dtype)
        elif cfg.position == "rope":
            reach = offset + T
            if cfg.rope_scaling is not None and cfg.rope_scaling.type == "dynamic":
                reach = int(pos.max()) + 1  # dynamic NTK's base follows the furthest real position, as transformers'
            cos, sin = self._rope(0, reach)
            rope = cos[pos][:, None], sin[pos][:, None]
        bias = masked_attention_bias(attention_mask, T, self.alibi if cfg.position == "alibi" else None,
                                     cfg.sliding_window)
        return self.drop(x), rope, bias

    def _rope(self, offset: int, T: int) -> tuple[Tensor, Tensor]:
        scaling = self.cfg.rope_scaling
        if scaling is not None and scaling.type == "dynamic" and offset + T > self.cfg.max_seq_len:
            # dynamic NTK: the base depends on how far this forward reaches (cached keys keep their own rotation)
            cos, sin = self._rope_tables(offset + T)
            return cos[offset:].to(self.rope_cos), sin[offset:].to(self.rope_sin)
        if offset + T > self.rope_cos.shape[0]:  # extrapolating past the training length (e.g. a study)
            cos, sin = self._rope_tables(offset + T)
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos), sin.to(self.rope_sin)
        return self.rope_cos[offset:offset + T], self.rope_sin[offset:offset + T]

    def _rope_tables(self, length: int) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        return rope_tables(length, cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len)

    # -- accounting -----------------------------------------------------------------------------
    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token, 6*N_matmul + 12*L*d*T (Chowdhery et al. 2022, app. B).

        N_matmul counts every weight used in a matrix multiply (the head included, the
        embedding lookups excluded); forward alone is a third of this."""
        cfg, T = self.cfg, seq_len or self.cfg.max_seq_len
        n_matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * n_matmul + 12 * cfg.n_layer * cfg.d_model * T
