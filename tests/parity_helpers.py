"""Helpers shared by the Hugging Face parity tests."""

from __future__ import annotations

import torch


def perturb(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Random init leaves biases at 0 and norms at 1; perturb every parameter so each weight mapping matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
