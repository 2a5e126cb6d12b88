"""Weight-only post-training quantisation: min-max affine int8 (per output channel) and int4 (group-wise).

Scheme (Jacob et al. 2018, eq. 1 and sec. 3): over each quantisation group of a weight (one output row for int8;
`group_size` consecutive input columns of one row for int4), with the range widened to include 0 so the zero point
is a valid code and zero is exact,

    delta = (max - min) / (2^b - 1),   z = round(-min / delta),   q = clamp(round(w / delta) + z, 0, 2^b - 1),
    w ~ (q - z) * delta,               |w - (q - z) * delta| <= delta / 2.

Codes are stored as uint8 (int4: two per byte along the input dimension, low nibble first), one fp32 delta and one
uint8 zero point per group; norms stay fp32, and so does an untied embedding (a lookup reads one row per token).

A head tied to the token embedding (GPT-2 ties them) is one [vocab, d] matrix; with `QuantConfig.tied_embedding` it
is quantised once, as the head's QuantLinear (int8: one group per token row; int4: groups along d), and `tok_emb`
becomes a `QuantEmbedding` whose lookup gathers and dequantises the head's rows for the ids. The codes are stored
once, under `lm_head.*`. Without it the tied pair stays fp32, which on GPT-2 small is ~30% of the weights and the
largest single read of every decode step.

`QuantLinear.forward` has two paths. Decode-sized inputs on CPU (at most `KERNEL_MAX_ROWS` rows) go through
PyTorch's weight-only kernels (private ops, called and checked in infer/cpu_kernels.py), which read the codes without
materialising an fp32 weight; everything else (prefill, CUDA, shapes the kernels refuse, inputs that need gradients,
torch.compile, a torch whose kernels fail the check) dequantises the weight and calls F.linear. On CPU the kernels
beat dequantise + F.linear by a wide margin for a few rows and lose to it for prefill-sized inputs
(benchmarks/decode_speed.py times the decode side).

The kernels run on bf16 activations (the int8 one is much slower on fp32 input), which adds ~2e-3 relative error to
the quantisation error (~4e-3 int8, ~7e-2 int4 at group 64); scales, zero-point terms and bias are applied in fp32.
* int8: with signed codes s = q - o, w = delta * (s + o - z), so y = delta * (x @ s.T + sum(x) * (o - z)) + bias.
  The per-row offset o is the value nearest z that keeps s in int8, so a row of zeros stays exact.
* int4: the kernel's convention w = (q - 8) * scale + offset gives scale = delta, offset = (8 - z) * delta. It needs
  out_features % 16 == 0 and group_size in {32, 64, 128, 256}; a layer of at least `INT4_PAD_MIN_ROWS` outputs
  (a 50257-token head) gets up to 15 zero rows padded onto its kernel copy instead of falling back, whose
  per-step dequantisation would cost many times the fp32 matmul there.
The kernel-side copies are plain attributes (the state dict and file format are unchanged), rebuilt whenever
`weight_q`, `scale` or `zero` change.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError
from torch import Tensor, nn

from lmforge.config import StrictModel
from lmforge.config_loading import validation_summary
from lmforge.errors import ConfigError
from lmforge.infer import cpu_kernels


class QuantConfig(StrictModel):
    """bits 8: per-output-channel; bits 4: groups of `group_size` along the input. `targets`: module-name suffixes
    (e.g. "attn.q", "lm_head"); None means every nn.Linear in the blocks and the head unless tied to the embedding."""

    bits: int = 8
    group_size: int = Field(64, ge=2)
    targets: list[str] | None = None
    # Whether a head tied to the token embedding is quantised (once, for both; see the module docstring). False by
    # default so that a config written before this field existed rebuilds the model it describes: tied pair fp32.
    tied_embedding: bool = False


def quant_config(bits: int = 8, group_size: int = 64, targets: list[str] | None = None,
                 tied_embedding: bool = False) -> QuantConfig:
    """A validated QuantConfig, or a ConfigError naming the bad value."""
    if bits not in (4, 8):
        raise ConfigError(f"quant.bits must be 8 or 4, got {bits}")
    if bits == 4 and (group_size < 2 or group_size % 2):
        raise ConfigError(f"quant.group_size must be an even number >= 2 for int4, got {group_size}")
    try:
        return QuantConfig(bits=bits, group_size=group_size, targets=targets, tied_embedding=tied_embedding)
    except ValidationError as err:
        raise ConfigError(f"invalid quant config: {validation_summary(err, prefix='quant.')}") from None


# ---------------------------------------------------------------------------------------------
# The affine scheme
# ---------------------------------------------------------------------------------------------


def affine_quantize(w: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Quantise each row of `w` [..., n] as one group: (uint8 codes [..., n], fp32 delta [...], uint8 zero [...])."""
    levels = 2**bits - 1
    w = w.detach().float()
    lo, hi = w.amin(dim=-1).clamp(max=0.0), w.amax(dim=-1).clamp(min=0.0)
    delta = (hi - lo) / levels
    delta = torch.where(delta > 0, delta, torch.ones_like(delta))  # an all-zero group: any delta is exact
    zero = torch.round(-lo / delta).clamp(0, levels)
    q = torch.clamp(torch.round(w / delta[..., None]) + zero[..., None], 0, levels)
    return q.to(torch.uint8), delta, zero.to(torch.uint8)


