"""Causal self-attention for training on CPU: `cpu_attention.cpp`, built on the machine that runs it.

PyTorch's CPU flash-attention kernels run a general blocked GEMM per tile, which at the head sizes and lengths small
models train with leaves most of the time in overhead. The C++ kernel here does the same computation (flash
attention's forward with a log-sum-exp, and its recomputing backward) one (batch, key-value head) at a time out of the
cache, in fp32; bf16 and fp16 inputs (autocast) are computed in fp32 and rounded once. It is built with the system's
C++ compiler for this CPU (`-march=native`, OpenMP) the first time a process needs it, cached under
`$XDG_CACHE_HOME/lmforge` (default `~/.cache/lmforge`) by a hash of its source, compiler and CPU, and then compared
with SDPA on a small known input. A kernel that fails to build or disagrees is not used (one warning) and attention
runs through `F.scaled_dot_product_attention` as everywhere else.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.cpu_info import cpu_flags, cpu_model

SOURCE = Path(__file__).with_name("cpu_attention.cpp")
HEAD_DIMS = (16, 32, 64, 128)  # the head sizes the kernel is instantiated for
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # fp16 and bf16 computed in fp32
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")
# of the largest value, against SDPA in fp64 on the check's input: fp32 rounding is ~1e-6 there
CHECK_TOLERANCE = 1e-4


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge"


def _build(compiler: str) -> Path:
    """The shared library of SOURCE for this machine, compiled unless already in the cache."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    machine = [cpu_model(), *sorted(cpu_flags())]  # what -march=native compiles for
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS), *machine]).encode())
    target = _cache_dir() / f"cpu_attention-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, then renamed: atomic for racers
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
            if result.returncode:
                raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-300:]}")
            os.replace(built, target)
    return target


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    pointer, count = ctypes.c_void_p, ctypes.c_int
    lib.causal_attention_forward.argtypes = [pointer] * 5 + [count] * 5 + [pointer, ctypes.c_float, count]
    lib.causal_attention_backward.argtypes = [pointer] * 9 + [count] * 5 + [pointer, ctypes.c_float, count]
    return lib


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The built and checked kernel, or None (after one warning) where it cannot be used."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        problem = "no C++ compiler found (g++ or clang++; or set CXX)"
    else:
        try:
            lib = _load(_build(compiler))
            problem = kernel_problem(lib)
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            problem = f"the CPU attention kernel did not build: {type(err).__name__}: {str(err)[:300]}"
    if problem is None:
        return lib
    warnings.warn(f"{problem}; CPU training attention runs through SDPA", RuntimeWarning, stacklevel=2)
    return None


def _strides(*tensors: Tensor) -> Tensor:
    """The batch, head and position strides of each tensor, in elements, for the kernel."""
    return torch.tensor([s for t in tensors for s in t.stride()[:3]], dtype=torch.long)


def _check_status(status: int, head_dim: int) -> None:
    if status:  # `takes_fast_path` keeps other head sizes away; a direct caller gets this
        raise ValueError(f"the CPU attention kernel has no head size {head_dim} (it has {HEAD_DIMS})")


def _forward(lib: ctypes.CDLL, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    B, H, T, D = q.shape
    out = q.new_empty(B, T, H, D).transpose(1, 2)  # as the output projection reads it
    log_norm = q.new_empty(B, H, T)
    strides = _strides(q, k, v, out)
    status = lib.causal_attention_forward(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                          log_norm.data_ptr(), B, H, k.shape[1], T, D, strides.data_ptr(), scale,
                                          torch.get_num_threads())
    _check_status(status, D)
    return out, log_norm


def _backward(lib: ctypes.CDLL, grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, log_norm: Tensor,
              scale: float) -> tuple[Tensor, Tensor, Tensor]:
    B, H, T, D = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    strides = _strides(q, k, v, out, grad, dq, dk, dv)
    status = lib.causal_attention_backward(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), grad.data_ptr(),
                                           log_norm.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), B, H,
                                           k.shape[1], T, D, strides.data_ptr(), scale, torch.get_num_threads())
    _check_status(status, D)
    return dq, dk, dv


def _fp32_rows(t: Tensor) -> Tensor:
    """t in fp32 with its last dimension contiguous (the kernel's layout), copied only if it must be."""
    t = t.float()
    return t if t.stride(-1) == 1 else t.contiguous()


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        lib = kernel()
        q32, k32, v32 = _fp32_rows(q), _fp32_rows(k), _fp32_rows(v)
        out, log_norm = _forward(lib, q32, k32, v32, scale)
        ctx.save_for_backward(q32, k32, v32, out, log_norm)
        ctx.scale, ctx.dtypes = scale, (q.dtype, k.dtype, v.dtype)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        q, k, v, out, log_norm = ctx.saved_tensors
        grads = _backward(kernel(), _fp32_rows(grad_out), q, k, v, out, log_norm, ctx.scale)
        return *(g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True)), None


def kernel_problem(lib: ctypes.CDLL) -> str | None:
    """None when `lib`'s output and gradients match SDPA's in fp64 on a small known input (grouped heads, a length
    that is no multiple of a block, every head size), else one line saying what is wrong."""
    gen = torch.Generator().manual_seed(0)
    for head_dim in HEAD_DIMS:
        q = torch.randn(2, 4, 21, head_dim, generator=gen, dtype=torch.float64)
        k, v, grad = (torch.randn(2, n, 21, head_dim, generator=gen, dtype=torch.float64) for n in (2, 2, 4))
        with torch.enable_grad():  # the first use may come inside an autograd Function's forward
            exact = [t.clone().requires_grad_() for t in (q, k, v)]
            want = F.scaled_dot_product_attention(*exact, is_causal=True, scale=0.3, enable_gqa=True)
            want_grads = torch.autograd.grad(want, exact, grad)
        q32, k32, v32, grad32 = (t.float() for t in (q, k, v, grad))
        out, log_norm = _forward(lib, q32, k32, v32, 0.3)
        got = (out, *_backward(lib, grad32, q32, k32, v32, out, log_norm, 0.3))
        for name, g, w in zip(("output", "dq", "dk", "dv"), got, (want, *want_grads), strict=True):
            error = (g.double() - w).abs().max().item() / w.abs().max().item()
            if not error <= CHECK_TOLERANCE:
                return f"the CPU attention kernel's {name} is off by {error:.2e} of the largest (head size {head_dim})"
    return None


def takes_fast_path(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether `causal_attention` applies: CPU tensors of one dtype of DTYPES, a head size the kernel has, whole
    query groups over the key-value heads, at least one (batch, key-value head) pair per thread (the kernel's unit of
    work: fewer would leave threads idle, where SDPA also splits the queries), a gradient wanted (training) outside a
    `torch.compile` trace, and a kernel that built and passed its check."""
    return (q.device.type == "cpu" and q.dtype in DTYPES and q.dtype == k.dtype == v.dtype
            and q.shape[-1] in HEAD_DIMS and q.shape[1] % k.shape[1] == 0 and k.shape[-2] == q.shape[-2]
            and k.shape[0] * k.shape[1] >= torch.get_num_threads()
            and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            and not torch.compiler.is_compiling() and kernel() is not None)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Causal attention of q [B, H, T, head_dim] over k, v [B, H_kv, T, head_dim] without dropout, SDPA's values up
    to fp32 rounding (check `takes_fast_path` first)."""
    return _CausalAttention.apply(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)
