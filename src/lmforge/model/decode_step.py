"""A `DecoderLM`'s decode step over a KV cache (and a prefill sharing its pass) without its forward's module calls.

A small model's decode step is mostly interpreter and dispatch overhead: each layer's forward goes through a dozen
`nn.Module` calls, attribute look-ups, closures and reshapes around a handful of kernels. `DecodeStep` looks up the
blocks' parameters once and then runs the same kernels on the same tensors (the model's position inputs and
attention bias, the cache's `update`), every token one row [tokens, d_model] of the matmuls; a submodule that is not
a plain Linear or LayerNorm (an adapted or quantised projection, an RMSNorm, a q/k norm) is called as it is. It takes
pre-norm blocks, sequential or parallel, with plain `Attention` and `MLP` (`supports`); the engine's rows fall back
to the model's forward otherwise. The MLP's activation runs after its projection (`fused_activations` is for
scoring, where the rows are many). Logits agree with the forward's up to fp32 rounding (tests/test_decode_step.py).

A `DecodeStep` holds the model's modules as they were when it was made: make a new one after changing the model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as module_hooks

from lmforge.model.attention import Attention, KVCache
from lmforge.model.decoder import Block, DecoderLM
from lmforge.model.layers import MLP, apply_rope

Op = Callable[[Tensor], Tensor]


def supports(model: nn.Module) -> bool:
    """Whether `DecodeStep` computes `model`'s decode step: a plain `DecoderLM` (no soft prompt) of pre-norm
    blocks with plain attention (no prefix-tuning wrapper) and MLPs, in eval mode, with no forward hook anywhere
    (a hook must see the forward it hooks)."""
    return (type(model) is DecoderLM and not model.training and model.cfg.norm_placement == "pre"
            and all(type(b) is Block and type(b.attn) is Attention and type(b.mlp) is MLP for b in model.blocks)
            and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
            and not (module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks))


Batch = tuple[Tensor, KVCache, "Tensor | None"]  # token ids [n, T], their cache, their attention mask (or None)


class DecodeStep:
    """Called with a batch (tokens, cache, attention_mask), returns [`model(tokens, cache=cache,
    attention_mask=attention_mask)[:, -1]`]: the logits [n, vocab] of each row's last token (the cache grows by the
    new keys and values). Several batches (the running rows' decode step and a prefill of new prompts into a cache of
    their own) run in one pass over the weights: every matmul takes all their tokens at once, attention takes each
    batch over its own cache; called with a and b, it returns a's logits and b's. Check `supports(model)` first."""

    def __init__(self, model: DecoderLM):
        self.model = model
        self.layers = [_Layer(block) for block in model.blocks]
        self.final_norm, self.head = _norm(model.final_norm), _linear(model.lm_head)

    def __call__(self, *batches: Batch) -> list[Tensor]:
        model, parts, start = self.model, [], 0
        for tokens, cache, attention_mask in batches:
            x, rope, bias = model.layer_inputs(model.tok_emb(tokens), cache, attention_mask)
            parts.append(_Part(x.reshape(-1, x.shape[-1]), start, tokens.shape, cache, rope, bias))
            start += tokens.numel()
        x = parts[0].x if len(parts) == 1 else torch.cat([p.x for p in parts])  # every token a row [N, d_model]
        for index, layer in enumerate(self.layers):
            attended = layer.attend(layer.attn_norm(x), index, parts)
            if layer.parallel:
                x = x + attended + layer.mlp(layer.mlp_norm(x))
            else:
                x = x + attended
                x = x + layer.mlp(layer.mlp_norm(x))
        last = [p.last_rows(x) for p in parts]
        for p in parts:
            p.cache.length += p.width
        logits = self.head(self.final_norm(last[0] if len(last) == 1 else torch.cat(last)))
        return list(logits.split([p.rows for p in parts]))


class _Part:
    """One batch of `DecodeStep`: its tokens' rows [start, start + rows x width) of the flattened batch."""

    def __init__(self, x: Tensor, start: int, shape: torch.Size, cache: KVCache, rope: tuple[Tensor, Tensor] | None,
                 bias: Tensor | None):
        self.x, self.start, (self.rows, self.width), self.cache, self.rope = x, start, shape, cache, rope
        self.bias = None if bias is None else bias.to(x.dtype)

    def heads(self, t: Tensor, width: int) -> Tensor:
        """This batch's rows of a projection t [N, heads x width] as [rows, heads, T, width]."""
        part = t[self.start:self.start + self.rows * self.width]
        if self.width == 1:
            return part.view(self.rows, -1, 1, width)
        return part.view(self.rows, self.width, -1, width).transpose(1, 2)

    def last_rows(self, x: Tensor) -> Tensor:
        part = x[self.start:self.start + self.rows * self.width]
        return part if self.width == 1 else part.view(self.rows, self.width, -1)[:, -1]


class _Layer:
    """One block's decode computation, its parameters looked up once."""

    def __init__(self, block: Block):
        attn, mlp = block.attn, block.mlp
        self.parallel, self.attn_norm, self.mlp_norm = block.parallel, _norm(block.attn_norm), _norm(block.mlp_norm)
        self.attn, self.heads, self.kv, self.width, self.scale = attn, attn.n_head, attn.n_kv, attn.head_dim, attn.scale
        self.q, self.k, self.v, self.o = (_linear(m) for m in (attn.q, attn.k, attn.v, attn.o))
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.first, self.up, self.down = _linear(mlp.gate if mlp.gated else mlp.up), _linear(mlp.up), _linear(mlp.down)
        self.act, self.gated = mlp.act, mlp.gated

    def attend(self, h: Tensor, index: int, parts: list[_Part]) -> Tensor:
        """The attention output [N, d_model] for normed tokens h [N, d_model]: each part's queries over its own
        cache, where its new keys and values go."""
        heads, kv, width = self.heads, self.kv, self.width
        fused = self.attn._fused  # inside `fused_qkv`: one matmul
        if fused is not None:
            q, k, v = F.linear(h, *fused).split([heads * width, kv * width, kv * width], dim=1)
        else:
            q, k, v = self.q(h), self.k(h), self.v(h)
        outputs = []
        for p in parts:
            pq, pk, pv = p.heads(q, width), p.heads(k, width), p.heads(v, width)
            if self.q_norm is not None:
                pq, pk = self.q_norm(pq), self.k_norm(pk)
            if p.rope is not None:
                pq, pk = apply_rope(pq, *p.rope), apply_rope(pk, *p.rope)
            pk, pv = p.cache.update(index, pk, pv)
            y = F.scaled_dot_product_attention(pq, pk, pv, attn_mask=p.bias, is_causal=p.bias is None and p.width > 1,
                                               scale=self.scale, enable_gqa=kv != heads)
            outputs.append(y.transpose(1, 2).reshape(-1, heads * width))
        return self.o(outputs[0] if len(outputs) == 1 else torch.cat(outputs))

    def mlp(self, h: Tensor) -> Tensor:
        a = self.act(self.first(h))
        return self.down(a * self.up(h) if self.gated else a)


def _linear(module: nn.Module) -> Op:
    if type(module) is not nn.Linear:
        return module
    weight, bias = module.weight, module.bias
    return lambda x: F.linear(x, weight, bias)


def _norm(module: nn.Module) -> Op:
    if type(module) is not nn.LayerNorm:
        return module
    shape, weight, bias, eps = module.normalized_shape, module.weight, module.bias, module.eps
    return lambda x: torch.layer_norm(x, shape, weight, bias, eps)
