"""Training memory by kind (weights, gradients, fp32 master weights, Adam states, activations) and KV-cache size.

Bytes per parameter come from a precision regime; the model states are exact given the regime (they are what the
optimizer and autograd hold), the activations are an estimate: the tensors autograd saves in each block of a
pre-norm Transformer with fused attention (SDPA / FlashAttention: no T x T scores kept), following Korthikanti et
al. (2022), who count 34·s·b·h bytes per GPT layer in 16-bit with dropout (here: 16 values per token per layer,
plus dropout masks of one byte, plus what GQA, SwiGLU, LoRA and the head change). Temporary buffers, allocator
fragmentation and the framework's own memory are not counted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from pydantic import BaseModel

from lmforge.calc.flops import ModelCount
from lmforge.errors import ConfigError


@dataclass(frozen=True)
class Regime:
    """Bytes per parameter held for training, and per activation value."""

    name: str
    weights: int  # the weights the forward computes with
    gradients: int
    master: int  # an fp32 master copy beside 16-bit weights (mixed precision)
    adam: int  # Adam's first and second moments
    activation: int
    description: str


REGIMES: dict[str, Regime] = {r.name: r for r in (
    Regime("fp32", 4, 4, 0, 8, 4, "fp32 weights, gradients, Adam moments and activations (seed 000's 4 x (4 x "
           "params + activations))"),
    Regime("bf16-mixed", 2, 2, 4, 8, 2, "bf16 weights and gradients, fp32 master weights and Adam moments: 16 bytes "
           "per parameter (ZeRO's count; lmforge's autocast keeps fp32 weights and gradients instead, also 16)"),
    Regime("fp16-mixed", 2, 2, 4, 8, 2, "fp16 weights and gradients with a loss scale, fp32 master weights and Adam "
           "moments: 16 bytes per parameter (Rajbhandari et al. 2019, ZeRO)"),
    Regime("bf16", 2, 2, 0, 8, 2, "bf16 weights and gradients, fp32 Adam moments, no master copy: 12 bytes per "
           "parameter (the 16-bit full fine-tuning QLoRA compares against)"),
)}
METHODS = ("full", "lora", "qlora")


def find_regime(name: str) -> Regime:
    if name not in REGIMES:
        raise ConfigError(f"unknown precision regime '{name}'; known: {', '.join(REGIMES)}")
    return REGIMES[name]


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes of each kind; `total` adds them."""

    weights: int
    gradients: int
    master_weights: int
    optimizer_states: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.master_weights + self.optimizer_states + self.activations

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def nf4_bytes(numel: int, group_size: int = 64, double_quant: bool = True) -> int:
    """Bytes of one weight matrix in NF4 as lmforge stores it (peft/lora.py): two codes per byte, per group of
    `group_size` an fp32 absmax, or with double quantisation an int8 code plus an fp32 absmax per 256 and a mean."""
    groups = math.ceil(numel / group_size)
    scales = groups + 4 * math.ceil(groups / 256) + 4 if double_quant else 4 * groups
    return groups * group_size // 2 + scales


def lora_params(count: ModelCount, r: int) -> int:
    """LoRA's trainable parameters with rank `r` on every Linear inside the blocks (QLoRA's choice): r·(d_in + d_out)
    per adapted layer."""
    return sum(layer.count * r * (layer.d_in + layer.d_out) for layer in count.linears if layer.in_block)


