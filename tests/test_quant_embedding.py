"""A head tied to the token embedding (GPT-2) quantised once: QuantEmbedding looks its rows up in the head's codes.

Tolerance against fp32 (random-init weights, N(0, 0.02)): the min-max step is ~range / (2^b - 1) of a group, so the
per-weight error is ~1% of the weights' spread for int8 (one group per row of 128-512) and ~9% for int4 (groups of
64), compounding over the embedding, 2 blocks and the head. The logits are held to 2e-2 (int8) and 0.25 (int4) of
their norm and largest element; observed ~1.1e-2 and ~0.17. A wrong row or a missing scale is off by ~100%.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open

import lmforge
from lmforge.checkpoint import WEIGHTS_FILE
from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.infer.quant import (
    QuantConfig,
    QuantEmbedding,
    QuantLinear,
    dequantize_model,
    quant_config,
    quantize_model,
)
from lmforge.infer.quantize_stage import quantize_checkpoint
from lmforge.model.decoder import DecoderLM

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {8: 2e-2, 4: 0.25}
VOCAB = 512


def _gpt2(vocab: int = VOCAB, d_model: int = 128, n_layer: int = 2) -> DecoderLM:
    """Linear weights and the embedding are ~97.5% of the parameters (d 128, vocab 512, 2 layers)."""
    torch.manual_seed(0)
    cfg = ModelConfig(family="gpt2", vocab_size=vocab, d_model=d_model, n_head=4, n_layer=n_layer, max_seq_len=64)
    model = DecoderLM(cfg).eval()
    assert model.lm_head.weight is model.tok_emb.weight
    return model


def _ids(vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1))


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The larger of |err| / |ref| and max |err| / max |ref|."""
    err = out - ref
    return max((err.norm() / ref.norm()).item(), (err.abs().max() / ref.abs().max()).item())


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("bits,group_size", [(8, 64), (4, 64), (4, 32)])
def test_embedding_lookup_is_the_heads_dequantised_rows(bits: int, group_size: int):
    model = _gpt2()
    report = quantize_model(model, quant_config(bits, group_size, tied_embedding=True))
    assert report["tied_embedding"] and "lm_head" in report["modules"]
    assert isinstance(model.lm_head, QuantLinear) and isinstance(model.tok_emb, QuantEmbedding)
    assert model.tok_emb.head is model.lm_head
    ids = torch.tensor([[0, 5, VOCAB - 1, 5], [17, 3, 400, 2]])
    rows = model.tok_emb(ids)
    assert rows.shape == (2, 4, 128) and rows.dtype == torch.float32
    assert torch.equal(rows, model.lm_head.dequantized_weight()[ids])  # exactly, not approximately
    assert torch.equal(model.tok_emb(ids[0, 1]), rows[0, 1])  # a 0-d id gives one [d] row
    assert model.device == torch.device("cpu") and model.new_cache(1, 8).keys[0].dtype == torch.float32
    with pytest.raises(IndexError):
        model.tok_emb(torch.tensor([VOCAB]))


@pytest.mark.parametrize("bits", [8, 4])
def test_codes_are_stored_once_and_logits_stay_close_to_fp32(bits: int):
    model = _gpt2()
    ids = _ids()
    ref = _logits(model, ids)
    ref_step = _logits(model, ids[:1, :1])
    report = quantize_model(model, quant_config(bits, 64, tied_embedding=True))
    state = model.state_dict()
    assert not [k for k in state if k.startswith("tok_emb")]
    assert [k for k in state if k.startswith("lm_head")] == ["lm_head.weight_q", "lm_head.scale", "lm_head.zero"]
    assert not list(model.tok_emb.parameters()) and not list(model.tok_emb.buffers()) and not model.tok_emb.state_dict()
    assert [n for n, m in model.named_modules() if isinstance(m, QuantLinear)][-1] == "lm_head"
    # bytes: each tensor of the state once (the codes once), and the fp32 matrix counted once before
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in state.values()}
    assert report["bytes_after"] == sum(unique.values()) == sum(t.numel() * t.element_size() for t in state.values())
    assert report["bytes_before"] == 4 * _gpt2().num_params()
    out, out_step = _logits(model, ids), _logits(model, ids[:1, :1])  # prefill (dequantise) and decode (kernel)
    rel, rel_step = _rel(out, ref), _rel(out_step, ref_step)
    assert rel < TOL[bits] and rel_step < TOL[bits], f"logits vs fp32 {rel:.2e} (prefill), {rel_step:.2e} (one token)"
    # structure check: the same model with every weight dequantised to fp32 computes the same logits
    fp32 = dequantize_model(copy.deepcopy(model))
    assert isinstance(fp32.tok_emb, torch.nn.Embedding) and fp32.tok_emb.weight is fp32.lm_head.weight
    assert torch.allclose(_logits(fp32, ids), out, atol=1e-5)


