"""QuantLinear's weight-only CPU kernel path (torch._weight_int8pack_mm / _weight_int4pack_mm_for_cpu): agreement
with the dequantise-then-F.linear path, the lazily built kernel tensors and their invalidation, the fallbacks, and
a whole quantised decoder.

Tolerance: the kernel path rounds the activations to bf16 (relative error <= 2^-9 per element), the kernels return
bf16 (another <= 2^-9 of the accumulated dot product), and the int4 kernel takes its per-group scale and offset in
bf16 (<= 2^-9 each). Each is ~2e-3 relative at worst and they mostly average out over a dot product, so the output
is held to 1e-2 of its norm (and of its largest element) against the fp32 reference on the same dequantised weight;
the assertion message gives the error found (a few 1e-3 observed).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lmforge.infer import cpu_kernels
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.infer.quant import KERNEL_MAX_ROWS, QuantConfig, QuantLinear, dequantize_model, quantize_model
from quant_inputs import tiny_decoder, weight_with_edge_rows

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-2
_KERNELS = {8: "_weight_int8pack_mm", 4: "_weight_int4pack_mm_for_cpu"}


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of each weight-only kernel, by bits (after their once-per-process check, whose calls it skips)."""
    assert cpu_kernels.usable(8) and cpu_kernels.usable(4)
    calls = {8: 0, 4: 0}
    for bits, name in _KERNELS.items():
        real = getattr(torch, name)

        def counted(*args, _real=real, _bits=bits):
            calls[_bits] += 1
            return _real(*args)

        monkeypatch.setattr(torch, name, counted)
    return calls


def _layer(in_f: int, out_f: int, bits: int, group_size: int = 32, bias: bool = True, seed: int = 0) -> QuantLinear:
    """A QuantLinear from a weight with an all-positive row (zero point 0: the int8 path's offset term is largest)
    and an all-zero row, plus a random bias."""
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(weight_with_edge_rows(out_f, in_f, seed))
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=torch.Generator().manual_seed(seed + 1)) * 0.1)
    return QuantLinear.from_linear(lin, bits, group_size)