def affine_dequantize(q: Tensor, delta: Tensor, zero: Tensor) -> Tensor:
    """(q - z) * delta, per row, in fp32."""
    return (q.float() - zero.float()[..., None]) * delta[..., None]


def pack_int4(codes: Tensor) -> Tensor:
    """[..., n] codes in [0, 15] (n even) -> [..., n / 2] uint8, element 2i in the low nibble, 2i+1 in the high."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of `pack_int4`: [..., m] uint8 -> [..., 2m] codes."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------

KERNEL_MAX_ROWS = 16  # at most this many input rows take the weight-only CPU kernels (see the module docstring)
# int4 layers with out_features % 16 != 0 and at least this many outputs take the kernel on a copy padded to a
# multiple of 16 (at most 15 / 256 ~ 6% extra rows); smaller ones fall back, which is cheap at that size.
INT4_PAD_MIN_ROWS = 256
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _tensor_key(t: Tensor) -> tuple[int, int]:
    """Identity and in-place-modification count of a buffer. Inference tensors keep no version counter; a buffer
    created under torch.inference_mode is keyed on its storage alone."""
    return t.data_ptr(), (-1 if t.is_inference() else t._version)


class QuantLinear(nn.Module):
    """An inference-only Linear holding int8 / packed int4 codes, per-group delta and zero point, fp32 bias.

    Buffers: `weight_q` (int8: [out, in] uint8; int4: [out, in / 2] packed), `scale` and `zero` ([out] for int8,
    [out, in / group_size] for int4)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int):
        super().__init__()
        if bits == 4 and in_features % group_size:
            raise ConfigError(f"quant.group_size {group_size} does not divide the input dimension {in_features}; "
                              "choose a divisor of it")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        groups = (out_features,) if bits == 8 else (out_features, in_features // group_size)
        code_cols = in_features if bits == 8 else in_features // 2
        self.register_buffer("weight_q", torch.zeros(out_features, code_cols, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(groups))
        self.register_buffer("zero", torch.zeros(groups, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._kernel_fits = self._kernel_fits_shape()  # fixed at construction, so not re-checked every forward
        self._kernel_key: tuple | None = None  # plain attributes, not buffers: kept out of the state dict
        self._kernel_args: tuple[Tensor, ...] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int) -> QuantLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size)
        w = linear.weight.detach()
        if bits == 8:
            q, delta, zero = affine_quantize(w, 8)
        else:
            q, delta, zero = affine_quantize(w.reshape(w.shape[0], -1, group_size), 4)
            q = pack_int4(q.flatten(1))
        layer.weight_q.copy_(q)
        layer.scale.copy_(delta)
        layer.zero.copy_(zero)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer.to(w.device)

    def dequantized_weight(self) -> Tensor:
        """The fp32 weight [out, in] the codes stand for."""
        if self.bits == 8:
            return affine_dequantize(self.weight_q, self.scale, self.zero)
        codes = unpack_int4(self.weight_q).view(self.out_features, -1, self.group_size)
        return affine_dequantize(codes, self.scale, self.zero).flatten(1)

    def _kernel_fits_shape(self) -> bool:
        if self.bits == 8:
            return True
        return ((self.out_features % 16 == 0 or self.out_features >= INT4_PAD_MIN_ROWS)
                and self.group_size in cpu_kernels.INT4_GROUP_SIZES and self.in_features % self.group_size == 0)

    def kernel_supported(self) -> bool:
        """Whether this layer's shape and format fit the weight-only CPU kernel and this torch's kernel passed its
        check (infer/cpu_kernels.py); the input decides the rest."""
        return self._kernel_fits and self.weight_q.device.type == "cpu" and cpu_kernels.usable(self.bits)

    def _use_kernel(self, x: Tensor) -> bool:
        return (not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES
                and 0 < x.numel() <= KERNEL_MAX_ROWS * x.shape[-1] and not (x.requires_grad and torch.is_grad_enabled())
                and self.kernel_supported())

    def _kernel_state(self) -> tuple[Tensor, ...]:
        """The kernel's inputs derived from the buffers, built on first use and rebuilt whenever they change."""
        key = tuple(_tensor_key(t) for t in (self.weight_q, self.scale, self.zero))
        if key != self._kernel_key:
            with torch.no_grad():
                if self.bits == 8:
                    # s = q - o per row, o as close to z as keeps s in int8 (128 for a row using all 256 codes)
                    q = self.weight_q.to(torch.int16)
                    o = torch.minimum(torch.maximum(self.zero.to(torch.int16), q.amax(1) - 127), q.amin(1) + 128)
                    signed = (q - o[:, None]).to(torch.int8).contiguous()
                    ones = torch.ones(self.out_features, dtype=torch.bfloat16)
                    delta = self.scale.float()
                    args = (signed, ones, delta, (o - self.zero.to(torch.int16)).float() * delta)
                else:
                    codes = unpack_int4(self.weight_q).to(torch.int32)  # [out, in] in 0..15
                    offset = (8.0 - self.zero.float()) * self.scale  # w = (q - 8) * delta + (8 - z) * delta
                    sz = torch.stack([self.scale.float(), offset], dim=-1)  # [out, in / g, 2]
                    pad = -self.out_features % 16  # rows of zero scale and offset: their outputs are 0, cut off
                    codes, sz = F.pad(codes, (0, 0, 0, pad), value=8), F.pad(sz, (0, 0, 0, 0, 0, pad))
                    packed = cpu_kernels.int4_pack(codes.contiguous())
                    sz = sz.transpose(0, 1)  # [in / g, out (+ pad), 2]
                    args = (packed, sz.to(torch.bfloat16).contiguous())
            self._kernel_args, self._kernel_key = args, key
        return self._kernel_args

    def _kernel_forward(self, x: Tensor) -> Tensor:
        xb = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        bias = None if self.bias is None else self.bias.float()
        if self.bits == 8:  # y = delta * (x @ (q - o).T) + (o - z) * delta * sum(x) + bias, in fp32
            signed, ones, delta, zero_term = self._kernel_state()
            acc = cpu_kernels.int8_mm(xb, signed, ones)
            y = torch.mul(acc, delta) if bias is None else torch.addcmul(bias, acc, delta)
            y.addcmul_(xb.sum(-1, keepdim=True, dtype=torch.float32), zero_term)
        else:
            packed, sz = self._kernel_state()
            y = cpu_kernels.int4_mm(xb, packed, self.group_size, sz)[:, :self.out_features]
            y = y.float() if bias is None else y + bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        if self._use_kernel(x):
            return self._kernel_forward(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


class QuantEmbedding(nn.Module):
    """The token embedding of a tied pair whose head is a QuantLinear: `forward(ids)` gathers the head's code rows
    (and their scale / zero rows) for the ids and dequantises just those, in fp32. It equals
    `head.dequantized_weight()[ids]` exactly (the same element-wise ops on the same values).

    It owns no tensors. The head is held as a plain attribute, deliberately not as a submodule and its tensors not
    as buffers: either would put the codes into the state dict a second time (`tok_emb.*` next to `lm_head.*`),
    `_unique_state_dict` would then store the shared tensors under the first name (`tok_emb`, which comes first), and
    a submodule would also make `named_modules()` report the head under `tok_emb.` instead of `lm_head`. The state
    dict, `parameters()`/`buffers()` and `.to()` see the head once, through the model's `lm_head`; the embedding
    reads its buffers at call time, so a load_state_dict, device move or in-place edit of the head is seen here.
    Rebinding `model.lm_head` does not retie it (`dequantize_model` rebuilds both)."""

    def __init__(self, head: QuantLinear):
        super().__init__()
        object.__setattr__(self, "_head", head)  # bypasses nn.Module.__setattr__, which would register a submodule
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    @property
    def head(self) -> QuantLinear:
        return self._head

    @property
    def dtype(self) -> torch.dtype:
        """The dtype `forward` returns (fp32 unless the scales were cast wider)."""
        return torch.promote_types(torch.float32, self._head.scale.dtype)

    def forward(self, ids: Tensor) -> Tensor:
        h = self._head
        flat = ids.reshape(-1)
        q, delta, zero = (t.index_select(0, flat) for t in (h.weight_q, h.scale, h.zero))
        if h.bits == 8:
            rows = affine_dequantize(q, delta, zero)
        else:
            rows = affine_dequantize(unpack_int4(q).view(flat.numel(), -1, h.group_size), delta, zero).flatten(1)
        return rows.view(*ids.shape, h.in_features)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self._head.bits}: rows of the tied head's codes, "
                "stored once under the head")


# ---------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------


def _state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state, each shared (tied) tensor counted once. A QuantEmbedding holds no state of its
    own, so a quantised tied pair's codes are counted once, under the head."""
    seen: dict[int, int] = {}
    for t in model.state_dict().values():
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def _tied_heads(model: nn.Module) -> list[str]:
    """Names of the Linears whose weight is the token embedding's (GPT-2's head)."""
    emb = getattr(getattr(model, "tok_emb", None), "weight", None)
    if not isinstance(emb, Tensor):
        return []
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight is emb]