def _safetensors_bytes(path) -> int:
    return (path / WEIGHTS_FILE).stat().st_size


@pytest.mark.parametrize("bits,floor", [(8, 3.5), (4, 5.5)])
def test_checkpoint_round_trip_and_size(tmp_path, bits: int, floor: float):
    src = lmforge.save(_gpt2(), None, tmp_path / "fp32")
    out, report = quantize_checkpoint(src, tmp_path / f"int{bits}", bits=bits, group_size=64)
    tree = yaml.safe_load((out / "config.yaml").read_text())
    assert tree["quant"]["tied_embedding"] is True
    with safe_open(str(out / WEIGHTS_FILE), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("lm_head.weight_q").shape == (VOCAB, 128 if bits == 8 else 64)
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys)
    assert report["bytes_after"] == stored  # the report counts what is written: the codes once
    assert not [k for k in keys if k.startswith("tok_emb")] and "lm_head.weight_q" in keys
    loaded, _ = lmforge.load(out)
    assert isinstance(loaded.tok_emb, QuantEmbedding) and loaded.tok_emb.head is loaded.lm_head
    in_memory, _ = lmforge.load(src)
    quantize_model(in_memory, quant_config(bits, 64, tied_embedding=True))
    ids = _ids()
    assert torch.equal(_logits(loaded, ids), _logits(in_memory, ids))
    assert torch.equal(_logits(loaded, ids[:1, :1]), _logits(in_memory, ids[:1, :1]))  # the kernel path too
    cfg = SamplingConfig(max_new_tokens=5, temperature=0.0, stop_at_eos=False)
    assert generate_ids(loaded, [3, 1, 4], cfg) == generate_ids(in_memory, [3, 1, 4], cfg)
    ratio = _safetensors_bytes(src) / _safetensors_bytes(out)
    kept, _ = quantize_checkpoint(src, tmp_path / f"int{bits}-fp32-emb", bits=bits, tied_embedding=False)
    kept_ratio = _safetensors_bytes(src) / _safetensors_bytes(kept)
    assert ratio >= floor and kept_ratio < floor, f"{ratio:.2f}x smaller ({kept_ratio:.2f}x, tied embedding fp32)"
    assert report["bytes_before"] / report["bytes_after"] == pytest.approx(ratio, rel=0.03)  # + file headers


def test_config_without_the_field_loads_the_embedding_fp32(tmp_path):
    """A `quant:` section written before `tied_embedding` existed: the tied pair was fp32, and is rebuilt so."""
    src = lmforge.save(_gpt2(), None, tmp_path / "fp32")
    out, report = quantize_checkpoint(src, tmp_path / "int8", bits=8, tied_embedding=False)
    assert not report["tied_embedding"] and "lm_head" not in report["modules"]
    config = out / "config.yaml"
    tree = yaml.safe_load(config.read_text())
    assert tree["quant"].pop("tied_embedding") is False
    config.write_text(yaml.safe_dump(tree))  # as the old writer wrote it
    assert QuantConfig.model_validate(tree["quant"]).tied_embedding is False
    with safe_open(str(out / WEIGHTS_FILE), "pt") as f:
        assert "tok_emb.weight" in f.keys() and "lm_head.weight_q" not in f.keys()
    loaded, _ = lmforge.load(out)
    assert type(loaded.tok_emb) is torch.nn.Embedding and type(loaded.lm_head) is torch.nn.Linear
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    assert isinstance(loaded.blocks[0].attn.q, QuantLinear)
    in_memory, _ = lmforge.load(src)
    quantize_model(in_memory, quant_config(8))  # the default: tied pair left alone
    assert type(in_memory.tok_emb) is torch.nn.Embedding
    assert torch.equal(_logits(loaded, _ids()), _logits(in_memory, _ids()))


