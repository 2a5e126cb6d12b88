"""Activation memory of one training step with and without activation checkpointing (train.activation_checkpointing).

CPU tensors come from glibc's malloc, so the bytes malloc has handed out and not taken back (mallinfo2: in-use heap
chunks plus mmapped blocks) are the bytes of live tensors, counted exactly; Python's tracemalloc never sees them.
The count is read after every aten op (a TorchDispatchMode), backward and recomputation included, for the peak.
Two figures per setting, each above what was live before the step (weights, Adam states):
  held:  bytes still live after the forward, i.e. kept for the backward (the activations)
  peak:  the most bytes live at any op over forward and backward (adds the gradients and the
         recomputed block's activations)
and, beside them, what `lmforge calc` estimates for the same step.

    python benchmarks/activation_memory.py                     # the demo decoder, batch 16 x its context
    python benchmarks/activation_memory.py --family llama --layers 8
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from lmforge.calc.memory import activation_bytes  # noqa: E402
from lmforge.config import ModelConfig  # noqa: E402
from lmforge.model.activation_checkpointing import set_activation_checkpointing  # noqa: E402
from lmforge.model.decoder import DecoderLM  # noqa: E402
from lmforge.train.objectives import causal_lm_loss  # noqa: E402


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo2():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc.mallinfo2
    except (OSError, AttributeError):
        raise SystemExit("this benchmark reads glibc's mallinfo2 (Linux, glibc >= 2.33)") from None


MALLINFO2 = _mallinfo2()


def malloc_bytes() -> int:
    """Bytes malloc has handed out and not been given back: in-use heap chunks plus mmapped blocks."""
    info = MALLINFO2()
    return info.uordblks + info.hblkhd


class PeakBytes(TorchDispatchMode):
    """The most malloc'd bytes seen after any aten op run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = malloc_bytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, malloc_bytes())
        return out


def step_memory(model: DecoderLM, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(held, peak) bytes of one forward + backward above those live before it."""
    model.zero_grad(set_to_none=True)
    before = malloc_bytes()
    with PeakBytes() as peak:
        result = causal_lm_loss(model, batch)
        held = malloc_bytes() - before
        (result.total / result.count).backward()
    return held, peak.peak - before


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Activation memory of a training step with and without activation "
                                "checkpointing, counted from malloc after every op.")
    common.add_model_args(p)
    p.add_argument("--batch", type=int, default=16, help="sequences per step (default: 16)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the model's context)")
    args = p.parse_args(argv)
    spec = common.spec_from_args(args)
    seq = args.seq or spec.max_seq_len
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(family=spec.family, vocab_size=spec.vocab_size, max_seq_len=spec.max_seq_len,
                                  n_layer=spec.n_layer, n_head=spec.n_head, n_kv_head=spec.n_kv_head,
                                  d_model=spec.d_model)).train()
    ids = torch.randint(0, spec.vocab_size, (args.batch, seq + 1))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    figures = {}
    for checkpointing in (False, True, False, True):  # each twice: the first step of each warms caches up
        set_activation_checkpointing(model, checkpointing)
        figures[checkpointing] = step_memory(model, batch)
    mib = 2**20
    print(f"activation memory | {spec.describe()} | {common.num_params(model) / 1e6:.2f}M params | "
          f"batch {args.batch} x {seq} | fp32, one forward + backward")
    print(f"{'setting':<28}{'held (MiB)':>12}{'peak (MiB)':>12}")
    for checkpointing, (held, peak) in figures.items():
        print(f"{'checkpointed blocks' if checkpointing else 'plain':<28}{held / mib:>12.1f}{peak / mib:>12.1f}")
    (held_off, peak_off), (held_on, peak_on) = figures[False], figures[True]
    print(f"checkpointing keeps {held_on / held_off:.2f}x the activations (held) and peaks at "
          f"{peak_on / peak_off:.2f}x the memory, for one more forward of every block")
    tokens = args.batch * seq
    estimate = {flag: activation_bytes(model.cfg, tokens, 4, flag) / mib for flag in (False, True)}
    gradients = 4 * common.num_params(model) / mib
    print(f"lmforge calc's estimate (lmforge.calc.memory.activation_bytes): {estimate[False]:.1f} MiB plain (vs "
          f"held), {estimate[True]:.1f} MiB checkpointed at the peak (vs peak less the {gradients:.1f} MiB of "
          "gradients)")
    print(f"machine: {common.machine_line()}")


if __name__ == "__main__":
    main()
