"""Soft prompts: prefix tuning (Li & Liang 2021) and prompt tuning (Lester et al. 2021).

Prefix tuning wraps every layer's attention so that every query also sees P learned key/value slots. They carry
no position (no RoPE rotation, no learned position) and live outside the KV cache, so the tokens keep the
positions of the base model and cached decoding is unchanged. Prompt tuning makes the model a
`PromptTunedLM`, which prepends P learned input embeddings to a fresh sequence (positions 0..P-1) and drops them
from its outputs, so logits stay [B, T, vocab] aligned with input_ids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import ConfigError
from lmforge.model.attention import Attention, KVCache, attention_bias
from lmforge.model.decoder import DecoderLM

if TYPE_CHECKING:
    from lmforge.peft.config import PeftConfig


class PrefixTuning(nn.Module):
    """Key/value prefixes [n_layer, 2, n_kv, P, head_dim], stored directly or reparameterised.

    Reparameterised (Li & Liang 2021, sec. 4.3, for stable training): P_theta[i] = MLP(P'_theta[i]), with P'
    an embedding of P tokens and the MLP Linear -> tanh -> Linear to every layer's keys and values. `fold`
    replaces the MLP by the prefixes it computes, as the paper does after training."""

    def __init__(self, n_layer: int, n_kv: int, head_dim: int, length: int, d_model: int, std: float,
                 reparam_hidden: int | None):
        super().__init__()
        self.shape = (n_layer, 2, n_kv, length, head_dim)
        if reparam_hidden is None:
            self.prefix = nn.Parameter(torch.randn(self.shape) * std)
            self.embed = self.mlp = None
        else:
            self.prefix = None
            self.embed = nn.Embedding(length, d_model)
            self.mlp = nn.Sequential(nn.Linear(d_model, reparam_hidden), nn.Tanh(),
                                     nn.Linear(reparam_hidden, n_layer * 2 * n_kv * head_dim))

    def kv(self, layer: int) -> tuple[Tensor, Tensor]:
        """Layer `layer`'s keys and values, each [1, n_kv, P, head_dim]."""
        if self.mlp is None:
            k, v = self.prefix[layer]
            return k[None], v[None]
        _, _, n_kv, length, head_dim = self.shape
        width = 2 * n_kv * head_dim  # only this layer's rows of the output projection
        out = self.mlp[2]
        rows = slice(layer * width, (layer + 1) * width)
        h = F.linear(self.mlp[1](self.mlp[0](self.embed.weight)), out.weight[rows], out.bias[rows])
        k, v = h.view(length, 2, n_kv, head_dim).permute(1, 2, 0, 3)
        return k[None], v[None]

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the reparameterisation by the plain prefixes it produces (outputs unchanged)."""
        if self.mlp is None:
            return
        table = torch.stack([torch.cat(self.kv(i)) for i in range(self.shape[0])])
        self.prefix = nn.Parameter(table)
        self.embed = self.mlp = None


class PrefixAttention(nn.Module):
    """An attention layer whose queries also see its layer's learned key/value slots of the shared `PrefixTuning`
    (Li & Liang 2021), in front of the keys and values the layer computes and caches itself."""

    def __init__(self, base: Attention, tuning: PrefixTuning, layer: int):
        super().__init__()
        self.base = base
        object.__setattr__(self, "tuning", tuning)  # registered once, on the model, not under every layer
        self.layer = layer
        self.register_load_state_dict_pre_hook(_attention_keys_under_base)

    def forward(self, x: Tensor, *, bias: Tensor | None = None, causal: bool = False,
                rope: tuple[Tensor, Tensor] | None = None, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        q, k, v = self.base.queries_keys_values(x, rope, cache, layer)
        pk, pv = self.tuning.kv(self.layer)
        B, T = x.shape[:2]
        if bias is None and causal and T > 1:  # SDPA's is_causal would align its diagonal to the prefix
            bias = attention_bias(T, k.shape[2], k.shape[2] - T, None, x.device)
        k = torch.cat([pk.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)
        v = torch.cat([pv.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
        if bias is not None:
            bias = F.pad(bias, (pk.shape[2], 0))
        return self.base.attend(q, k, v, bias=bias, causal=causal)


def _attention_keys_under_base(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints from before the wrapper (an `Attention.prefix` hook) hold the attention's own tensors directly
    under `prefix` (`blocks.0.attn.q.weight`); the wrapper keeps them under `base.`."""
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "base.")]:
        state_dict[prefix + "base." + key[len(prefix):]] = state_dict.pop(key)