def test_cli_opt_out_keeps_the_embedding_fp32(tmp_path, capsys):
    src = lmforge.save(_gpt2(), None, tmp_path / "fp32")
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    assert "--keep-fp32-embedding" in capsys.readouterr().out
    assert main(["quantize", str(src), "--bits", "4", "--out", str(tmp_path / "kept"), "--keep-fp32-embedding"]) == 0
    assert main(["quantize", str(src), "--bits", "4", "--out", str(tmp_path / "default")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "tied embedding" not in printed[0] and "(with the tied embedding)" in printed[1]
    kept, _ = lmforge.load(tmp_path / "kept")
    assert type(kept.tok_emb) is torch.nn.Embedding and kept.lm_head.weight is kept.tok_emb.weight
    assert yaml.safe_load((tmp_path / "kept" / "config.yaml").read_text())["quant"]["tied_embedding"] is False
    default, _ = lmforge.load(tmp_path / "default")
    assert isinstance(default.tok_emb, QuantEmbedding) and isinstance(default.lm_head, QuantLinear)
    assert _safetensors_bytes(tmp_path / "default") < _safetensors_bytes(tmp_path / "kept")


def test_untied_model_is_unchanged_by_the_flag(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=256, d_model=64, n_head=4, n_layer=2, max_seq_len=64)
    base = DecoderLM(cfg).eval()
    assert base.lm_head.weight is not base.tok_emb.weight
    models, reports = [], []
    for tied in (False, True):
        model = copy.deepcopy(base)
        reports.append(quantize_model(model, quant_config(8, tied_embedding=tied)))
        models.append(model)
    assert reports[0] == reports[1] and not reports[1]["tied_embedding"] and "lm_head" in reports[1]["modules"]
    a, b = (m.state_dict() for m in models)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a) and "tok_emb.weight" in a
    assert all(type(m.tok_emb) is torch.nn.Embedding for m in models)
    ids = _ids(256)
    assert torch.equal(_logits(models[0], ids), _logits(models[1], ids))
    out, _ = quantize_checkpoint(lmforge.save(base, None, tmp_path / "fp32"), tmp_path / "int8")
    assert yaml.safe_load((out / "config.yaml").read_text())["quant"]["tied_embedding"] is False  # what was done
    assert type(lmforge.load(out)[0].tok_emb) is torch.nn.Embedding


def test_targets_without_the_head_leave_the_tied_pair_fp32():
    model = _gpt2()
    report = quantize_model(model, quant_config(8, targets=["attn.q"], tied_embedding=True))
    assert report["modules"] == ["blocks.0.attn.q", "blocks.1.attn.q"] and not report["tied_embedding"]
    assert type(model.tok_emb) is torch.nn.Embedding and model.lm_head.weight is model.tok_emb.weight


def test_int4_head_with_a_vocab_not_a_multiple_of_16_takes_the_padded_kernel(monkeypatch):
    """GPT-2's 50257-token head: without padding its int4 kernel copy the head would dequantise every step."""
    calls = []
    real = torch._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", lambda *a: calls.append(1) or real(*a))
    lin = torch.nn.Linear(128, 1000, bias=True)  # 1000 % 16 == 8
    layer = QuantLinear.from_linear(lin, 4, 64)
    assert layer.kernel_supported()
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = layer(x)
    assert calls and out.shape == (2, 1000)
    assert _rel(out, F.linear(x, layer.dequantized_weight(), layer.bias)) < 1e-2  # the kernels' bf16 rounding
