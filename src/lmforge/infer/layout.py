"""Weight layout for inference: Linear weights stored column-major, which CPU matmuls stream faster from memory.

`nn.Linear` keeps W as [out, in] row-major and computes x @ W.T. When the weights come from DRAM, MKL multiplies a few
rows faster if W.T is the contiguous one: each input element scales one contiguous weight row into an output that
stays in cache, instead of one dot product per output. Measured on a 2-core Xeon (Sapphire Rapids, torch 2.13), batch-1
greedy decoding (benchmarks/decode_speed.py), row-major -> column-major ms per token:

    weights read per token   23 MB        55 MB        134 MB       495 MB (GPT-2-small)
    ms per token             1.24 -> 1.30  2.22 -> 2.14  6.11 -> 5.96  21.9 -> 20.7

Weights that fit in the last-level cache read faster row-major (each thread reads one contiguous half), so models
below `MIN_BYTES` are left as they are. Values and shapes stay the same, only the strides change.
"""

from __future__ import annotations

import torch
from torch import nn

# Linear weight bytes from which the column-major layout pays (between the measured 23 MB and 55 MB points above).
MIN_BYTES = 40 * 2**20


def is_column_major(weight: torch.Tensor) -> bool:
    """True when a 2-D weight [out, in] is stored as its transpose, contiguous [in, out]."""
    return weight.dim() == 2 and weight.t().is_contiguous() and not weight.is_contiguous()


def linear_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights of `model`'s plain `nn.Linear` layers, a tied weight once."""
    return list({id(m.weight): m.weight for m in model.modules() if type(m) is nn.Linear}.values())


@torch.no_grad()
def column_major_linears(model: nn.Module, min_bytes: int = MIN_BYTES) -> nn.Module:
    """Store every plain `nn.Linear` weight of `model` column-major, in place, one matrix at a time (peak memory grows
    by one matrix), when they hold at least `min_bytes` together; return `model`. For inference: the CLI's `generate`
    and the report's timings call it after `lmforge.load`; leave a model you will train as it is (a tied embedding
    becomes a strided gather, and gradients come back in the other layout). A tied weight is converted once and
    stays tied; quantised and adapter layers keep their own layout; saving writes contiguous tensors as before."""
    weights = linear_weights(model)
    if sum(w.nbytes for w in weights) < min_bytes:
        return model
    for weight in weights:
        if not is_column_major(weight):
            weight.data = weight.data.t().contiguous().t()
    return model