def _targets(model: nn.Module, cfg: QuantConfig) -> list[str]:
    """Names of the Linear modules `cfg` selects. A head tied to the embedding is one only with
    `cfg.tied_embedding` (quantising it quantises the embedding too); it is never quantised apart from it."""
    tied = _tied_heads(model)
    if tied and cfg.tied_embedding and (len(tied) > 1 or not isinstance(model.tok_emb, nn.Embedding)):
        raise ConfigError(f"quant.tied_embedding: expected one head tied to an nn.Embedding tok_emb, found {tied}")
    linears = [n for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and (cfg.tied_embedding or n not in tied)]
    if cfg.targets is None:
        return [n for n in linears if n.startswith("blocks.") or n == "lm_head"]
    chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in cfg.targets)]
    if not chosen:
        raise ConfigError(f"quant.targets {cfg.targets} match no nn.Linear; candidates look like {linears[:4]}")
    return chosen


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _swap_in(model: nn.Module, names: list[str], build) -> bool:
    """Replace each named Linear by `build(linear)`; a tied head's embedding becomes a QuantEmbedding reading the
    new head. The one structure both quantisation and checkpoint loading build. Returns whether a tied pair was."""
    tied = [n for n in _tied_heads(model) if n in names]
    for name in names:
        _swap(model, name, build(model.get_submodule(name)))
    if tied:
        model.tok_emb = QuantEmbedding(model.get_submodule(tied[0]))
    return bool(tied)


