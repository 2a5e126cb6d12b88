"""Causal training attention on CPU: lmforge's kernel (model/cpu_attention.cpp) vs PyTorch's SDPA, forward and
forward + backward, on the same q, k, v in the layout the attention layer hands over ([B, T, H, head_dim] viewed as
[B, H, T, head_dim]). Interleaved rounds, medians; the largest difference of the outputs and gradients against SDPA
in fp64 is printed beside each row. With --rope, q and k are first rotated by RoPE: inside the kernel for lmforge,
by `apply_rope` (the same ops as transformers' `apply_rotary_pos_emb`) before SDPA.

    python benchmarks/attention_speed.py                          # the demo's shape: batch 16, 6 heads, 256, head 32
    python benchmarks/attention_speed.py --batch 4 --heads 12 --seq 1024 --head-dim 64   # GPT-2 small's
    python benchmarks/attention_speed.py --kv-heads 2 --dtype bf16                        # grouped heads, bf16
    python benchmarks/attention_speed.py --rope                                           # Llama's attention
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from lmforge.model import cpu_attention  # noqa: E402
from lmforge.model.layers import rope_tables  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Causal training attention on CPU: lmforge's kernel vs SDPA.")
    p.add_argument("--batch", type=int, default=16, help="sequences (default: 16, the demo's batch)")
    p.add_argument("--heads", type=int, default=6, help="query heads (default: 6)")
    p.add_argument("--kv-heads", type=int, default=None, help="key-value heads (default: --heads); e.g. 2")
    p.add_argument("--seq", type=int, default=256, help="positions (default: 256)")
    p.add_argument("--head-dim", type=int, default=32, choices=cpu_attention.HEAD_DIMS,
                   help="head size (default: 32)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="input dtype (default: fp32)")
    p.add_argument("--rope", action="store_true",
                   help="rotate q and k by RoPE (theta 10000) first: in the kernel vs apply_rope before SDPA")
    p.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds (default: 9)")
    p.add_argument("--seed", type=int, default=0, help="seed for q, k, v and the gradient (default: 0)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if cpu_attention.kernel() is None:
        raise SystemExit("the kernel is not available on this machine (see the warning above)")
    dtype, kv_heads = DTYPES[args.dtype], args.kv_heads or args.heads
    gen = torch.Generator().manual_seed(args.seed)

    def token_major(heads: int) -> torch.Tensor:
        x = torch.randn(args.batch, args.seq, heads, args.head_dim, generator=gen).to(dtype)
        return x.transpose(1, 2).requires_grad_()

    q, k, v = token_major(args.heads), token_major(kv_heads), token_major(kv_heads)
    grad = torch.randn(q.shape, generator=gen).to(dtype)
    rope = rope_tables(args.seq, args.head_dim, 10000.0) if args.rope else None
    contenders = {"lmforge kernel": lambda q, k, v: cpu_attention.causal_attention(q, k, v, rope=rope),
                  "SDPA": lambda q, k, v: cpu_attention.reference_attention(q, k, v, None, rope)}
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference = cpu_attention.reference_attention(*exact, None, rope)
    reference = (reference, *torch.autograd.grad(reference, exact, grad.double()))

    def error(fn) -> float:
        out = fn(q, k, v)
        got = (out, *torch.autograd.grad(out, (q, k, v), grad))
        return max(((g.double() - r).abs().max() / r.abs().max()).item() for g, r in zip(got, reference, strict=True))

    fns = {}
    for name, fn in contenders.items():
        fns[f"{name} forward"] = lambda fn=fn: fn(q, k, v)
        fns[f"{name} forward+backward"] = lambda fn=fn: torch.autograd.grad(fn(q, k, v), (q, k, v), grad)
    timings = common.time_alternating(fns, warmup=1, rounds=args.rounds)
    print(f"causal attention | batch {args.batch}, {args.heads} heads ({kv_heads} kv), {args.seq} positions, "
          f"head {args.head_dim}, {args.dtype}{', RoPE' if args.rope else ''} | {args.rounds} rounds (median)")
    print(f"{'contender':<34}{'ms':>9}{'vs SDPA':>10}{'spread':>8}"
          "   output and gradients vs fp64 SDPA (of the largest)")
    for name, fn in contenders.items():
        for part in ("forward", "forward+backward"):
            t, base = timings[f"{name} {part}"], timings[f"SDPA {part}"]
            print(f"{name + ' ' + part:<34}{t.median * 1e3:>9.2f}{base.median / t.median:>9.2f}x{t.spread:>8.0%}"
                  + (f"   {error(fn):.1e}" if part == "forward+backward" else ""))
    print(f"machine: {common.machine_line()}")


if __name__ == "__main__":
    main()
