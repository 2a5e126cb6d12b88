"""The private torch kernels behind int8/int4 decode (infer/cpu_kernels.py): this torch still has each and it computes
the documented product; a removed or changed kernel is caught, named, and QuantLinear falls back with one warning.

When a torch upgrade fails the first two tests, the message names the kernel: adapt infer/cpu_kernels.py to its new
signature or convention (the quantised layers meanwhile run on the slower dequantise path, with the same numbers up
to bf16 rounding). Tolerance: `cpu_kernels.CHECK_TOLERANCE` (1e-2 of the largest output, bf16 rounding is ~2e-3).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from lmforge.infer import cpu_kernels
from lmforge.infer.quant import QuantLinear


@pytest.mark.parametrize("name", cpu_kernels.INT8_KERNELS + cpu_kernels.INT4_KERNELS)
def test_torch_still_has_the_kernel(name: str) -> None:
    assert hasattr(torch, name), (f"torch {torch.__version__} no longer has torch.{name}, which int8/int4 decode "
                                  "calls (infer/cpu_kernels.py)")


@pytest.mark.parametrize("bits", [8, 4])
def test_the_kernels_compute_the_documented_product(bits: int) -> None:
    problem = cpu_kernels.kernel_problem(bits)
    assert problem is None, problem


@pytest.fixture
def recheck():
    """Forget the once-per-process check before and after (a test's monkeypatch is undone before the second)."""
    cpu_kernels.usable.cache_clear()
    yield
    cpu_kernels.usable.cache_clear()


def _changed(name: str, how: str):
    real = getattr(torch, name)
    if how == "raises":
        def kernel(*args):
            raise RuntimeError("unexpected argument\nsecond line")
    elif how == "shape":
        def kernel(*args):
            return real(*args).t()
    else:  # values: e.g. a new zero-point or scale convention
        def kernel(*args):
            return real(*args) * 1.5
    return kernel


_KERNELS_BY_BITS = [(8, name) for name in cpu_kernels.INT8_KERNELS] + [(4, name) for name in cpu_kernels.INT4_KERNELS]
_CHANGES = [(bits, name, how) for bits, name in _KERNELS_BY_BITS for how in ("missing", "raises", "shape", "values")
            if not (how == "shape" and name == "_convert_weight_to_int4pack_for_cpu")]  # its packed shape is opaque


@pytest.mark.parametrize("bits,name,how", _CHANGES)
def test_a_removed_or_changed_kernel_is_named(monkeypatch, bits: int, name: str, how: str) -> None:
    if how == "missing":
        monkeypatch.delattr(torch, name)
    else:
        monkeypatch.setattr(torch, name, _changed(name, how))
    problem = cpu_kernels.kernel_problem(bits)
    assert problem is not None and f"torch.{name}" in problem and "\n" not in problem


def _layer(bits: int) -> QuantLinear:
    linear = torch.nn.Linear(128, 32)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(32, 128, generator=torch.Generator().manual_seed(0)) * 0.1)
    return QuantLinear.from_linear(linear, bits, 32)


@pytest.mark.parametrize("bits,name", [(8, "_weight_int8pack_mm"), (4, "_weight_int4pack_mm_for_cpu")])
def test_quantised_layers_fall_back_with_one_warning(recheck, monkeypatch, bits: int, name: str) -> None:
    monkeypatch.setattr(torch, name, _changed(name, "values"))
    layer = _layer(bits)
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match=f"torch.{name} .*int{bits} layers use the slower dequantise"):
            out = layer(x)
        assert torch.equal(out, F.linear(x, layer.dequantized_weight(), layer.bias))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # checked once per process: no second warning
            assert torch.equal(layer(x), out)
