"""One decode step of a `DecoderLM` (one new token per row, a KV cache) without the module calls of its forward.

A small model's decode step is mostly interpreter and dispatch overhead: each layer's forward goes through a dozen
`nn.Module` calls, attribute look-ups, closures and reshapes around a handful of kernels. `DecodeStep` looks up the
blocks' parameters once and then runs the same kernels on the same tensors (the model's position inputs and
attention bias, the cache's `update`), the per-token activations kept [rows, d_model]; a submodule that is not a
plain Linear or LayerNorm (an adapted or quantised projection, an RMSNorm, a q/k norm) is called as it is. It takes
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

from lmforge.model.decoder import Block, DecoderLM
from lmforge.model.layers import MLP, Attention, KVCache, apply_rope

Op = Callable[[Tensor], Tensor]


def supports(model: nn.Module) -> bool:
    """Whether `DecodeStep` computes `model`'s decode step: a plain `DecoderLM` (no soft prompt) of pre-norm
    blocks with plain attention (no prefix-tuning wrapper) and MLPs, in eval mode, with no forward hook anywhere
    (a hook must see the forward it hooks)."""
    return (type(model) is DecoderLM and not model.training and model.cfg.norm_placement == "pre"
            and all(type(b) is Block and type(b.attn) is Attention and type(b.mlp) is MLP for b in model.blocks)
            and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
            and not (module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks))


class DecodeStep:
    """`step(tokens, cache, attention_mask)` computes `model(tokens, cache=cache, attention_mask=attention_mask)
    [:, -1]` for tokens [B, 1]: the logits [B, vocab] of each row's next token (the cache grows by the new keys and
    values). Check `supports(model)` first."""

    def __init__(self, model: DecoderLM):
        self.model = model
        self.layers = [_Layer(block) for block in model.blocks]
        self.final_norm, self.head = _norm(model.final_norm), _linear(model.lm_head)

    def __call__(self, tokens: Tensor, cache: KVCache, attention_mask: Tensor | None) -> Tensor:
        model = self.model
        x, rope, bias = model.layer_inputs(model.tok_emb(tokens), cache, attention_mask)
        x = x.view(x.shape[0], -1)
        if bias is not None:
            bias = bias.to(x.dtype)
        for index, layer in enumerate(self.layers):
            attended = layer.attend(layer.attn_norm(x), index, rope, bias, cache)
            if layer.parallel:
                x = x + attended + layer.mlp(layer.mlp_norm(x))
            else:
                x = x + attended
                x = x + layer.mlp(layer.mlp_norm(x))
        cache.length += 1
        return self.head(self.final_norm(x))


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

    def attend(self, h: Tensor, index: int, rope: tuple[Tensor, Tensor] | None, bias: Tensor | None,
               cache: KVCache) -> Tensor:
        """The attention output [B, d_model] for normed tokens h [B, d_model], their keys and values put in `cache`."""
        rows, heads, kv, width = h.shape[0], self.heads, self.kv, self.width
        fused = self.attn._fused  # inside `fused_qkv`: one matmul
        if fused is not None:
            q, k, v = F.linear(h, *fused).view(rows, heads + 2 * kv, 1, width).split([heads, kv, kv], dim=1)
        else:
            q, k, v = (f(h).view(rows, -1, 1, width) for f in (self.q, self.k, self.v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = cache.update(index, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale, enable_gqa=kv != heads)
        return self.o(y.reshape(rows, heads * width))

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