def _reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The dequantise path in fp32: F.linear with the weight the codes stand for."""
    return F.linear(x.float(), layer.dequantized_weight(), layer.bias)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(norm of the error / norm of the reference, largest error / largest reference element)."""
    err = (out.float() - ref).flatten()
    return (err.norm() / ref.norm()).item(), (err.abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("bits,in_f,out_f,group_size,bias,lead", [
    (8, 128, 48, 0, True, (1,)),
    (8, 96, 40, 0, False, (5,)),  # int8 takes any shape
    (8, 256, 64, 0, True, (2, 3)),  # 3-D input [B, T, K]
    (8, 128, 32, 0, True, (KERNEL_MAX_ROWS,)),  # the largest row count the kernel serves
    (4, 128, 48, 32, True, (1,)),
    (4, 256, 32, 64, False, (4,)),
    (4, 256, 64, 128, True, (2, 3)),
    (4, 512, 16, 256, True, (1, 1)),
])
def test_kernel_path_matches_dequantised_linear(kernel_calls, bits, in_f, out_f, group_size, bias, lead):
    layer = _layer(in_f, out_f, bits, group_size or 32, bias)
    assert layer.kernel_supported()
    x = torch.randn(*lead, in_f, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = layer(x)
    assert kernel_calls[bits] == 1 and kernel_calls[12 - bits] == 0
    assert out.shape == (*lead, out_f) and out.dtype == torch.float32
    norm_rel, max_rel = _rel(out, _reference(layer, x))
    assert norm_rel <= TOL and max_rel <= TOL, f"|err| / |ref| = {norm_rel:.1e}, max err / max |ref| = {max_rel:.1e}"
    with torch.no_grad():  # a second call reuses the prepared tensors and gives the same output
        prepared = layer._kernel_args
        assert torch.equal(layer(x), out) and layer._kernel_args is prepared


@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_path_keeps_the_input_dtype(kernel_calls, bits):
    layer = _layer(128, 32, bits)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16 and kernel_calls[bits] == 1
    assert max(_rel(out, _reference(layer, x.bfloat16()))) <= TOL


@pytest.mark.parametrize("bits", [8, 4])
def test_prepared_tensors_follow_load_state_dict_and_in_place_edits(kernel_calls, bits):
    """As a checkpoint load does: an empty shell (used once, so its kernel tensors exist), then codes copied in."""
    src = _layer(128, 32, bits, seed=5)
    shell = QuantLinear(128, 32, True, bits, 32)
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        stale = shell(x)
        shell.load_state_dict(src.state_dict())
        out = shell(x)
        assert not torch.allclose(out, stale)
        assert torch.equal(out, src(x))  # the same codes through the same kernel
        assert max(_rel(out, _reference(src, x))) <= TOL
        shell.scale.mul_(2)  # an in-place edit of a buffer is seen too
        doubled = shell(x)
    assert torch.allclose(doubled - shell.bias, 2 * (out - shell.bias), rtol=1e-5, atol=1e-6)
    assert kernel_calls[bits] == 4


@pytest.mark.parametrize("bits,in_f,out_f,group_size,rows,why", [
    (8, 128, 32, 32, KERNEL_MAX_ROWS + 1, "too many rows"),
    (4, 128, 32, 32, KERNEL_MAX_ROWS + 1, "too many rows"),
    (4, 128, 40, 32, 1, "out_features not a multiple of 16"),
    (4, 128, 32, 16, 1, "group size the kernel does not take"),
])
def test_fallback_is_exactly_the_dequantise_path(kernel_calls, bits, in_f, out_f, group_size, rows, why):
    layer = _layer(in_f, out_f, bits, group_size)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = layer(x)
    assert kernel_calls == {8: 0, 4: 0}, why
    assert torch.equal(out, F.linear(x, layer.dequantized_weight(), layer.bias))


def test_an_input_needing_gradients_takes_the_differentiable_path(kernel_calls):
    layer = _layer(64, 32, 8)
    x = torch.randn(1, 64, requires_grad=True)
    layer(x).sum().backward()
    assert kernel_calls[8] == 0
    assert torch.allclose(x.grad[0], layer.dequantized_weight().sum(0), atol=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
def test_state_dict_is_unchanged_by_a_kernel_forward(kernel_calls, bits):
    layer = _layer(128, 32, bits)
    before = {k: (v.dtype, v.shape, v.clone()) for k, v in layer.state_dict().items()}
    buffers = [n for n, _ in layer.named_buffers()]
    with torch.no_grad():
        layer(torch.randn(1, 128))
    assert kernel_calls[bits] == 1
    after = layer.state_dict()
    assert list(after) == list(before) == ["weight_q", "scale", "zero", "bias"]
    for k, (dtype, shape, value) in before.items():
        assert after[k].dtype == dtype and after[k].shape == shape and torch.equal(after[k], value)
    assert [n for n, _ in layer.named_buffers()] == buffers and not list(layer.parameters())


@pytest.mark.parametrize("bits,group_size", [(8, 64), (4, 32)])
def test_quantised_decoder_decodes_through_the_kernels(kernel_calls, bits, group_size):
    """Greedy generation runs (int4: the layers whose width is not a multiple of 16 fall back), and a one-token
    decode step's logits match the dequantised fp32 model's."""
    model = tiny_decoder()
    quantize_model(model, QuantConfig(bits=bits, group_size=group_size))
    reference = dequantize_model(copy.deepcopy(model))
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.0, stop_at_eos=False)
    prompt = [3, 14, 15, 9, 26]
    assert len(generate_ids(model, prompt, cfg)) == 6
    assert kernel_calls[bits] > 0
    logits = {}
    with torch.inference_mode():
        for name, m in (("quant", model), ("fp32", reference)):
            cache = m.new_cache(1, 16)
            m(torch.tensor([prompt]), cache=cache)
            logits[name] = m(torch.tensor([[7]]), cache=cache)[:, -1]
    assert max(_rel(logits["quant"], logits["fp32"])) <= TOL
