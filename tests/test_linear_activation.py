"""The MLP's inference fast path (model/linear_activation.py, entered with `fused_activations`): the first projection
and its activation in one oneDNN call, the same values as Linear then the activation, taken only where it applies,
and not used when the private kernel fails its check."""

from __future__ import annotations

import warnings

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.model import layers, linear_activation
from lmforge.model.decoder import DecoderLM
from lmforge.model.layers import MLP, fused_activations


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each MLP call inside `fused_activations` took the fused path."""
    calls: list[bool] = []
    real = linear_activation.linear_activation

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(layers, "linear_activation", spy)
    return calls


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # GELU (tanh) MLP; gated SiLU (SwiGLU)
def test_fused_activations_give_the_plain_forward(family: str, fused_calls: list[bool]) -> None:
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(family=family, vocab_size=100, max_seq_len=32, n_layer=2, n_head=2,
                                  d_model=32)).eval()
    ids = torch.randint(0, 100, (3, 20))
    with torch.inference_mode():
        plain = model(ids)
        with fused_activations(model):
            fused = model(ids)
        after = model(ids)
    assert fused_calls == [True, True]  # both layers fused; none outside the context
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, plain)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_each_activation_the_kernel_takes(activation: str, fused_calls: list[bool]) -> None:
    torch.manual_seed(0)
    mlp = MLP(16, 48, activation, gated=False, bias=True).eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        plain = mlp(x)
        with fused_activations(mlp):
            fused = mlp(x)
    assert fused_calls == [True]
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


def test_the_plain_path_where_fusing_does_not_apply(fused_calls: list[bool]) -> None:
    """Fewer than MIN_ROWS rows (a one-row decode step), a gradient to record, or bf16: Linear then activation."""
    torch.manual_seed(0)
    mlp = MLP(16, 48, "gelu_tanh", gated=False, bias=True)
    with fused_activations(mlp):
        with torch.no_grad():
            mlp(torch.randn(1, linear_activation.MIN_ROWS - 1, 16))
        out = mlp(torch.randn(2, 9, 16))
        out.sum().backward()  # the training path: a gradient reaches the weights
        with torch.no_grad():
            mlp.to(torch.bfloat16)(torch.randn(2, 9, 16, dtype=torch.bfloat16))
    assert fused_calls == [False, False, False]
    assert mlp.up.weight.grad is not None


def test_a_kernel_failing_its_check_is_not_used(monkeypatch: pytest.MonkeyPatch, fused_calls: list[bool]) -> None:
    monkeypatch.setattr(linear_activation, "_usable", {})
    monkeypatch.setattr(linear_activation, "kernel_problem", lambda activation, reference: "broken kernel")
    torch.manual_seed(0)
    mlp = MLP(16, 48, "gelu_tanh", gated=False, bias=True).eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad(), fused_activations(mlp):
        with pytest.warns(RuntimeWarning, match="broken kernel"):
            out = mlp(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mlp(x)  # checked once per process: no second warning
    assert fused_calls == [False, False]
    with torch.no_grad():
        assert torch.equal(out, mlp(x))


def test_the_kernel_passes_its_check_here() -> None:
    """On the CPUs lmforge supports (x86 with AVX-512 or AVX2), the fused op exists and computes each activation."""
    for activation in linear_activation.ONEDNN_ACTIVATIONS:
        assert linear_activation.kernel_problem(activation, layers.ACTIVATIONS[activation]) is None, activation