class SoftPrompt(nn.Module):
    """P learned input embeddings prepended to the tokens' (Lester et al. 2021)."""

    def __init__(self, init: Tensor):
        super().__init__()
        self.weight = nn.Parameter(init.clone())
        self.n_virtual = init.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.weight.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)


class PromptTunedLM(DecoderLM):
    """A `DecoderLM` whose every fresh sequence starts with the P learned embeddings of `soft_prompt`, at positions
    0..P-1: its caches hold P more slots, a padding mask gets P leading ones, and its outputs drop the P positions,
    so logits stay [B, T, vocab] aligned with input_ids. `apply_prompt` makes a built model one in place by
    swapping its class (as torch.nn.utils.parametrize does), so every reference to the model sees the change."""

    soft_prompt: SoftPrompt

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        virtual = self.soft_prompt.n_virtual
        return super().new_cache(batch_size, (max_len or self.cfg.max_seq_len) + virtual, dtype)

    def hidden(self, input_ids: Tensor, cache: KVCache | None = None, attention_mask: Tensor | None = None) -> Tensor:
        """`DecoderLM.hidden`, the soft prompt in front of a fresh sequence (not of each decoding step)."""
        x = self.tok_emb(input_ids)
        fresh = cache is None or cache.length == 0
        if fresh:
            x = self.soft_prompt(x)
        if attention_mask is not None:  # the caller's mask covers its own tokens; the soft prompt is always seen
            attention_mask = F.pad(attention_mask, (self.soft_prompt.n_virtual, 0), value=1)
        h = self.hidden_of_embeddings(x, cache, attention_mask)
        return h[:, self.soft_prompt.n_virtual:] if fresh else h


def _soft_prompt_under_its_name(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints from before `PromptTunedLM` hold the soft prompt as `embed_hook.weight`."""
    old = prefix + "embed_hook.weight"
    if old in state_dict:
        state_dict[prefix + "soft_prompt.weight"] = state_dict.pop(old)


def apply_prefix(model: nn.Module, cfg: PeftConfig) -> PrefixTuning:
    """Freeze the model and give every block's attention `cfg.prefix_len` learned key/value slots
    (reparameterised through an MLP of width `cfg.reparam_hidden` when `cfg.reparam`)."""
    attns = [block.attn for block in model.blocks]
    if not all(isinstance(a, Attention) for a in attns):
        raise ConfigError("prefix tuning needs each block's attention unwrapped; apply it to a plain model")
    model.requires_grad_(False)
    ref = model.tok_emb.weight
    tuning = PrefixTuning(len(attns), attns[0].n_kv, attns[0].head_dim, cfg.prefix_len, model.cfg.d_model,
                          model.cfg.init_std, cfg.reparam_hidden if cfg.reparam else None)
    model.prefix_tuning = tuning.to(device=ref.device, dtype=ref.dtype)
    for i, (block, attn) in enumerate(zip(model.blocks, attns, strict=True)):
        block.attn = PrefixAttention(attn, tuning, i)
    return tuning


def apply_prompt(model: nn.Module, cfg: PeftConfig) -> SoftPrompt:
    """Freeze the model and prepend `cfg.prompt_len` soft prompt embeddings, initialised from the embeddings of
    random vocabulary tokens (Lester et al. 2021, sec. 3)."""
    if not isinstance(model, DecoderLM):
        raise ConfigError(f"prompt tuning needs a decoder language model, got {type(model).__name__}; "
                          "use prefix tuning or an adapter instead")
    if model.cfg.position == "learned" and cfg.prompt_len >= model.cfg.max_seq_len:
        raise ConfigError(f"prompt_len={cfg.prompt_len} leaves no room for tokens in the model's "
                          f"{model.cfg.max_seq_len} learned positions; lower it")
    model.requires_grad_(False)
    ids = torch.randint(model.cfg.vocab_size, (cfg.prompt_len,), device=model.tok_emb.weight.device)
    model.__class__ = PromptTunedLM
    model.soft_prompt = SoftPrompt(model.tok_emb.weight.detach()[ids])
    model.register_load_state_dict_pre_hook(_soft_prompt_under_its_name)
    return model.soft_prompt
