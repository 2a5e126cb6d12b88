"""The MLP's activation in CPU training as one compiled element-wise kernel each way: act(a), or act(a) * b.

GPT-2's tanh-GELU in ATen runs its tanh through a slow vectorised approximation on CPU (several times the cost of a
pass over memory), and eager SwiGLU reads and writes the [tokens, d_ff] activations in four separate passes for its
backward. Both activations have the form act(x) = x * sigmoid(v(x)), with v(x) = x for SiLU and
v(x) = 2 sqrt(2/pi) (x + 0.044715 x^3) for tanh-GELU (0.5 (1 + tanh(u)) = sigmoid(2u)), so

    act'(x) = s + x s (1 - s) v'(x),    s = sigmoid(v(x)) = 1 / (1 + exp(-v(x)))

and `torch.compile` turns each direction into one loop over the elements built on exp, which is fast on CPU. The
forward keeps only its inputs; the backward recomputes s. fp32 and bf16 (autocast) inputs are computed in fp32 and
rounded once, as ATen's kernels do.

Compiling needs PyTorch's inductor and a C++ compiler. Before their first use in a process in each dtype the kernels
are compared with ATen's activation on a small known input; kernels that fail to build or disagree are not used (one
warning) and the MLP takes its eager path.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

GELU_SLOPE = 2 * math.sqrt(2 / math.pi)  # v(x) = GELU_SLOPE * (x + GELU_CUBIC * x^3) for tanh-GELU
GELU_CUBIC = 0.044715
# below this many elements a compiled call's fixed cost (its guards, the autograd Function) outweighs the pass it saves
MIN_ELEMENTS = 2**20
# of the largest value: in fp32 the two formulas differ by rounding only (~1e-7); bf16 results round from fp32 (as
# ATen's do), where that difference moves a few in a thousand by one bf16 step
CHECK_TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 2**-7}
ACTIVATIONS = ("gelu_tanh", "silu")


def _sigmoid_and_slope(x: Tensor, activation: str) -> tuple[Tensor, Tensor | None]:
    """s = sigmoid(v(x)) and v'(x) (None where it is 1)."""
    if activation == "silu":
        return 1 / (1 + torch.exp(-x)), None
    square = x * x
    s = 1 / (1 + torch.exp(-x * (GELU_SLOPE + GELU_SLOPE * GELU_CUBIC * square)))
    return s, GELU_SLOPE + 3 * GELU_SLOPE * GELU_CUBIC * square


def _forward(activation: str, a: Tensor, b: Tensor | None) -> Tensor:
    """act(a) (* b), computed in fp32 whatever a's dtype, rounded to it once."""
    x = a.float()
    s, _ = _sigmoid_and_slope(x, activation)
    return (x * s if b is None else x * s * b.float()).to(a.dtype)


def _backward(activation: str, grad: Tensor, a: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
    x, g = a.float(), grad.float()
    s, slope = _sigmoid_and_slope(x, activation)
    x_s = x * s
    derivative = s + x_s * (1 - s) * (1 if slope is None else slope)
    if b is None:
        return (g * derivative).to(a.dtype), None
    return (g * b.float() * derivative).to(a.dtype), (g * x_s).to(b.dtype)


_kernels: dict[str, tuple[Callable, Callable]] = {}  # activation -> compiled (forward, backward)
_usable: dict[tuple[str, torch.dtype], bool] = {}  # whether they passed their check in that dtype


def _compiled(activation: str, reference: Callable[[Tensor], Tensor], dtype: torch.dtype
              ) -> tuple[Callable, Callable] | None:
    """The compiled (forward, backward) of `activation`, built and checked against `reference` in `dtype` on first
    use; None if they failed."""
    if (activation, dtype) not in _usable:
        kernels = _kernels.setdefault(activation, (
            torch.compile(lambda a, b: _forward(activation, a, b), dynamic=True),
            torch.compile(lambda g, a, b: _backward(activation, g, a, b), dynamic=True)))
        problem = kernel_problem(activation, reference, *kernels, dtype)
        if problem is not None:
            warnings.warn(f"{problem}; the MLP computes its activation with eager ops", RuntimeWarning, stacklevel=3)
        _usable[(activation, dtype)] = problem is None
    return _kernels[activation] if _usable[(activation, dtype)] else None


def kernel_problem(activation: str, reference: Callable[[Tensor], Tensor], forward: Callable, backward: Callable,
                   dtype: torch.dtype = torch.float32) -> str | None:
    """None when the compiled kernels match `reference` (the activation as ATen computes it) and its autograd in
    `dtype` on a small known input (plain and gated), else one line saying what is wrong."""
    gen = torch.Generator().manual_seed(0)
    a, b, g = (torch.randn(4096, generator=gen).mul_(4).to(dtype) for _ in range(3))
    leaf = a.clone().requires_grad_()
    expected = reference(leaf)
    (grad_expected,) = torch.autograd.grad(expected, leaf, g)
    try:
        with torch.no_grad():  # as inside the autograd Function, so that the kernels built here are the ones used
            got = forward(a, None), backward(g, a, None)[0], forward(a, b), *backward(g, a, b)
    except Exception as err:  # a missing compiler or a changed inductor: whatever it raises, the check reports it
        return f"torch.compile could not build the {activation} kernel: {type(err).__name__}: {str(err)[:200]}"
    expected = expected.detach()
    wanted = expected, grad_expected, expected * b, grad_expected * b, expected * g
    for name, out, ref in zip(("forward", "backward", "gated forward", "gated backward", "gated backward of b"),
                              got, wanted, strict=True):
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        if not (out.dtype == dtype and err <= CHECK_TOLERANCES[dtype]):
            return f"the compiled {activation} kernel's {name} ({out.dtype}) is off by {err:.1e} of the largest value"
    return None


class _CompiledActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor | None, activation: str) -> Tensor:
        forward, _ = _kernels[activation]  # built and checked by `takes_fast_path`
        ctx.activation = activation
        ctx.save_for_backward(a, b)
        flat_b = None if b is None else b.reshape(-1)
        return forward(a.reshape(-1), flat_b).view(a.shape)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None, None]:
        a, b = ctx.saved_tensors
        _, backward = _kernels[ctx.activation]
        grad_a, grad_b = backward(grad.reshape(-1), a.reshape(-1), None if b is None else b.reshape(-1))
        return grad_a.view(a.shape), None if grad_b is None else grad_b.view(b.shape), None


def takes_fast_path(activation: str, reference: Callable[[Tensor], Tensor], a: Tensor, b: Tensor | None) -> bool:
    """Whether `compiled_activation` applies: a gradient recorded through a CPU fp32 or bf16 (autocast) activation of
    `ACTIVATIONS` on at least `MIN_ELEMENTS` contiguous elements, outside a `torch.compile` trace (which fuses the
    activation itself), and kernels that built and passed their check against `reference` in that dtype."""
    tensors = (a,) if b is None else (a, b)
    return (activation in ACTIVATIONS and a.device.type == "cpu" and a.dtype in CHECK_TOLERANCES
            and a.numel() >= MIN_ELEMENTS and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
            and all(t.is_contiguous() and t.dtype == a.dtype and t.shape == a.shape for t in tensors)
            and not torch.compiler.is_compiling() and _compiled(activation, reference, a.dtype) is not None)


def compiled_activation(activation: str, a: Tensor, b: Tensor | None = None) -> Tensor:
    """act(a), or act(a) * b, the same values as ATen's activation up to rounding (check `takes_fast_path` first)."""
    return _CompiledActivation.apply(a, b, activation)
