"""Bottleneck adapters: sequential (Houlsby et al. 2019) and parallel (He et al. 2022).

Each block's `attn` and `mlp` is wrapped in place; the wrapper passes every argument through, so the
blocks (decoder or encoder) are unchanged. `up` starts at zero, so an adapted model starts exactly at
the base model's outputs (Houlsby et al.'s near-identity initialisation, made exact).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from lmforge.model.layers import ACTIVATIONS

if TYPE_CHECKING:
    from lmforge.peft.config import PeftConfig


class Adapter(nn.Module):
    """up(act(down(x))): d_model -> bottleneck -> d_model (Houlsby et al. 2019, fig. 2)."""

    def __init__(self, d_model: int, bottleneck: int, activation: str):
        super().__init__()
        self.down = nn.Linear(d_model, bottleneck)
        self.act = ACTIVATIONS[activation]
        self.up = nn.Linear(bottleneck, d_model)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.act(self.down(x)))


class SequentialAdapter(nn.Module):
    """h + adapter(h) on the sublayer's output h, before the block's residual add (Houlsby et al. 2019)."""

    def __init__(self, base: nn.Module, adapter: Adapter):
        super().__init__()
        self.base, self.adapter = base, adapter

    def forward(self, *args, **kwargs) -> Tensor:
        h = self.base(*args, **kwargs)
        return h + self.adapter(h)


class ParallelAdapter(nn.Module):
    """sublayer(x) + s * adapter(x) on the sublayer's input x (He et al. 2022, eq. 5 with the scale s)."""

    def __init__(self, base: nn.Module, adapter: Adapter, scale: float):
        super().__init__()
        self.base, self.adapter, self.scale = base, adapter, scale

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self.base(x, *args, **kwargs) + self.scale * self.adapter(x)


def apply_adapters(model: nn.Module, cfg: PeftConfig) -> list[str]:
    """Freeze every base parameter, wrap each block's `attn` and `mlp` in a bottleneck adapter (sequential for
    method "adapter", parallel with scale `cfg.adapter_scale` for "parallel-adapter"); returns the wrapped names."""
    model.requires_grad_(False)
    ref = next(model.parameters())
    wrapped = []
    for i, block in enumerate(model.blocks):
        for name in ("attn", "mlp"):
            adapter = Adapter(model.cfg.d_model, cfg.bottleneck, cfg.adapter_activation)
            adapter.to(device=ref.device, dtype=ref.dtype)
            base = getattr(block, name)
            if cfg.method == "parallel-adapter":
                setattr(block, name, ParallelAdapter(base, adapter, cfg.adapter_scale))
            else:
                setattr(block, name, SequentialAdapter(base, adapter))
            wrapped.append(f"blocks.{i}.{name}")
    return wrapped
