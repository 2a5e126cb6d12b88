"""Weight-only int8 / int4 quantisation: the affine scheme's error bound, packing, QuantLinear, whole checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open

import lmforge
from lmforge.checkpoint import WEIGHTS_FILE
from lmforge.errors import ConfigError
from lmforge.infer.quant import (
    QuantConfig,
    QuantLinear,
    affine_dequantize,
    affine_quantize,
    dequantize_model,
    pack_int4,
    quant_config,
    quantize_model,
    unpack_int4,
)
from lmforge.infer.quantize_stage import quantize_checkpoint
from lmforge.model.decoder import DecoderLM
from quant_inputs import tiny_decoder, weight_with_edge_rows

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_error_at_most_half_a_step(bits: int):
    w = weight_with_edge_rows()
    groups = w.view(16, -1, 32) if bits == 4 else w  # int4: groups of 32 along the input
    q, delta, zero = affine_quantize(groups, bits)
    assert q.dtype == torch.uint8 and int(q.max()) <= 2**bits - 1 and int(zero.max()) <= 2**bits - 1
    err = (affine_dequantize(q, delta, zero) - groups).abs()
    assert torch.all(err <= delta[..., None] / 2 + 1e-7)
    assert torch.all(err[1] == 0)  # zero is exactly representable
    lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    assert torch.allclose(delta[2:], (hi - lo)[2:] / (2**bits - 1))


def test_int4_pack_round_trip_and_code_range():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert torch.equal(packed[0, 0], codes[0, 0] | (codes[0, 1] << 4))  # low nibble first
    layer = QuantLinear.from_linear(torch.nn.Linear(128, 16), 4, 32)
    unpacked = unpack_int4(layer.weight_q)
    assert unpacked.shape == (16, 128) and 0 <= int(unpacked.min()) and int(unpacked.max()) <= 15
    assert layer.scale.shape == layer.zero.shape == (16, 4)


@pytest.mark.parametrize("bits", [8, 4])
def test_quant_linear_forward_is_linear_with_the_dequantised_weight(bits: int):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48)
    layer = QuantLinear.from_linear(lin, bits, 64)
    x = torch.randn(3, 7, 128)
    w = layer.dequantized_weight()
    assert torch.allclose(layer(x), F.linear(x, w, lin.bias), atol=1e-6)
    # and the dequantised weight is within half a step of the original, per channel (int8) or group (int4)
    step = layer.scale[:, None] if bits == 8 else layer.scale.repeat_interleave(64, dim=1)
    assert torch.all((w - lin.weight).abs() <= step / 2 + 1e-7)


def _nll(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()


def _trained_tiny() -> tuple[DecoderLM, torch.Tensor]:
    """A tiny Llama trained for a few steps on a fixed periodic batch, so its perplexity is well below chance."""
    model = tiny_decoder().train()
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([(torch.arange(33) * k + torch.randint(0, 64, (1,), generator=g)) % 64 for k in (1, 3, 5, 7)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), ids


def test_int8_logits_and_perplexity_close_to_fp32():
    model, ids = _trained_tiny()
    with torch.no_grad():
        ref = model(ids[:, :-1])
    ppl = math.exp(_nll(model, ids))
    report = quantize_model(model, quant_config(8))
    assert len(report["modules"]) == 2 * 7 + 1  # q k v o up gate down per block, and the untied head
    assert isinstance(model.lm_head, QuantLinear) and isinstance(model.tok_emb, torch.nn.Embedding)
    with torch.no_grad():
        out = model(ids[:, :-1])
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    ppl8 = math.exp(_nll(model, ids))
    figures = f"int8: max |dlogit| / max |logit| = {rel:.2e}; ppl fp32 {ppl:.3f} -> int8 {ppl8:.3f}"
    assert ppl < 32, figures  # trained: well below chance (64)
    assert rel < 0.01, figures  # bound: 1% of the largest logit
    assert abs(ppl8 / ppl - 1) < 0.01, figures
    dequantize_model(model)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(ids[:, :-1]), out, atol=1e-5)


def test_tied_head_is_not_quantised():
    model = tiny_decoder(family="gpt2")
    report = quantize_model(model, quant_config(4, 32))
    assert "lm_head" not in report["modules"] and isinstance(model.lm_head, torch.nn.Linear)
    assert model.lm_head.weight is model.tok_emb.weight
    assert isinstance(model.blocks[0].attn.q, QuantLinear) and isinstance(model.blocks[0].mlp.down, QuantLinear)
    only = tiny_decoder(family="gpt2")
    names = quantize_model(only, quant_config(8, targets=["attn.q"]))["modules"]
    assert names == ["blocks.0.attn.q", "blocks.1.attn.q"]


def _dir_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


def test_checkpoint_sizes_round_trip_and_perplexity(tmp_path):
    model = tiny_decoder(d_model=256, n_layer=4, vocab=256)  # Linear weights are ~98% of the parameters
    src = lmforge.save(model, None, tmp_path / "fp32")
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    nll = _nll(model, ids)
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    n_lin, n_rows = sum(w.numel() for w in linears), sum(w.shape[0] for w in linears)
    n_other = model.num_params() - n_lin  # the fp32 embedding and norms, ~2% here
    # expected ratio: codes (1 byte, or 1/2 for int4) + fp32 scale and uint8 zero per row / 64-group; the rest fp32
    expected = {8: 4 * (n_lin + n_other) / (n_lin + 5 * n_rows + 4 * n_other),
                4: 4 * (n_lin + n_other) / (n_lin / 2 + 5 * n_lin / 64 + 4 * n_other)}
    for bits, floor in [(8, 3.6), (4, 6.0)]:
        out, report = quantize_checkpoint(src, tmp_path / f"int{bits}", bits=bits, group_size=64)
        tree = yaml.safe_load((out / "config.yaml").read_text())
        assert tree["quant"]["bits"] == bits and tree["model"]["d_model"] == 256
        with safe_open(str(out / WEIGHTS_FILE), "pt") as f:
            assert f.get_tensor("blocks.0.attn.q.weight_q").dtype == torch.uint8
            assert f.get_tensor("blocks.0.attn.q.weight_q").shape == (256, 256 if bits == 8 else 128)
        loaded, _ = lmforge.load(out)  # rebuilds the QuantLinear shells from config.yaml's quant section
        assert isinstance(loaded.blocks[3].mlp.gate, QuantLinear) and loaded.blocks[3].mlp.gate.bits == bits
        ratio = _dir_bytes(src) / _dir_bytes(out)
        assert report["bytes_before"] / report["bytes_after"] == pytest.approx(ratio, rel=0.01)
        assert ratio == pytest.approx(expected[bits], rel=0.01) and ratio > floor  # 3.71x and 6.18x here
        dnll = _nll(loaded, ids) - nll
        assert abs(dnll) < (1e-3 if bits == 8 else 2e-2), f"int{bits}: nll change {dnll:+.2e}"


def test_bad_configs_raise_config_error():
    with pytest.raises(ConfigError, match="bits must be 8 or 4"):
        quant_config(bits=3)
    with pytest.raises(ConfigError, match="bits must be 8 or 4"):
        quantize_model(tiny_decoder(), QuantConfig(bits=16))
    with pytest.raises(ConfigError, match="even"):
        quant_config(bits=4, group_size=5)
    model = tiny_decoder(d_model=64)
    with pytest.raises(ConfigError, match="does not divide the input dimension 64"):
        quantize_model(model, quant_config(4, 48))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # nothing half-swapped
    with pytest.raises(ConfigError, match="match no nn.Linear"):
        quantize_model(model, quant_config(8, targets=["nope"]))
