"""Shared helpers for lmforge's benchmarks: machine description, measured peaks, timing, and
the same-weights (transformers, lmforge) model pair.

The pair is built without downloads: a transformers GPT2LMHeadModel / LlamaForCausalLM is
created from a seeded random init (every parameter slightly perturbed, so biases and norm
gains are not all 0/1 and every weight mapping matters), saved with `save_pretrained`, and
loaded into lmforge with `lmforge.model.hf.load_hf`. Both therefore hold identical weights.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from lmforge.cpu_info import cpu_model
from lmforge.eval.timing import Timing, time_alternating  # noqa: F401  (re-exported for the scripts)

# ---------------------------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------------------------


def machine_line() -> str:
    """One line: CPU model, usable cores, ISA level, torch/transformers versions, threads, load."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    try:
        import transformers

        tf = f"transformers {transformers.__version__}"
    except ImportError:
        tf = "transformers n/a"
    try:
        load = "load {:.2f}/{:.2f}".format(*os.getloadavg()[:2])
    except OSError:
        load = "load n/a"
    isa = torch.backends.cpu.get_cpu_capability()
    return (
        f"{cpu_model()} | {cores} cores ({isa}) | torch {torch.__version__} | {tf} | "
        f"{torch.get_num_threads()} threads | {load} (1/5 min)"
    )


def _busy_seconds() -> float | None:
    """CPU-seconds all processes have spent busy since boot (/proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Measures how many cores *other* processes kept busy while the benchmark ran: on a shared
    machine this is the main source of noise (a busy core stalls every multi-threaded op)."""

    def __enter__(self) -> OtherLoad:
        self.busy0, self.self0, self.wall0 = _busy_seconds(), _self_seconds(), time.perf_counter()
        self.cores: float | None = None
        return self

    def __exit__(self, *exc) -> None:
        busy1 = _busy_seconds()
        if busy1 is None or self.busy0 is None:
            return
        wall = time.perf_counter() - self.wall0
        other = (busy1 - self.busy0) - (_self_seconds() - self.self0)
        self.cores = max(0.0, other / wall) if wall > 0 else 0.0

    def describe(self) -> str:
        if self.cores is None:
            return "other processes' load: unknown"
        warn = " (the machine was shared: expect noisy numbers)" if self.cores > 0.2 else ""
        return f"other processes kept {self.cores:.2f} cores busy during the timing{warn}"


def _self_seconds() -> float:
    t = os.times()
    return t.user + t.system


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def time_it(fn: Callable[[], object], warmup: int = 1, repeats: int = 5) -> Timing:
    """Run fn `warmup` times untimed, then `repeats` times timed (seconds per call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(times)


# ---------------------------------------------------------------------------------------------
# Measured peaks
# ---------------------------------------------------------------------------------------------


def matmul_peak_gflops(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048), repeats: int = 3) -> float:
    """Best GFLOP/s over a few square matmuls (2 n^3 FLOPs each) in `dtype`: the peak the trainer's MFU uses."""
    from lmforge.train.mfu import matmul_peak_flops

    return matmul_peak_flops(torch.device("cpu"), dtype, sizes, repeats) / 1e9


