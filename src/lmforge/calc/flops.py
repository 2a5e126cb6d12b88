"""Parameters and FLOPs of a model config, exactly, without weights or compute; and the linear layer of seed 000.

The model is built on the meta device (shapes, no memory) with one block per stack, and run forward and backward
under torch's FLOP counter (`torch.utils.flop_counter.FlopCounterMode`), which counts every matrix multiply of the
real forward: the projections, attention's scores and weighted values (dense T x T, causal or not), the head. Every
block of a stack is the same, so a block's figures times the stack's depth are the model's: a 175B model counts in
a fraction of a second. Norms, activations and softmax are not matrix multiplies and are not counted (a few percent
of the total, as 6ND leaves them out too).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass

import torch
from pydantic import BaseModel
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from lmforge.errors import ConfigError


@dataclass(frozen=True)
class LinearFigures:
    """Seed 000's linear layer X [N, D_in] -> X W, W [D_in, D_out] (no bias), trained with Adam in fp32."""

    n: int
    d_in: int
    d_out: int

    @property
    def params(self) -> int:
        return self.d_in * self.d_out

    @property
    def forward_flops(self) -> int:
        return 2 * self.n * self.params  # one multiply and one add per weight per row

    @property
    def backward_flops(self) -> int:
        return 4 * self.n * self.params  # 2 for the gradient of W, 2 for the gradient of X

    @property
    def total_flops(self) -> int:
        return 6 * self.n * self.params  # 6 x tokens x parameters

    @property
    def activations(self) -> int:
        return self.n * self.d_out

    @property
    def memory_bytes(self) -> int:
        """fp32: 4 bytes x (weights + gradients + Adam's two moments, 4 x params, + activations)."""
        return 4 * (4 * self.params + self.activations)

    def as_dict(self) -> dict[str, int]:
        return {"n": self.n, "d_in": self.d_in, "d_out": self.d_out, "params": self.params,
                "forward_flops": self.forward_flops, "backward_flops": self.backward_flops,
                "total_flops": self.total_flops, "activations": self.activations, "gradients": self.params,
                "optimizer_states": 2 * self.params, "memory_bytes_fp32": self.memory_bytes}


@dataclass(frozen=True)
class LayerRow:
    """One module of the model (one of `count` identical ones): its parameters and forward FLOPs per sequence."""

    name: str  # e.g. "blocks.*.attn.q"; "blocks.*.attn [bmm]" for a module's own multiplies beside its children's
    count: int
    params: int
    forward_flops: int


@dataclass(frozen=True)
class LinearLayer:
    name: str
    d_in: int
    d_out: int
    count: int
    in_block: bool  # inside a Transformer block (where LoRA / QLoRA adapt)


@dataclass(frozen=True)
class ModelCount:
    """A config's parameters and FLOPs for sequences of `seq_len` tokens (forward, backward: counted)."""

    params: int
    seq_len: int
    rows: list[LayerRow]
    linears: list[LinearLayer]
    forward_flops: int  # per sequence
    backward_flops: int  # per sequence

    @property
    def training_flops_per_token(self) -> float:
        return (self.forward_flops + self.backward_flops) / self.seq_len


def _depths(cfg: BaseModel) -> dict[str, tuple[str, int]]:
    """Each stack's depth field -> (its first block's module name, the depth)."""
    if cfg.arch == "encdec":
        return {"n_layer": ("encoder.blocks.0", cfg.n_layer),
                "n_decoder_layer": ("decoder.blocks.0", cfg.decoder_layers)}
    return {"n_layer": ("blocks.0", cfg.n_layer)}


def _meta_model(cfg: BaseModel, depths: dict[str, int]) -> nn.Module:
    from lmforge.model import build_model

    with torch.device("meta"):
        return build_model(cfg.model_copy(update=depths))


def _stack_of(name: str, blocks: dict[str, int]) -> str | None:
    return next((block for block in blocks if name == block or name.startswith(block + ".")), None)


def _display(name: str, blocks: dict[str, int]) -> str:
    block = _stack_of(name, blocks)
    return name if block is None else block[:-2] + ".*" + name[len(block):]


class _FlopsByModule(TorchDispatchMode):
    """Matmul FLOPs (torch's FLOP formulas) by the innermost module running when each op runs ("" outside any)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.running = [""]
        self.flops: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.hooks = [h for name, m in model.named_modules() if name for h in (
            m.register_forward_pre_hook(functools.partial(self._enter, name)), m.register_forward_hook(self._leave))]

    def _enter(self, name: str, *_) -> None:
        self.running.append(name)

    def _leave(self, *_) -> None:
        self.running.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops[self.running[-1]][func._overloadpacket.__name__] += formula(*args, **kwargs, out_val=out)
        return out

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()
        return super().__exit__(*exc)


def _run(model: nn.Module, cfg: BaseModel, seq_len: int, backward: bool = False) -> None:
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    out = model(ids, ids) if cfg.arch == "encdec" else model(ids)
    if backward:
        out.sum().backward()


def _training_flops(cfg: BaseModel, seq_len: int) -> int:
    """Forward + backward FLOPs of one sequence through the whole model: each block of a stack adds the same, so
    the model is counted with one block per stack, then with a second block in each stack in turn."""
    def total(depths: dict[str, int]) -> int:
        model = _meta_model(cfg, depths)
        counter = FlopCounterMode(display=False)
        with counter:
            _run(model, cfg, seq_len, backward=True)
        return counter.get_total_flops()

    stacks = _depths(cfg)
    ones = dict.fromkeys(stacks, 1)
    base = total(ones)
    return base + sum((total({**ones, key: 2}) - base) * (depth - 1) for key, (_, depth) in stacks.items())


def count_model(cfg: BaseModel, seq_len: int | None = None) -> ModelCount:
    """Parameters and exact matmul FLOPs of the model `cfg` describes (decoder, encoder or encoder-decoder), for
    one sequence of `seq_len` tokens (default: its context; an encoder-decoder reads and writes that many)."""
    seq_len = seq_len or cfg.max_seq_len
    if not 1 <= seq_len <= cfg.max_seq_len:
        raise ConfigError(f"--seq {seq_len} must be between 1 and the model's context, max_seq_len={cfg.max_seq_len}")
    stacks = _depths(cfg)
    blocks = dict(stacks.values())
    model = _meta_model(cfg, dict.fromkeys(stacks, 1))
    with _FlopsByModule(model) as counter:
        _run(model, cfg, seq_len)
    count = {name: blocks.get(_stack_of(name, blocks), 1) for name, _ in model.named_modules()}
    params = sum(p.numel() * count[name.rpartition(".")[0]] for name, p in model.named_parameters())
    rows, seen = [], set()
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]  # a tied weight counts once
        seen.update(id(p) for p in own)
        own_params = sum(p.numel() for p in own)
        ops = counter.flops.get(name, {})
        has_children = any(True for _ in module.children())
        if ops or own_params:
            label = _display(name, blocks) or type(model).__name__
            if ops and has_children:
                label += f" [{', '.join(sorted(ops))}]"  # its own multiplies, beside its children's
            rows.append(LayerRow(label, count[name], own_params, sum(ops.values())))
    linears = [LinearLayer(_display(name, blocks), m.in_features, m.out_features, count[name],
                           _stack_of(name, blocks) is not None)
               for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    forward = sum(row.forward_flops * row.count for row in rows)
    return ModelCount(params, seq_len, rows, linears, forward, _training_flops(cfg, seq_len) - forward)
