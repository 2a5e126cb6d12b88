"""Low-rank adapters on a frozen model: LoRA, DoRA, PiSSA and QLoRA, with Hugging Face peft export.

LoRA (Hu et al. 2021, eq. 3): y = W0 x + b + s * B A dropout(x), s = alpha / r; A is kaiming-uniform (as peft
and loralib), B = 0, so training starts exactly at the base model. Several named adapters may sit on one base;
`set_active` picks which contribute and with what weight: y = base(x) + sum_i w_i * delta_i(x).

A LoRA-family `PeftConfig` (method lora, dora, pissa or qlora) describes an adapter: rank r, alpha (scaling
s = alpha / r), dropout on the adapter's input, target patterns, and QLoRA's NF4 block size and double quant.
Target patterns (`PeftConfig.targets`) select Linear layers by their module names. A pattern selects a layer when
the layer's name, or the name of a module containing it, equals the pattern, ends with "." + pattern, or matches
it as an fnmatch wildcard: "attn.q" is every block's query projection, "mlp" is every mlp.up/gate/down, "attn"
all four attention projections, "blocks.0.*" every Linear of the first block.

Export (`lmforge.peft.export.export_peft`) writes the adapter in peft's format and, in its `base/` subdir,
the HF model (`export_hf`) it applies to (a separate dir: transformers would load an adapter_config.json
found beside the weights). GPT-2 fuses q/k/v into one `c_attn` (GPT-NeoX into `query_key_value`, its rows
interleaved per head): the three LoRAs become one exact LoRA of rank 3r on it, A stacked and B block-diagonal
(B's rows interleaved as the weight's are) (a missing part gets a zero block, and under DoRA the
magnitude ||W0||_c that leaves it unchanged). PiSSA exports as peft converts it on save
(`path_initial_model_for_weight_conversion`): a rank-2r LoRA [A | A0], [B | -B0] on the original base
W_res + s B0 A0. QLoRA exports as LoRA on the dequantised NF4 base it was trained against (so the pair
reproduces the model; on the unquantised checkpoint it differs by the NF4 error).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import LORA_METHODS, PeftConfig
from lmforge.errors import ConfigError
from lmforge.peft.nf4 import dequantize_scales, nf4_dequantize, nf4_quantize, quantize_scales
from lmforge.peft.select import matches

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"
PEFT_WEIGHTS, PEFT_CONFIG, BASE_DIR = "adapter_model.safetensors", "adapter_config.json", "base"
ADAPTER_KINDS = ("lora_A", "lora_B", "lora_magnitude", "pissa_A0", "pissa_B0")


# The fields of PeftConfig the LoRA family reads: what an adapter file records and what two adapters must share to be
# the same adapter (the other methods' fields do not change a LoRA layer).
LORA_FIELDS = frozenset({"method", "r", "alpha", "dropout", "targets", "qlora_group_size", "qlora_double_quant"})


def lora_fields(cfg: PeftConfig) -> dict:
    """The LoRA family's part of `cfg`, as JSON values."""
    return cfg.model_dump(mode="json", include=LORA_FIELDS)


# ---------------------------------------------------------------------------------------------
# The adapted layer
# ---------------------------------------------------------------------------------------------


def adapter_kinds(cfg: PeftConfig) -> tuple[str, ...]:
    """The tensors an adapter of `cfg.method` holds (a subset of ADAPTER_KINDS)."""
    extra = {"dora": ("lora_magnitude",), "pissa": ("pissa_A0", "pissa_B0")}.get(cfg.method, ())
    return ("lora_A", "lora_B", *extra)


class RowGroups(NamedTuple):
    """Adapters chosen per batch row, in place of `LoRALinear.active`: each adapter's rows (None: every row)."""

    batch_size: int
    rows: dict[str, Tensor | None]


def _row_norm(weight: Tensor, delta: Tensor) -> Tensor:
    """DoRA's ||W0 + s B A||_c (Liu et al. 2024, eq. 5): one norm per output feature, over the input dimension,
    as peft computes it (its `get_weight_norm`, dim=1 of the [out, in] weight)."""
    return torch.linalg.norm(weight + delta, dim=1)