def quantize_model(model: nn.Module, cfg: QuantConfig) -> dict[str, Any]:
    """Replace the targeted Linears by QuantLinears in place (and, with `cfg.tied_embedding`, a tied embedding by a
    QuantEmbedding reading the quantised head). Returns {bits, group_size, modules, tied_embedding (whether a tied
    pair was quantised), bytes_before, bytes_after} (bytes of the whole state, tied tensors once)."""
    cfg = quant_config(cfg.bits, cfg.group_size, cfg.targets, cfg.tied_embedding)
    before = _state_bytes(model)
    names = _targets(model, cfg)
    for name in names:  # every shape checked before any module is swapped
        if cfg.bits == 4 and model.get_submodule(name).in_features % cfg.group_size:
            raise ConfigError(f"quant.group_size {cfg.group_size} does not divide the input dimension "
                              f"{model.get_submodule(name).in_features} of {name}; choose a divisor of it")
    tied = _swap_in(model, names, lambda lin: QuantLinear.from_linear(lin, cfg.bits, cfg.group_size))
    return {"bits": cfg.bits, "group_size": cfg.group_size if cfg.bits == 4 else None, "modules": names,
            "tied_embedding": tied, "bytes_before": before, "bytes_after": _state_bytes(model)}


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every QuantLinear by an fp32 nn.Linear holding its dequantised weight, in place; a QuantEmbedding
    becomes an nn.Embedding tied to its head's new Linear again."""
    linears: dict[int, nn.Linear] = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight_q.device)
            with torch.no_grad():
                linear.weight.copy_(m.dequantized_weight())
                if m.bias is not None:
                    linear.bias.copy_(m.bias)
            linears[id(m)] = linear
            _swap(model, name, linear)
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantEmbedding):
            head = linears.get(id(m.head))
            weight = head.weight if head is not None else nn.Parameter(m.head.dequantized_weight())
            emb = nn.Embedding(m.num_embeddings, m.embedding_dim, _weight=weight.detach())
            emb.weight = weight  # the same Parameter as the head's: tied again
            _swap(model, name, emb)
    return model


def apply_quant_from_config(model: nn.Module, q: QuantConfig) -> None:
    """Rebuild empty QuantLinear shells (and a tied pair's QuantEmbedding) for a checkpoint's `quant:` section, so
    its codes can then be loaded. A section without `tied_embedding` (written before it existed) leaves the tied
    pair fp32, as it was quantised."""
    cfg = quant_config(q.bits, q.group_size, q.targets, q.tied_embedding)

    def shell(lin: nn.Linear) -> QuantLinear:
        layer = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, cfg.bits, cfg.group_size)
        return layer.to(lin.weight.device)

    _swap_in(model, _targets(model, cfg), shell)