def memory_bandwidth_gbs(megabytes: int = 512, repeats: int = 7) -> float:
    """Read bandwidth in GB/s: best time of `x.sum()` over a `megabytes` fp32 tensor."""
    x = torch.ones(megabytes * 2**20 // 4)
    t = time_it(lambda: x.sum(), warmup=1, repeats=repeats)
    return x.numel() * 4 / t.best / 1e9  # a bound: the best repeat


# ---------------------------------------------------------------------------------------------
# Model specs and the same-weights pair
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    family: str = "gpt2"  # gpt2 | llama
    vocab_size: int = 2048
    max_seq_len: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    n_kv_head: int | None = None  # llama only; None = n_head

    def describe(self) -> str:
        kv = f", kv_heads {self.n_kv_head}" if self.family == "llama" and self.n_kv_head else ""
        return (
            f"{self.family}: vocab {self.vocab_size}, ctx {self.max_seq_len}, {self.n_layer} layers, "
            f"{self.n_head} heads{kv}, d_model {self.d_model}"
        )


def _demo_spec() -> ModelSpec:
    """The decoder `lmforge demo` trains (one source of truth: the demo plan)."""
    from lmforge.demo import demo_plan

    d = demo_plan(quick=False).decoder
    return ModelSpec(vocab_size=d.vocab_size, max_seq_len=d.max_seq_len, n_layer=d.n_layer, n_head=d.n_head,
                     d_model=d.d_model)


SIZES = {
    "demo": _demo_spec(),
    "gpt2-small": ModelSpec(vocab_size=50257, max_seq_len=1024, n_layer=12, n_head=12, d_model=768),
}


def add_model_args(parser: argparse.ArgumentParser, default_size: str = "demo") -> None:
    g = parser.add_argument_group("model (a size preset; any explicit field overrides it)")
    g.add_argument(
        "--size",
        choices=sorted(SIZES),
        default=default_size,
        help=f"size preset (default: {default_size}); demo = the decoder `lmforge demo` trains "
        f"({SIZES['demo'].describe()}); gpt2-small = vocab 50257, ctx 1024, 12 layers, 12 heads, d 768",
    )
    g.add_argument(
        "--family",
        choices=["gpt2", "llama"],
        default="gpt2",
        help="architecture: gpt2 (learned positions, LayerNorm, GELU, tied head; HF "
        "GPT2LMHeadModel) or llama (RoPE, RMSNorm, SwiGLU; HF LlamaForCausalLM) (default: gpt2)",
    )
    g.add_argument("--vocab", type=int, help="vocabulary size (overrides the preset)")
    g.add_argument("--ctx", type=int, help="context length / max positions (overrides the preset)")
    g.add_argument("--layers", type=int, help="number of layers (overrides the preset)")
    g.add_argument("--heads", type=int, help="number of attention heads (overrides the preset)")
    g.add_argument("--d-model", type=int, help="model width (overrides the preset)")
    g.add_argument(
        "--kv-heads",
        type=int,
        help="llama only: key/value heads for grouped-query attention (default: = heads)",
    )


def spec_from_args(args: argparse.Namespace) -> ModelSpec:
    spec = replace(SIZES[args.size], family=args.family)
    overrides = dict(
        vocab_size=args.vocab,
        max_seq_len=args.ctx,
        n_layer=args.layers,
        n_head=args.heads,
        d_model=args.d_model,
        n_kv_head=args.kv_heads,
    )
    spec = replace(spec, **{k: v for k, v in overrides.items() if v is not None})
    if spec.n_kv_head is not None and spec.family != "llama":
        raise SystemExit("--kv-heads needs --family llama (HF GPT-2 has no grouped-query attention)")
    return spec


def hf_model(spec: ModelSpec) -> nn.Module:
    """A randomly initialised transformers model for `spec` (dropout off, no special tokens)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    ids = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if spec.family == "gpt2":
        cfg = GPT2Config(
            vocab_size=spec.vocab_size,
            n_positions=spec.max_seq_len,
            n_embd=spec.d_model,
            n_layer=spec.n_layer,
            n_head=spec.n_head,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
        return GPT2LMHeadModel(cfg)
    ff = -(-int(8 * spec.d_model / 3) // 32) * 32  # lmforge's (and the usual) Llama d_ff rule
    cfg = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.d_model,
        intermediate_size=ff,
        num_hidden_layers=spec.n_layer,
        num_attention_heads=spec.n_head,
        num_key_value_heads=spec.n_kv_head or spec.n_head,
        head_dim=spec.d_model // spec.n_head,
        max_position_embeddings=spec.max_seq_len,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        **ids,
    )
    return LlamaForCausalLM(cfg)


def build_pair(spec: ModelSpec, seed: int = 0, jitter: float = 0.02) -> tuple[nn.Module, nn.Module]:
    """(transformers model, lmforge DecoderLM) with identical fp32 weights, both in eval mode."""
    from transformers.utils import logging as hf_logging

    from lmforge.model.hf import load_hf

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    hf = hf_model(spec).float()
    if jitter:
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(torch.randn_like(p) * jitter)
    hf.eval()
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        lm, _ = load_hf(tmp)
    return hf, lm.float().eval()


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def decode_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step must read: every parameter except embedding tables that
    are only indexed (a single row each), counting a tied embedding/head once (the head reads it),
    plus the codes, scales and zero points of quantised Linears."""
    from lmforge.infer.quant import QuantLinear

    read_fully = {id(b): b.numel() * b.element_size() for m in model.modules() if isinstance(m, QuantLinear)
                  for b in m.buffers()}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    used_by_linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    for p in model.parameters():
        if id(p) in embeddings and id(p) not in used_by_linear:
            continue
        read_fully[id(p)] = p.numel() * p.element_size()
    return sum(read_fully.values())


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"