def _block_values_per_token(cfg: BaseModel, lora_r: int) -> tuple[float, float, int]:
    """(values, dropout-mask bytes, how many blocks) autograd keeps per token per block, summed over the stacks."""
    h = cfg.d_model
    if cfg.arch == "encdec":
        inner, f, gated = cfg.n_head * cfg.head_dim, cfg.d_ff, cfg.gated
        kv = inner
    else:
        inner, f = h, cfg.ff_dim
        gated = cfg.arch == "decoder" and cfg.mlp == "swiglu"
        kv = (cfg.kv_heads if cfg.arch == "decoder" else cfg.n_head) * cfg.head_dim
    # norm input, projection input, q, k, v, attention output (the output projection's input)
    attention = 2 * h + inner + 2 * kv + inner
    mlp = 2 * h + (4 if gated else 2) * f  # norm input, up input; up/act outputs (gated: gate, act(gate), up, product)
    adapted = 4 + (3 if gated else 2)
    cross = 0
    if cfg.arch == "encdec":  # the decoder's cross-attention: norm input, q input, q, output; encoder k, v per token
        cross = 2 * h + 2 * inner + 2 * inner
    layers = cfg.n_layer + (cfg.decoder_layers if cfg.arch == "encdec" else 0)
    cross_layers = cfg.decoder_layers if cfg.arch == "encdec" else 0
    values = layers * (attention + mlp + lora_r * adapted) + cross_layers * (cross + 4 * lora_r)
    masks = (2 * layers + cross_layers) * h if cfg.dropout > 0 else 0  # one byte per residual-branch dropout value
    return values, masks, layers


def activation_bytes(cfg: BaseModel, tokens: int, bytes_per_value: int, checkpointing: bool,
                     lora_r: int = 0) -> int:
    """Bytes autograd keeps for the backward of a batch of `tokens` tokens (estimate; see the module docstring).

    Checkpointing (per block, as lmforge does) keeps each block's input, and at the peak either the head's
    activations (its backward runs first) or one block's, recomputed. The head keeps its inputs, the logits (16-bit
    or fp32) and their fp32 log-softmax."""
    values, masks, layers = _block_values_per_token(cfg, lora_r)
    head = 2 * cfg.d_model * bytes_per_value + cfg.vocab_size * (bytes_per_value + 4)
    blocks = values * bytes_per_value + masks
    if checkpointing:
        return int(tokens * (layers * cfg.d_model * bytes_per_value + max(head, blocks / layers)))
    return int(tokens * (blocks + head))


def training_memory(cfg: BaseModel, count: ModelCount, regime: Regime, tokens: int, method: str = "full",
                    checkpointing: bool = False, lora_r: int = 64, qlora_group_size: int = 64) -> TrainingMemory:
    """The memory of training the model `count` describes with Adam: in full (every parameter trained), or with LoRA
    of rank `lora_r` on every block Linear over a frozen base (16-bit; QLoRA: NF4 with double quantisation for the
    block Linears), for a batch of `tokens` tokens."""
    if method not in METHODS:
        raise ConfigError(f"unknown training method '{method}'; known: {', '.join(METHODS)}")
    activations = activation_bytes(cfg, tokens, regime.activation, checkpointing, lora_r if method != "full" else 0)
    trained = count.params if method == "full" else lora_params(count, lora_r)
    weights = count.params * regime.weights if method != "qlora" else _qlora_base_bytes(count, regime, qlora_group_size)
    if method != "full":
        weights += trained * regime.weights
    return TrainingMemory(weights, trained * regime.gradients, trained * regime.master, trained * regime.adam,
                          activations)


def _qlora_base_bytes(count: ModelCount, regime: Regime, group_size: int) -> int:
    """The frozen base: block Linear weights in NF4, everything else (embeddings, head, norms, biases) 16-bit."""
    quantized = [layer for layer in count.linears if layer.in_block]
    nf4 = sum(layer.count * nf4_bytes(layer.d_in * layer.d_out, group_size) for layer in quantized)
    rest = count.params - sum(layer.count * layer.d_in * layer.d_out for layer in quantized)
    return nf4 + rest * regime.weights


def kv_cache_bytes(cfg: BaseModel, batch: int, context: int, bytes_per_value: int = 2) -> int:
    """Keys and values of every layer for `batch` sequences of `context` tokens (a decoder; an encoder-decoder's
    decoder also keeps the encoder's keys and values for a `context`-token input)."""
    if cfg.arch == "encoder":
        raise ConfigError("an encoder has no KV cache: it reads its whole input at once and does not generate")
    if cfg.arch == "encdec":
        per_token = 2 * cfg.decoder_layers * cfg.n_head * cfg.head_dim * 2  # self-attention + cross-attention
    else:
        per_token = 2 * cfg.n_layer * cfg.kv_heads * cfg.head_dim
    return batch * context * per_token * bytes_per_value
