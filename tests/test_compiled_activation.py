"""The MLP's CPU training fast path (model/compiled_activation.py): tanh-GELU and (gated) SiLU as compiled kernels,
the same values and gradients as ATen's activation and its autograd, taken only where it applies, and not used when
the kernels fail to build or disagree."""

from __future__ import annotations

import warnings

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.model import compiled_activation
from lmforge.model.decoder import DecoderLM
from lmforge.model.layers import MLP


@pytest.fixture
def fast_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The activation of each call that took the compiled path; every size qualifies."""
    monkeypatch.setattr(compiled_activation, "MIN_ELEMENTS", 0)
    calls: list[str] = []
    real = compiled_activation.compiled_activation

    def spy(activation, a, b=None):
        calls.append(activation)
        return real(activation, a, b)

    monkeypatch.setattr(compiled_activation, "compiled_activation", spy)
    return calls


def _gradients(model: torch.nn.Module, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    out = model(*inputs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(("activation", "gated"), [("gelu_tanh", False), ("silu", True), ("gelu_tanh", True),
                                                   ("silu", False)])
def test_an_mlp_trains_through_the_kernels_as_through_aten(activation: str, gated: bool, fast_calls: list[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    mlp = MLP(24, 64, activation, gated=gated, bias=not gated)
    x = torch.randn(3, 37, 24) * 3  # the tails of the activation as well as its bend
    fast_out, fast_grads = _gradients(mlp, x)
    assert fast_calls == [activation]
    monkeypatch.setattr(compiled_activation, "takes_fast_path", lambda *args: False)
    out, grads = _gradients(mlp, x)
    assert fast_calls == [activation]
    torch.testing.assert_close(fast_out, out, rtol=1e-5, atol=1e-6)
    for fast, plain in zip(fast_grads, grads, strict=True):
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_decoder_step_takes_the_kernels_in_every_layer(family: str, fast_calls: list[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(family=family, vocab_size=64, max_seq_len=16, n_layer=2, n_head=2, d_model=32))
    ids = torch.randint(0, 64, (2, 16))
    fast_out, fast_grads = _gradients(model, ids)
    assert len(fast_calls) == 2
    monkeypatch.setattr(compiled_activation, "takes_fast_path", lambda *args: False)
    out, grads = _gradients(model, ids)
    torch.testing.assert_close(fast_out, out, rtol=1e-5, atol=1e-5)
    scale = max(g.abs().max().item() for g in grads)  # some gradients are ~0 by symmetry (the keys' bias)
    for fast, plain in zip(fast_grads, grads, strict=True):
        torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5 * scale)


def test_the_eager_path_where_the_kernels_do_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """No gradient recorded (scoring, decoding), bf16, an activation without a kernel, or too few elements."""
    calls: list[bool] = []
    real = compiled_activation.takes_fast_path
    monkeypatch.setattr(compiled_activation, "takes_fast_path", lambda *args: calls.append(real(*args)) or calls[-1])
    torch.manual_seed(0)
    mlp = MLP(16, 48, "gelu_tanh", gated=False, bias=True)
    big = torch.randn(compiled_activation.MIN_ELEMENTS // 48 + 1, 16)
    with torch.no_grad():
        mlp(big)
    mlp.to(torch.bfloat16)(big.bfloat16()).sum().backward()
    MLP(16, 48, "gelu", gated=False, bias=True)(big).sum().backward()
    mlp.float()(big[:8]).sum().backward()
    assert calls == [False, False, False, False]


def test_kernels_that_fail_to_build_are_not_used(monkeypatch: pytest.MonkeyPatch, fast_calls: list[str]) -> None:
    def no_compiler(*args, **kwargs):
        def fail(*args):
            raise RuntimeError("no C++ compiler")
        return fail

    monkeypatch.setattr(compiled_activation, "_kernels", {})
    monkeypatch.setattr(torch, "compile", no_compiler)
    torch.manual_seed(0)
    mlp = MLP(16, 48, "gelu_tanh", gated=False, bias=True)
    x = torch.randn(4, 16)
    with pytest.warns(RuntimeWarning, match="could not build the gelu_tanh kernel: RuntimeError: no C"):
        out = mlp(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process, not per call
        mlp(x).sum().backward()
    assert fast_calls == []
    torch.testing.assert_close(out, mlp.down(torch.nn.functional.gelu(mlp.up(x), approximate="tanh")))


def test_the_check_catches_a_wrong_kernel() -> None:
    def forward(a, b):
        return a * torch.sigmoid(a) if b is None else a * torch.sigmoid(a) * b  # SiLU, not GELU

    def backward(grad, a, b):
        return grad, None if b is None else grad

    problem = compiled_activation.kernel_problem("gelu_tanh", forward, backward)
    assert problem is not None and problem.startswith("the compiled gelu_tanh kernel's forward is off by")
