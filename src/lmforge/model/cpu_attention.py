"""Causal self-attention for training on CPU: `cpu_attention.cpp`, built on the machine that runs it.

PyTorch's CPU flash-attention kernels run a general blocked GEMM per tile, which at the head sizes and lengths small
models train with leaves most of the time in overhead. The C++ kernel here does the same computation (flash
attention's forward with a log-sum-exp, and its recomputing backward) one (batch, key-value head) at a time out of the
cache, in fp32; bf16 and fp16 inputs (autocast) are computed in fp32 and rounded once. Given RoPE's tables, it rotates
the queries and keys as it reads them into its buffers (and their gradients back as it writes them), which saves
the rotation's passes over them in memory each way. It is built on the machine (`cpu_build`) and compared with SDPA
on a small known input; a kernel that fails to build or disagrees is not used (one warning) and attention runs
through `F.scaled_dot_product_attention` as everywhere else.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.model import cpu_build
from lmforge.model.layers import apply_rope

SOURCE = Path(__file__).with_name("cpu_attention.cpp")
HEAD_DIMS = (16, 32, 64, 128)  # the head sizes the kernel is instantiated for
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # fp16 and bf16 computed in fp32
# of the largest value, against SDPA in fp64 on the check's input: fp32 rounding is ~1e-6 there
CHECK_TOLERANCE = 1e-4


def _declare(lib: ctypes.CDLL) -> None:
    pointer, count = ctypes.c_void_p, ctypes.c_int
    rest = [pointer, ctypes.c_float, pointer, pointer, count]  # strides, scale, cos, sin, threads
    lib.causal_attention_forward.argtypes = [pointer] * 5 + [count] * 5 + rest
    lib.causal_attention_backward.argtypes = [pointer] * 9 + [count] * 5 + rest


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The built and checked kernel, or None (after one warning) where it cannot be used."""
    return cpu_build.checked_kernel(SOURCE, _declare, kernel_problem, "CPU attention kernel",
                                    "CPU training attention runs through SDPA")


def _strides(*tensors: Tensor) -> Tensor:
    """The batch, head and position strides of each tensor, in elements, for the kernel."""
    return torch.tensor([s for t in tensors for s in t.stride()[:3]], dtype=torch.long)


def _check_status(status: int, head_dim: int) -> None:
    if status:  # `takes_fast_path` keeps other head sizes away; a direct caller gets this
        raise ValueError(f"the CPU attention kernel has no head size {head_dim} (it has {HEAD_DIMS})")


def _tables(rope: tuple[Tensor, Tensor] | None) -> tuple[int | None, int | None]:
    return (None, None) if rope is None else (rope[0].data_ptr(), rope[1].data_ptr())