class LoRALinear(nn.Module):
    """A frozen base Linear (fp, or NF4 codes for QLoRA) with named low-rank adapters on top."""

    def __init__(self, base: nn.Linear, quantize: bool = False, group_size: int = 64, double_quant: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.quantized, self.double_quant = quantize, quantize and double_quant
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        if quantize:
            packed, scales, _ = nf4_quantize(base.weight, group_size)
            self.register_buffer("weight_nf4", packed)
            if double_quant:
                for key, t in zip(("scale_codes", "scale_absmax", "scale_mean"), quantize_scales(scales), strict=True):
                    self.register_buffer(key, t)
            else:
                self.register_buffer("weight_scales", scales)
        else:
            self.weight = nn.Parameter(base.weight.detach().contiguous(), requires_grad=False)  # see add_adapter
        for kind in ADAPTER_KINDS:
            setattr(self, kind, nn.ParameterDict())
        self.cfgs: dict[str, PeftConfig] = {}
        self.active: list[tuple[str, float]] = []
        self.row_groups: RowGroups | None = None  # set by `lmforge.peft.row_adapters.row_adapters`
        self.unmerged_weight: Tensor | None = None  # W0 while merged, restored bit-for-bit by unmerge

    def extra_repr(self) -> str:
        adapters = {n: c.method for n, c in self.cfgs.items()}
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4={self.quantized}, "
                f"adapters={adapters}, active={self.active}")

    def base_weight(self) -> Tensor:
        """The frozen base weight [out, in] this layer computes with (NF4 dequantised on the fly for QLoRA)."""
        if not self.quantized:
            return self.weight
        scales = (dequantize_scales(self.scale_codes, self.scale_absmax, self.scale_mean) if self.double_quant
                  else self.weight_scales)
        return nf4_dequantize(self.weight_nf4, scales, (self.out_features, self.in_features))

    def original_weight(self) -> Tensor:
        """The weight without any adapter: the base, plus the principal part a PiSSA adapter took out of it."""
        weight = self.unmerged_weight if self.unmerged_weight is not None else self.base_weight()
        for name in self.pissa_A0:
            weight = weight + (self.cfgs[name].scaling * self.pissa_B0[name]) @ self.pissa_A0[name]
        return weight.detach()

    @property
    def base_nbytes(self) -> int:
        """Bytes the frozen base weight occupies (codes + scales for QLoRA)."""
        names = [n for n, _ in self.named_buffers(recurse=False)] if self.quantized else ["weight"]
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in names)

    def check_adapter(self, name: str, cfg: PeftConfig) -> None:
        check_adapter_name(name)
        if name in self.cfgs:
            raise ConfigError(f"adapter '{name}' already exists on this layer")
        if self.unmerged_weight is not None:
            raise ConfigError("unmerge the layer before adding an adapter")
        if cfg.method == "qlora" and not self.quantized:
            raise ConfigError("method 'qlora' needs an NF4 base, but this layer was wrapped unquantised")
        if cfg.method == "pissa" and (self.quantized or self.cfgs):
            raise ConfigError("PiSSA replaces the base weight by its residual, so it must be the only adapter on "
                              "an unquantised layer")
        if any(c.method == "pissa" for c in self.cfgs.values()):
            raise ConfigError("this layer holds a PiSSA adapter (its base is a residual): no other adapter fits")

    @torch.no_grad()
    def add_adapter(self, name: str, cfg: PeftConfig, weights: dict[str, Tensor] | None = None) -> None:
        """Add adapter `name` initialised per `cfg.method`, or from `weights` (kind -> tensor, e.g. a saved file).

        Every tensor is stored contiguous (row-major), as a saved file gives it back, so a model and its reloaded
        copy multiply with the same kernels (a GEMM's accumulation order depends on its operands' layouts)."""
        self.check_adapter(name, cfg)
        weight = self.base_weight().detach()
        if weights is None:
            tensors = self._initial_tensors(cfg, weight)
        else:
            tensors = {kind: weights[kind].to(weight) for kind in adapter_kinds(cfg)}
        for kind, value in tensors.items():
            value = value.clone(memory_format=torch.contiguous_format)
            getattr(self, kind)[name] = nn.Parameter(value, requires_grad=not kind.startswith("pissa"))
        self.cfgs[name] = cfg
        if cfg.method == "pissa":
            self.weight.data = weight - (cfg.scaling * self.pissa_B0[name]) @ self.pissa_A0[name]

    def _initial_tensors(self, cfg: PeftConfig, weight: Tensor) -> dict[str, Tensor]:
        """A new adapter's tensors. LoRA: A kaiming-uniform, B = 0. PiSSA (Meng et al. 2024): B = U_r sqrt(S_r / s),
        A = sqrt(S_r / s) V_r^T so s B A is W0's top-r part (frozen copies A0, B0 make the base the residual
        W0 - s B0 A0). DoRA's magnitude starts at ||W0 + s B A||_c."""
        r, s = cfg.r, cfg.scaling
        if cfg.method == "pissa":
            U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)  # U, Vh come column-major
            root = (S[:r] / s).sqrt()
            A, B = (root[:, None] * Vh[:r]).to(weight.dtype), (U[:, :r] * root).to(weight.dtype)
            return {"lora_A": A, "lora_B": B, "pissa_A0": A, "pissa_B0": B}
        A = nn.init.kaiming_uniform_(weight.new_empty(r, self.in_features), a=math.sqrt(5))
        B = weight.new_zeros(self.out_features, r)
        if cfg.method == "dora":
            return {"lora_A": A, "lora_B": B, "lora_magnitude": _row_norm(weight, s * B @ A)}
        return {"lora_A": A, "lora_B": B}

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [getattr(self, k)[name] for k in ("lora_A", "lora_B", "lora_magnitude") if name in getattr(self, k)]

    def set_active(self, names: list[str], weights: list[float] | None = None) -> None:
        """Adapters that contribute to forward, each scaled by its weight (default 1): hot-swap and mixing."""
        if self.unmerged_weight is not None:
            raise ConfigError("unmerge the layer before changing its active adapters")
        unknown = [n for n in names if n not in self.cfgs]
        if unknown:
            raise ConfigError(f"unknown adapter(s) {unknown}; this layer has {sorted(self.cfgs)}")
        weights = [1.0] * len(names) if weights is None else weights
        if len(weights) != len(names):
            raise ConfigError(f"{len(names)} adapters but {len(weights)} weights")
        self.active = list(zip(names, weights, strict=True))

    def _scale(self, name: str, weight: Tensor) -> Tensor:
        """DoRA's m / ||W0 + s B A||_c, the norm detached from the graph (Liu et al. 2024 sec. 4.3, as peft)."""
        cfg = self.cfgs[name]
        with torch.no_grad():
            norm = _row_norm(weight, cfg.scaling * self.lora_B[name] @ self.lora_A[name])
        return self.lora_magnitude[name] / norm

    def delta_weight(self, name: str, weight: Tensor) -> Tensor:
        """What adapter `name` adds to the weight: s B A, or for DoRA (g - 1) W0 + g s B A with g = m / norm."""
        lora = self.cfgs[name].scaling * self.lora_B[name] @ self.lora_A[name]
        if name not in self.lora_magnitude:
            return lora
        g = self._scale(name, weight)[:, None]
        return (g - 1) * weight + g * lora

    def adapter_output(self, name: str, x: Tensor, weight: Tensor, base: Tensor | None) -> Tensor:
        """What adapter `name` adds to the output for inputs `x`: s B A dropout(x), or peft's DoRA forward
        (g - 1) W0 x + g s B A x, which reuses `base` = W0 x + bias when given."""
        cfg = self.cfgs[name]
        xd = F.dropout(x, cfg.dropout, self.training) if cfg.dropout > 0 else x
        delta = cfg.scaling * F.linear(F.linear(xd, self.lora_A[name]), self.lora_B[name])
        if name not in self.lora_magnitude:
            return delta
        if xd is not x or base is None:
            plain = F.linear(xd, weight)
        else:
            plain = base if self.bias is None else base - self.bias
        g = self._scale(name, weight)
        return (g - 1) * plain + g * delta

    def forward(self, x: Tensor) -> Tensor:
        weight = self.base_weight()
        base = F.linear(x, weight, self.bias)
        if self.unmerged_weight is not None:
            return base
        if self.row_groups is not None:  # one gather and one scatter-add per adapter (row groups are disjoint)
            if x.shape[0] != self.row_groups.batch_size:
                raise ValueError(f"adapters were chosen for {self.row_groups.batch_size} rows, but the batch has "
                                 f"{x.shape[0]}")
            out = base
            for name, rows in self.row_groups.rows.items():
                if rows is None:
                    out = out + self.adapter_output(name, x, weight, base)
                else:
                    part = base.index_select(0, rows) if name in self.lora_magnitude else None
                    out = out.index_add_(0, rows, self.adapter_output(name, x.index_select(0, rows), weight, part))
            return out
        out = base
        for name, w in self.active:
            out = out + w * self.adapter_output(name, x, weight, base)
        return out

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """Base weight with every active adapter folded in, fp32 for a QLoRA base."""
        weight = self.base_weight().detach()
        merged = weight.clone()
        for name, w in self.active:
            merged += w * self.delta_weight(name, weight)
        return merged

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapters into the base weight; forward is then one plain matmul."""
        if self.quantized:
            raise ConfigError("a QLoRA layer cannot fold adapters into its NF4 codes; merge_lora dequantises it")
        if self.unmerged_weight is None:
            merged = self.merged_weight()
            self.unmerged_weight, self.weight.data = self.weight.data, merged

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.unmerged_weight is not None:
            self.weight.data, self.unmerged_weight = self.unmerged_weight, None


# ---------------------------------------------------------------------------------------------
# Model surgery
# ---------------------------------------------------------------------------------------------


def check_adapter_name(name: str) -> None:
    if not name.isidentifier():
        raise ConfigError(f"adapter name {name!r} must be a Python identifier (letters, digits, underscores)")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _select(model: nn.Module, cfg: PeftConfig) -> dict[str, nn.Linear | LoRALinear]:
    """The Linear (or already adapted) layers `cfg.targets` select, in model order, checked for `cfg`."""
    if cfg.method not in LORA_METHODS:
        raise ConfigError(f"LoRA layers take a method of the LoRA family ({', '.join(LORA_METHODS)}), not "
                          f"'{cfg.method}'; apply other methods with lmforge.peft.config.apply_peft")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear | LoRALinear)}
    chosen = {n: m for n, m in layers.items() if any(matches(n, p) for p in cfg.targets)}
    for pattern in cfg.targets:
        if not any(matches(n, pattern) for n in layers):
            existing = sorted({re.sub(r"\.\d+\.", ".*.", n) for n in layers})
            raise ConfigError(f"LoRA target '{pattern}' matches no Linear layer; the model's Linear layers are: "
                              f"{', '.join(existing)}")
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for name, m in chosen.items():
        if cfg.r > min(m.in_features, m.out_features):
            raise ConfigError(f"LoRA rank r={cfg.r} exceeds min(d_in, d_out) = min({m.in_features}, "
                              f"{m.out_features}) of layer '{name}'")
        if isinstance(m, nn.Linear) and counts[id(m.weight)] > 1:
            raise ConfigError(f"layer '{name}' shares its weight with another (tied embeddings); an adapter would "
                              "change both, so leave it out of targets")
    return chosen


def checked_layers(model: nn.Module, cfg: PeftConfig, adapter_name: str) -> dict[str, nn.Linear | LoRALinear]:
    """The layers `cfg` selects (`_select`), each checked to take adapter `adapter_name`."""
    check_adapter_name(adapter_name)
    chosen = _select(model, cfg)
    for m in chosen.values():
        if isinstance(m, LoRALinear):
            m.check_adapter(adapter_name, cfg)
    return chosen


def adapter_shapes(name: str, m: nn.Linear | LoRALinear, cfg: PeftConfig) -> dict[str, tuple[int, ...]]:
    shapes = {"lora_A": (cfg.r, m.in_features), "lora_B": (m.out_features, cfg.r), "lora_magnitude": (m.out_features,),
              "pissa_A0": (cfg.r, m.in_features), "pissa_B0": (m.out_features, cfg.r)}
    return {f"{name}.{kind}": shapes[kind] for kind in adapter_kinds(cfg)}


def tensors_by_layer(chosen: dict[str, nn.Linear | LoRALinear], cfg: PeftConfig,
              tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """`<layer>.<kind>` tensors grouped per layer, as `add_lora` takes them."""
    return {name: {key.rsplit(".", 1)[1]: tensors[key] for key in adapter_shapes(name, m, cfg)}
            for name, m in chosen.items()}


def add_lora(model: nn.Module, cfg: PeftConfig, adapter_name: str,
             weights: dict[str, dict[str, Tensor]] | None) -> list[str]:
    """`apply_lora` with the adapter's tensors per layer (`read_adapter`), or initialised per `cfg` for None."""
    chosen = checked_layers(model, cfg, adapter_name)
    model.requires_grad_(False)
    for name, m in chosen.items():
        layer = m if isinstance(m, LoRALinear) else LoRALinear(m, cfg.method == "qlora", cfg.qlora_group_size,
                                                               cfg.qlora_double_quant)
        layer.add_adapter(adapter_name, cfg, None if weights is None else weights[name])
        layer.set_active([adapter_name])
        for p in layer.adapter_parameters(adapter_name):
            p.requires_grad_(True)
        if layer is not m:
            model.set_submodule(name, layer)
    return list(chosen)


