"""The BERT-style bidirectional encoder (Devlin et al. 2019): post-norm blocks, MLM head, pooler.

`EncoderModel(cfg)(input_ids, token_type_ids, attention_mask)` returns masked-LM logits
[batch, time, vocab]; `hidden(...)` the final hidden states that task heads and sentence
embeddings read; `pooled(hidden)` BERT's tanh pooler over the first ([CLS]) position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import EncoderConfig
from lmforge.model.activation_checkpointing import CheckpointableBlock
from lmforge.model.attention import Attention, padding_bias
from lmforge.model.layers import ACTIVATIONS, MLP, make_norm


class EncoderBlock(CheckpointableBlock):
    """One post-norm BERT layer: x = norm(x + attn(x)); x = norm(x + mlp(x))."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attn = Attention(cfg.d_model, cfg.n_head, cfg.n_head, cfg.head_dim, bias=True, dropout=cfg.dropout)
        self.attn_norm = make_norm("layernorm", cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.ff_dim, cfg.activation, gated=False, bias=True)
        self.mlp_norm = make_norm("layernorm", cfg.d_model, cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        x = self.attn_norm(x + self.drop(self.attn(x, bias=bias)))
        return self.mlp_norm(x + self.drop(self.mlp(x)))


class EncoderModel(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.emb_norm = make_norm("layernorm", cfg.d_model, cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layer))
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model)
        # MLM head: transform (dense, activation, norm), then a decoder tied to tok_emb with its own bias.
        self.mlm_dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlm_act = ACTIVATIONS[cfg.activation]
        self.mlm_norm = make_norm("layernorm", cfg.d_model, cfg.norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        if cfg.nsp:
            self.nsp_head = nn.Linear(cfg.d_model, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT init: weights N(0, init_std), biases zero, norms unit gain."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, self.cfg.init_std)

    def hidden(self, input_ids: Tensor, token_type_ids: Tensor | None = None,
               attention_mask: Tensor | None = None) -> Tensor:
        """Final hidden states [B, T, d_model]; `attention_mask` is [B, T] with 1 = token, 0 = padding."""
        T = input_ids.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.cfg.max_seq_len} learned positions; "
                             f"truncate it explicitly to at most {self.cfg.max_seq_len} tokens")
        types = self.type_emb.weight[0] if token_type_ids is None else self.type_emb(token_type_ids)
        x = self.tok_emb(input_ids) + types + self.pos_emb.weight[:T]
        x = self.drop(self.emb_norm(x))
        bias = None if attention_mask is None else padding_bias(attention_mask, x.dtype)
        for block in self.blocks:
            x = block(x, bias)
        return x

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        """Masked-LM logits [B, T, vocab]."""
        return self.mlm_logits(self.hidden(input_ids, token_type_ids, attention_mask))

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """The MLM head on hidden states [..., d_model] (e.g. only the masked positions)."""
        h = self.mlm_norm(self.mlm_act(self.mlm_dense(hidden)))
        return F.linear(h, self.tok_emb.weight, self.mlm_bias)

    def pooled(self, hidden: Tensor) -> Tensor:
        """BERT's pooler: tanh(dense(hidden of the first token)) -> [B, d_model]."""
        return torch.tanh(self.pooler(hidden[:, 0]))

    def nsp_logits(self, pooled: Tensor) -> Tensor:
        """Next-sentence-prediction logits [B, 2] (0 = B follows A, as in BERT); needs `cfg.nsp`."""
        if not self.cfg.nsp:
            raise ValueError("this encoder has no NSP head; build it with nsp=True")
        return self.nsp_head(pooled)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