def _forward(lib: ctypes.CDLL, q: Tensor, k: Tensor, v: Tensor, scale: float,
             rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    B, H, T, D = q.shape
    out = q.new_empty(B, T, H, D).transpose(1, 2)  # as the output projection reads it
    log_norm = q.new_empty(B, H, T)
    strides = _strides(q, k, v, out)
    status = lib.causal_attention_forward(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                          log_norm.data_ptr(), B, H, k.shape[1], T, D, strides.data_ptr(), scale,
                                          *_tables(rope), torch.get_num_threads())
    _check_status(status, D)
    return out, log_norm


def _backward(lib: ctypes.CDLL, grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, log_norm: Tensor,
              scale: float, rope: tuple[Tensor, Tensor] | None = None,
              into: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk and dv, written into `into` if given (else new tensors)."""
    B, H, T, D = q.shape
    dq, dk, dv = into or (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    strides = _strides(q, k, v, out, grad, dq, dk, dv)
    status = lib.causal_attention_backward(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), grad.data_ptr(),
                                           log_norm.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), B, H,
                                           k.shape[1], T, D, strides.data_ptr(), scale, *_tables(rope),
                                           torch.get_num_threads())
    _check_status(status, D)
    return dq, dk, dv


def _fp32_rows(t: Tensor) -> Tensor:
    """t in fp32 with its last dimension contiguous (the kernel's layout), copied only if it must be."""
    t = t.float()
    return t if t.stride(-1) == 1 else t.contiguous()


def _fp32_tables(rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor] | None:
    return None if rope is None else (rope[0].float().contiguous(), rope[1].float().contiguous())


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        q32, k32, v32, rope = _fp32_rows(q), _fp32_rows(k), _fp32_rows(v), _fp32_tables(rope)
        out, log_norm = _forward(kernel(), q32, k32, v32, scale, rope)
        ctx.save_for_backward(q32, k32, v32, out, log_norm)
        ctx.scale, ctx.rope, ctx.dtypes = scale, rope, (q.dtype, k.dtype, v.dtype)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
        q, k, v, out, log_norm = ctx.saved_tensors
        grads = _backward(kernel(), _fp32_rows(grad_out), q, k, v, out, log_norm, ctx.scale, ctx.rope)
        return *(g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True)), None, None


def unpack_heads(qkv: Tensor, n_head: int, n_kv: int) -> tuple[Tensor, Tensor, Tensor]:
    """q [B, H, T, D] and k, v [B, n_kv, T, D]: views of `qkv` [B, T, H + 2 n_kv, D], as one fused projection writes
    them."""
    q, k, v = qkv.split([n_head, n_kv, n_kv], dim=2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class _PackedAttention(torch.autograd.Function):
    """`_CausalAttention` of queries, keys and values packed in one tensor, whose gradient the kernel writes in one
    piece (three separate inputs' gradients would be copied into one by autograd)."""

    @staticmethod
    def forward(ctx, qkv: Tensor, n_head: int, n_kv: int, scale: float, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        qkv32, rope = _fp32_rows(qkv), _fp32_tables(rope)
        out, log_norm = _forward(kernel(), *unpack_heads(qkv32, n_head, n_kv), scale, rope)
        ctx.save_for_backward(qkv32, out, log_norm)
        ctx.heads, ctx.scale, ctx.rope, ctx.dtype = (n_head, n_kv), scale, rope, qkv.dtype
        return out.to(qkv.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None, None, None]:
        qkv, out, log_norm = ctx.saved_tensors
        grad = torch.empty_like(qkv)
        _backward(kernel(), _fp32_rows(grad_out), *unpack_heads(qkv, *ctx.heads), out, log_norm, ctx.scale, ctx.rope,
                  into=unpack_heads(grad, *ctx.heads))
        return grad.to(ctx.dtype), None, None, None, None


def packed_causal_attention(qkv: Tensor, n_head: int, n_kv: int, scale: float | None = None,
                            rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """`causal_attention` of `unpack_heads(qkv, n_head, n_kv)`, its gradient one tensor like qkv."""
    _check_tables(rope, qkv.shape[1], qkv.shape[3])
    return _PackedAttention.apply(qkv, n_head, n_kv, qkv.shape[-1] ** -0.5 if scale is None else scale, rope)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None,
                        rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """What `causal_attention` computes, in PyTorch ops: RoPE as `layers.apply_rope` does it, then causal SDPA."""
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def kernel_problem(lib: ctypes.CDLL) -> str | None:
    """None when `lib`'s output and gradients match SDPA's in fp64 on a small known input (grouped heads, a length
    that is no multiple of a block, every head size, with and without RoPE), else one line saying what is wrong."""
    gen = torch.Generator().manual_seed(0)
    for head_dim in HEAD_DIMS:
        q = torch.randn(2, 4, 21, head_dim, generator=gen, dtype=torch.float64)
        k, v, grad = (torch.randn(2, n, 21, head_dim, generator=gen, dtype=torch.float64) for n in (2, 2, 4))
        angles = torch.rand(21, head_dim // 2, generator=gen, dtype=torch.float64).mul_(6).repeat(1, 2)
        for rope in (None, (angles.cos(), angles.sin())):
            with torch.enable_grad():  # the first use may come inside an autograd Function's forward
                exact = [t.clone().requires_grad_() for t in (q, k, v)]
                want = reference_attention(*exact, 0.3, rope)
                want_grads = torch.autograd.grad(want, exact, grad)
            q32, k32, v32, grad32 = (t.float() for t in (q, k, v, grad))
            tables = None if rope is None else tuple(t.float() for t in rope)
            out, log_norm = _forward(lib, q32, k32, v32, 0.3, tables)
            got = (out, *_backward(lib, grad32, q32, k32, v32, out, log_norm, 0.3, tables))
            for name, g, w in zip(("output", "dq", "dk", "dv"), got, (want, *want_grads), strict=True):
                error = (g.double() - w).abs().max().item() / w.abs().max().item()
                if not error <= CHECK_TOLERANCE:
                    return (f"the CPU attention kernel's {name} is off by {error:.2e} of the largest (head size "
                            f"{head_dim}{', RoPE' if rope else ''})")
    return None


def fits(device: torch.device, dtype: torch.dtype, batch: int, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel takes causal attention of this shape while a gradient is recorded: a CPU, a dtype of DTYPES,
    a head size it has, whole query groups over the key-value heads, at least one (batch, key-value head) pair per
    thread (the kernel's unit of work: fewer would leave threads idle, where SDPA also splits the queries), outside a
    `torch.compile` trace, and a kernel that built and passed its check."""
    return (device.type == "cpu" and dtype in DTYPES and head_dim in HEAD_DIMS and heads % kv_heads == 0
            and batch * kv_heads >= torch.get_num_threads() and torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and kernel() is not None)


def takes_fast_path(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether `causal_attention` applies: tensors of one dtype that `fits`, keys as long as the queries, and a
    gradient wanted (training)."""
    return (q.dtype == k.dtype == v.dtype and k.shape[-2] == q.shape[-2]
            and (q.requires_grad or k.requires_grad or v.requires_grad)
            and fits(q.device, q.dtype, k.shape[0], q.shape[1], k.shape[1], q.shape[-1]))


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None,
                     rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Causal attention of q [B, H, T, head_dim] over k, v [B, H_kv, T, head_dim] without dropout, with q and k first
    rotated by `rope`'s cos and sin tables [T, head_dim] (half-split layout) if given: `reference_attention`'s values
    up to fp32 rounding (check `takes_fast_path` first)."""
    _check_tables(rope, q.shape[2], q.shape[3])
    return _CausalAttention.apply(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale, rope)


def _check_tables(rope: tuple[Tensor, Tensor] | None, length: int, head_dim: int) -> None:
    """The kernel reads `length` rows of `head_dim` floats from each table: anything else is refused first."""
    if rope is not None and any(t.shape != (length, head_dim) or t.device.type != "cpu" for t in rope):
        shapes = [f"{list(t.shape)} on {t.device}" for t in rope]
        raise ValueError(f"RoPE tables for the CPU kernel are [T, head_dim] = {[length, head_dim]} on the CPU, got "
                         f"{shapes}")
