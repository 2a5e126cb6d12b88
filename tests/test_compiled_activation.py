"""The MLP's CPU training fast path (model/compiled_activation.py): tanh-GELU and (gated) SiLU as compiled kernels,
the same values and gradients as ATen's activation and its autograd, taken only where it applies, and not used when
the kernels fail to build or disagree."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from lmforge.config import ModelConfig, PretrainConfig
from lmforge.config_loading import load_config
from lmforge.data.batches import PackedBatches
from lmforge.data.shards import load_shards
from lmforge.model import compiled_activation
from lmforge.model.decoder import DecoderLM
from lmforge.model.layers import MLP, gelu_tanh, set_compiled_activations
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.trainer import train


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


@pytest.mark.parametrize(("activation", "gated", "dtype"), [
    ("gelu_tanh", False, torch.float32), ("silu", True, torch.float32), ("gelu_tanh", True, torch.float32),
    ("silu", False, torch.float32), ("gelu_tanh", False, torch.bfloat16), ("silu", True, torch.bfloat16)])
def test_an_mlp_trains_through_the_kernels_as_through_aten(activation: str, gated: bool, dtype: torch.dtype,
                                                           fast_calls: list[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """In fp32 the same values up to rounding; bf16 autocast's results round from fp32 as ATen's do, and differ from
    them by at most one bf16 step where the fp32 values straddle a rounding boundary."""
    torch.manual_seed(0)
    mlp = MLP(24, 64, activation, gated=gated, bias=not gated)
    set_compiled_activations(mlp, True)
    x = torch.randn(3, 37, 24) * 3  # the tails of the activation as well as its bend
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        fast_out, fast_grads = _gradients(mlp, x)
        assert fast_calls == [activation]
        monkeypatch.setattr(compiled_activation, "takes_fast_path", lambda *args: False)
        out, grads = _gradients(mlp, x)
    assert fast_calls == [activation] and fast_out.dtype == dtype
    rtol = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(fast_out, out, rtol=rtol, atol=rtol * out.abs().max().item())
    for fast, plain in zip(fast_grads, grads, strict=True):
        torch.testing.assert_close(fast, plain, rtol=rtol, atol=rtol * plain.abs().max().item())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_decoder_step_takes_the_kernels_in_every_layer(family: str, fast_calls: list[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(family=family, vocab_size=64, max_seq_len=16, n_layer=2, n_head=2, d_model=32))
    assert set_compiled_activations(model, True) == 2
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
    """No gradient recorded (scoring, decoding), fp16, an activation without a kernel, or too few elements."""
    calls: list[bool] = []
    real = compiled_activation.takes_fast_path
    monkeypatch.setattr(compiled_activation, "takes_fast_path", lambda *args: calls.append(real(*args)) or calls[-1])
    torch.manual_seed(0)
    mlp = MLP(16, 48, "gelu_tanh", gated=False, bias=True)
    set_compiled_activations(mlp, True)
    big = torch.randn(compiled_activation.MIN_ELEMENTS // 48 + 1, 16)
    with torch.no_grad():
        mlp(big)
    mlp.to(torch.float16)(big.half()).sum().backward()
    gelu = MLP(16, 48, "gelu", gated=False, bias=True)
    set_compiled_activations(gelu, True)
    gelu(big).sum().backward()
    mlp.float()(big[:8]).sum().backward()
    assert calls == [False, False, False, False]


def test_kernels_that_fail_to_build_are_not_used(monkeypatch: pytest.MonkeyPatch, fast_calls: list[str]) -> None:
    def no_compiler(*args, **kwargs):
        def fail(*args):
            raise RuntimeError("no C++ compiler")
        return fail

    monkeypatch.setattr(compiled_activation, "_kernels", {})
    monkeypatch.setattr(compiled_activation, "_usable", {})
    monkeypatch.setattr(torch, "compile", no_compiler)
    torch.manual_seed(0)
    mlp = MLP(16, 48, "gelu_tanh", gated=False, bias=True)
    set_compiled_activations(mlp, True)
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

    problem = compiled_activation.kernel_problem("gelu_tanh", gelu_tanh, forward, backward)
    assert problem is not None
    assert problem.startswith("the compiled gelu_tanh kernel's forward (torch.float32) is off by")


def test_the_trainer_switches_them_per_config(tmp_path: Path, shards_dir: Path, fast_calls: list[str]) -> None:
    weights = {}
    for flag in (False, True):
        config = load_config(PretrainConfig, None, {
            "data.dir": str(shards_dir), "train.out_dir": str(tmp_path / str(flag)), "model.vocab_size": 400,
            "model.max_seq_len": 32, "model.n_layer": 1, "model.n_head": 2, "model.d_model": 16,
            "train.progress": False, "train.batch_size": 2, "train.max_steps": 2,
            "train.compile_activations": flag})
        torch.manual_seed(0)
        model = DecoderLM(config.model)
        batches = PackedBatches(load_shards(shards_dir).tokens("train"), 32, 2, seed=0)
        train(model, config.train, batches.batch, causal_lm_loss, run_config=config)
        assert model.blocks[0].mlp.compile_activation is flag
        assert len(fast_calls) == (2 if flag else 0)  # one forward per step
        weights[flag] = model.state_dict()
    for name, tensor in weights[False].items():
        torch.testing.assert_close(weights[True][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