def apply_lora(model: nn.Module, cfg: PeftConfig, adapter_name: str = "default", initialise: bool = True) -> list[str]:
    """Add adapter `adapter_name` to every layer `cfg.targets` selects (wrapping plain Linears), make it the only
    active one there, and freeze every parameter but its own. Returns the adapted layer names. `initialise=False`
    gives every adapter tensor zeros instead, for a checkpoint's state dict to fill (no SVD computed for nothing)."""
    if initialise:
        return add_lora(model, cfg, adapter_name, None)
    chosen = _select(model, cfg)
    zeros = {k: torch.zeros(shape) for name, m in chosen.items() for k, shape in adapter_shapes(name, m, cfg).items()}
    return add_lora(model, cfg, adapter_name, tensors_by_layer(chosen, cfg, zeros))


def set_adapter(model: nn.Module, names: list[str], weights: list[float] | None = None) -> None:
    """Activate `names` (with `weights`) on every LoRA layer that has them all; others get no adapter."""
    for layer in lora_layers(model).values():
        present = all(n in layer.cfgs for n in names)
        layer.set_active(names if present else [], weights if present else None)


def trainable_summary(model: nn.Module) -> tuple[int, int, float]:
    """(trainable parameters, total parameters, percent trainable); NF4 base weights count as parameters, and so
    do PiSSA's frozen copies of its initial A0, B0."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    total += sum(m.in_features * m.out_features for m in lora_layers(model).values() if m.quantized)
    return trainable, total, 100.0 * trainable / max(total, 1)


def base_nbytes(model: nn.Module) -> int:
    """Bytes of the frozen base weights under LoRA layers (NF4 codes + scales for QLoRA)."""
    return sum(m.base_nbytes for m in lora_layers(model).values())


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by a plain Linear holding its merged weight (active adapters, weighted; a QLoRA
    base is dequantised to fp32). The result is an ordinary model: every parameter is trainable again."""
    layers = lora_layers(model)
    if not layers:
        raise ConfigError("the model has no LoRA layers to merge")
    for name, layer in layers.items():
        weight = layer.weight.detach() if layer.unmerged_weight is not None else layer.merged_weight()
        linear = nn.utils.skip_init(nn.Linear, layer.in_features, layer.out_features, bias=layer.bias is not None,
                                    device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
        model.set_submodule(name, linear)
    return model.requires_grad_(True)
