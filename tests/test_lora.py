"""LoRA / DoRA / PiSSA / QLoRA: exact start at the base, merge, adapter mixing, NF4, and parity with HF peft.

Parity means max abs logit difference <= 1e-4 (fp32, eval mode, random ids, batch 2, length 12) between lmforge
and `peft.PeftModel` on the same weights, with adapters moved off their zero init so that they matter.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from lmforge.config import ModelConfig, PeftConfig, TrainConfig
from lmforge.errors import CheckpointError, ConfigError
from lmforge.model.decoder import DecoderLM
from lmforge.peft.export import export_peft
from lmforge.peft.lora import (
    LoRALinear,
    apply_lora,
    base_nbytes,
    lora_layers,
    merge_lora,
    set_adapter,
    trainable_summary,
)
from lmforge.peft.lora_files import load_adapter, lora_state_dict, save_adapter
from lmforge.peft.nf4 import NF4, dequantize_scales, nf4_dequantize, nf4_quantize, quantize_scales
from lmforge.train.trainer import build_optimizer

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # peft reads transformers' deprecated `is_gradient_checkpointing`: their warning, not ours, kept off the summary
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

ATOL = 1e-4
VOCAB = 64
# QLoRA (Dettmers et al. 2023, appendix) / bitsandbytes NF4 table
NF4_TABLE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]
HALF_GAP = max(b - a for a, b in zip(NF4_TABLE, NF4_TABLE[1:], strict=False)) / 2


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _model(family: str = "llama", d_model: int = 32, n_layer: int = 2) -> DecoderLM:
    kv = {"n_kv_head": 2} if family == "llama" else {}
    cfg = ModelConfig(family=family, vocab_size=VOCAB, d_model=d_model, n_head=4, n_layer=n_layer, max_seq_len=32,
                      **kv)
    model = DecoderLM(cfg).eval()
    with torch.no_grad():  # biases 0 and norms 1 at init: perturb so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12))


@torch.no_grad()
def _train_a_little(model: nn.Module, name: str = "default") -> None:
    """Stand-in for training: move every adapter tensor off its init."""
    for layer in (m for m in lora_layers(model).values() if name in m.cfgs):
        layer.lora_B[name].normal_(0, 0.1)
        layer.lora_A[name].add_(torch.randn_like(layer.lora_A[name]) * 0.1)
        if name in layer.lora_magnitude:
            layer.lora_magnitude[name].mul_(1 + 0.2 * torch.rand_like(layer.lora_magnitude[name]))


# ---------------------------------------------------------------------------------------------
# NF4
# ---------------------------------------------------------------------------------------------


def test_nf4_levels_are_qloras():
    assert torch.allclose(NF4, torch.tensor(NF4_TABLE), atol=2e-7, rtol=0)


def test_nf4_round_trip_error_and_size():
    w = torch.randn(48, 96) * 0.05
    w[3, 7] = 1.5  # an outlier only hurts its own group
    packed, scales, shape = nf4_quantize(w, 64)
    assert packed.dtype == torch.uint8 and packed.numel() == w.numel() // 2 and scales.numel() == w.numel() // 64
    assert (packed.numel() + scales.numel() * 4) * 8 / w.numel() == 4.5  # 4 bits + one fp32 absmax per 64
    err = (nf4_dequantize(packed, scales, shape) - w).abs().view(-1, 64)
    # nearest-level rounding: at most half the widest gap between adjacent levels, times the group's absmax
    assert (err <= HALF_GAP * scales[:, None] + 1e-7).all()
    odd = torch.randn(5, 7)  # 35 values: padded to whole groups, cropped back
    assert nf4_dequantize(*nf4_quantize(odd, 8)).shape == (5, 7)


def test_double_quant_shrinks_scales_within_bound():
    w = torch.randn(256, 256) * 0.02
    packed, scales, shape = nf4_quantize(w, 64)
    codes, absmax, mean = quantize_scales(scales)
    assert codes.dtype == torch.int8 and codes.numel() == scales.numel() == 1024 and absmax.numel() == 4
    dq_bytes = codes.numel() + (absmax.numel() + 1) * 4
    assert dq_bytes < scales.numel() * 4 / 3.5  # 1044 bytes instead of 4096: 0.13 instead of 0.5 bits/weight
    restored = dequantize_scales(codes, absmax, mean)
    scale_err = (restored - scales).abs()
    assert (scale_err <= absmax.repeat_interleave(256) / 127 / 2 + 1e-7).all()  # int8 rounding
    err = (nf4_dequantize(packed, restored, shape) - w).abs().view(-1, 64)
    assert (err <= HALF_GAP * scales[:, None] + scale_err[:, None] + 1e-7).all()  # |level| <= 1
    plain = LoRALinear(nn.Linear(256, 256), quantize=True, group_size=64)
    double = LoRALinear(nn.Linear(256, 256), quantize=True, group_size=64, double_quant=True)
    assert plain.base_nbytes == 256 * 256 // 2 + 4096 and double.base_nbytes == 256 * 256 // 2 + dq_bytes


# ---------------------------------------------------------------------------------------------
# Layers and surgery
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "qlora"])
def test_training_starts_at_the_base(method: str):
    model, ids = _model(), _ids()
    with torch.no_grad():
        ref = model(ids)
    names = apply_lora(model, PeftConfig(r=4, method=method, targets=["attn", "mlp"], qlora_group_size=32))
    assert len(names) == 2 * 7 and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    with torch.no_grad():
        out = model(ids)
    if method in ("lora", "dora"):  # B = 0 (and DoRA's magnitude = the norm): bit-identical
        assert torch.equal(out, ref)
    elif method == "pissa":  # W_res + s B A = W0 up to fp32 rounding
        assert (out - ref).abs().max() <= 1e-5
    else:  # NF4 costs ~9% relative (L2) error per Gaussian weight matrix; 14 of them move the logits by <= 20%
        assert 0 < (out - ref).norm() / ref.norm() <= 0.2


@pytest.mark.parametrize("method", ["lora", "dora", "pissa"])
def test_merge_unmerge_exact(method: str):
    model, ids = _model(), _ids()
    apply_lora(model, PeftConfig(r=4, method=method, targets=["attn", "mlp"]))
    _train_a_little(model)
    layers = lora_layers(model)
    before = {n: m.weight.detach().clone() for n, m in layers.items()}
    with torch.no_grad():
        out = model(ids)
        for m in layers.values():
            m.merge()
        merged = model(ids)
    assert not torch.equal(layers["blocks.0.attn.q"].weight, before["blocks.0.attn.q"])
    assert (merged - out).abs().max() <= 1e-5
    for m in layers.values():
        m.unmerge()
    assert all(torch.equal(m.weight, before[n]) for n, m in layers.items())  # bit-for-bit
    with torch.no_grad():
        assert torch.equal(model(ids), out)


def test_qlora_layer_refuses_in_place_merge_but_merge_lora_dequantises():
    model, ids = _model(), _ids()
    apply_lora(model, PeftConfig(r=4, method="qlora", qlora_group_size=32, qlora_double_quant=True))
    _train_a_little(model)
    with pytest.raises(ConfigError, match="NF4"):
        lora_layers(model)["blocks.0.attn.q"].merge()
    with torch.no_grad():
        out = model(ids)
        merged = merge_lora(model)(ids)
    assert not lora_layers(model) and isinstance(model.blocks[0].attn.q, nn.Linear)
    assert (merged - out).abs().max() <= 1e-5


def test_adapters_hot_swap_and_mix_as_the_math_says():
    base = nn.Linear(16, 12)
    layer = LoRALinear(base)
    cfg_a, cfg_b = PeftConfig(r=2, alpha=4), PeftConfig(r=3, alpha=3, method="dora")
    layer.add_adapter("a", cfg_a)
    layer.add_adapter("b", cfg_b)
    with torch.no_grad():
        for name in "ab":
            layer.lora_B[name].normal_()
        layer.lora_magnitude["b"].mul_(1.3)
    W, b, x = base.weight.detach(), base.bias.detach(), torch.randn(5, 16)
    A, B = layer.lora_A, layer.lora_B
    lora_a = x @ (2.0 * B["a"] @ A["a"]).T
    w_b = W + 1.0 * B["b"] @ A["b"]  # DoRA: m * (W0 + s B A) / ||W0 + s B A||_c, norms per output row
    dora_b = x @ (layer.lora_magnitude["b"][:, None] * w_b / w_b.norm(dim=1, keepdim=True)).T - x @ W.T
    plain = x @ W.T + b
    cases = [(["a"], None, plain + lora_a), (["b"], None, plain + dora_b), ([], None, plain),
             (["a", "b"], [0.3, -0.7], plain + 0.3 * lora_a - 0.7 * dora_b)]
    with torch.no_grad():
        for names, weights, expected in cases:
            layer.set_active(names, weights)
            assert (layer(x) - expected).abs().max() <= 1e-5
            layer.merge()
            assert (layer(x) - expected).abs().max() <= 1e-5
            layer.unmerge()
    with pytest.raises(ConfigError, match="unknown adapter"):
        layer.set_active(["c"])


def test_set_adapter_swaps_across_the_model():
    model, ids = _model(), _ids()
    with torch.no_grad():
        ref = model(ids)
    apply_lora(model, PeftConfig(r=4), "a")
    apply_lora(model, PeftConfig(r=2, targets=["attn.q", "mlp"]), "b")
    _train_a_little(model, "a")
    _train_a_little(model, "b")
    with torch.no_grad():
        only_b = model(ids)  # apply_lora left b active where it sits, nothing elsewhere
        set_adapter(model, ["a"])
        only_a = model(ids)
        set_adapter(model, [])
        assert torch.equal(model(ids), ref)
    q = model.blocks[0].attn.q
    assert q.active == [] and set(q.cfgs) == {"a", "b"}
    assert not torch.allclose(only_a, only_b, atol=1e-2)


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_optimizer_sees_only_the_adapter(method: str):
    model = _model()
    n_base = sum(p.numel() for p in model.parameters())
    apply_lora(model, PeftConfig(r=4, method=method, qlora_group_size=32))
    adapter = {id(p) for m in lora_layers(model).values() for p in m.adapter_parameters("default")}
    optimizer = build_optimizer(model, TrainConfig())
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == adapter
    # q, o: 32 -> 32; k, v: 32 -> 16 (GQA); A is r x in, B is out x r, DoRA adds a magnitude per output
    per_layer = 4 * (32 + 32) * 2 + 4 * (32 + 16) * 2 + (32 * 2 + 16 * 2 if method == "dora" else 0)
    trainable, total, percent = trainable_summary(model)
    assert trainable == 2 * per_layer and total == n_base + trainable
    assert math.isclose(percent, 100 * trainable / total)
    model(_ids()).sum().backward()
    assert all((p.grad is not None) == (id(p) in adapter) for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Parity with Hugging Face peft
# ---------------------------------------------------------------------------------------------


def _hf_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "hf")
    return hf


@pytest.mark.parametrize("family,method,targets", [
    ("llama", "lora", ["attn", "mlp"]), ("llama", "dora", ["attn", "mlp"]), ("llama", "pissa", ["attn", "mlp"]),
    ("llama", "qlora", ["attn"]), ("gpt2", "lora", ["attn", "mlp"]), ("gpt2", "dora", ["attn.q", "attn.v", "mlp"]),
    ("gpt2", "pissa", ["attn.k", "attn.o"]),
])
def test_peft_parity(tmp_path, family: str, method: str, targets: list[str]):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from lmforge.model.hf import load_hf

    ids = _ids()
    if family == "llama":  # HF -> lmforge; the untouched HF model serves as peft's base where the base is W0
        hf = _hf_llama(tmp_path)
        model = load_hf(tmp_path / "hf")[0]
    else:  # lmforge -> HF
        hf, model = None, _model("gpt2")
    cfg = PeftConfig(r=4, alpha=8, method=method, targets=targets, qlora_group_size=32)
    apply_lora(model, cfg)
    with torch.no_grad():
        before = model(ids)
    _train_a_little(model)
    with torch.no_grad():
        ours = model(ids)
    assert (ours - before).abs().max() > 1e-2  # the adapter matters
    export_peft(model, None, tmp_path / "peft", cfg)
    exported = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert exported["use_dora"] == (method == "dora") and exported["r"] == (8 if method == "pissa" else 4)
    if hf is None or method in ("pissa", "qlora"):  # the base peft needs is W_res + s B0 A0 or the NF4 weights
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base").eval()
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    with torch.no_grad():
        assert (theirs(ids).logits - ours).abs().max() <= ATOL


def test_dora_gradients_match_peft(tmp_path):
    """DoRA treats ||W0 + s B A||_c as a constant in backprop (Liu et al. 2024 sec. 4.3); so must the gradients."""
    peft = pytest.importorskip("peft")

    from lmforge.model.hf import load_hf

    hf = _hf_llama(tmp_path)
    model = load_hf(tmp_path / "hf")[0]
    cfg = PeftConfig(r=4, alpha=8, method="dora", targets=["attn.q", "mlp.down"])
    apply_lora(model, cfg)
    _train_a_little(model)
    export_peft(model, None, tmp_path / "peft", cfg)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "peft", is_trainable=True).eval()
    ids = _ids()
    model(ids).pow(2).mean().backward()
    theirs(ids).logits.pow(2).mean().backward()
    pairs = [(model.blocks[1].attn.q, hf.model.layers[1].self_attn.q_proj), (model.blocks[0].mlp.down,
                                                                              hf.model.layers[0].mlp.down_proj)]
    for ours, ref in pairs:
        for mine, other in ((ours.lora_A, ref.lora_A["default"].weight), (ours.lora_B, ref.lora_B["default"].weight),
                            (ours.lora_magnitude, ref.lora_magnitude_vector["default"].weight)):
            grad = mine["default"].grad
            assert grad.abs().max() > 0 and (grad - other.grad).abs().max() <= 1e-4 * grad.abs().max()


def test_pissa_init_matches_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from lmforge.model.hf import load_hf

    _hf_llama(tmp_path)
    model = load_hf(tmp_path / "hf")[0]
    apply_lora(model, PeftConfig(r=4, alpha=8, method="pissa", targets=["attn.q", "attn.v"]))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa",
                                                     target_modules=["q_proj", "v_proj"])).eval()
    for i in range(2):
        for ours_name, hf_name in (("q", "q_proj"), ("v", "v_proj")):
            ours, ref = getattr(model.blocks[i].attn, ours_name), getattr(hf.model.layers[i].self_attn, hf_name)
            assert (ours.lora_A["default"] - ref.lora_A["default"].weight).abs().max() <= 1e-5
            assert (ours.lora_B["default"] - ref.lora_B["default"].weight).abs().max() <= 1e-5
            assert (ours.weight - ref.base_layer.weight).abs().max() <= 1e-6  # the residual base
    ids = _ids()
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids)).abs().max() <= ATOL


# ---------------------------------------------------------------------------------------------
# Saving, loading, merging, errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "qlora"])
def test_save_load_round_trip_then_merge(tmp_path, method: str):
    model, ids = _model(), _ids()
    base = copy.deepcopy(model)
    cfg = PeftConfig(r=4, method=method, targets=["attn", "mlp"], qlora_group_size=32, qlora_double_quant=True)
    apply_lora(model, cfg)
    _train_a_little(model)
    save_adapter(model, tmp_path / "adapter", cfg)
    assert load_adapter(base, tmp_path / "adapter") == cfg
    assert lora_state_dict(base).keys() == lora_state_dict(model).keys()
    resumed = _model()  # a training checkpoint holds the whole state dict: it loads into any model adapted alike
    apply_lora(resumed, cfg)
    resumed.load_state_dict(model.state_dict())
    with torch.no_grad():
        ours = model(ids)
        assert torch.equal(base(ids), ours) and torch.equal(resumed(ids), ours)
        merged = merge_lora(base)(ids)
    assert not lora_layers(base) and all(p.requires_grad for p in base.parameters())
    assert (merged - ours).abs().max() <= 1e-5
    if method == "qlora":
        assert base_nbytes(model) < sum(m.in_features * m.out_features for m in lora_layers(model).values()) * 0.6


@pytest.mark.parametrize("method", ["lora", "dora", "pissa"])
def test_loading_an_adapter_runs_no_initialisation(tmp_path, monkeypatch, method: str):
    """A saved adapter holds every tensor: no SVD (PiSSA) or random init to compute and throw away."""
    model = _model()
    base = copy.deepcopy(model)
    cfg = PeftConfig(r=4, method=method, targets=["attn", "mlp"])
    apply_lora(model, cfg)
    _train_a_little(model)
    save_adapter(model, tmp_path, cfg)

    def refuse(*args, **kwargs):
        raise AssertionError("initialisation run while loading a saved adapter")

    monkeypatch.setattr(torch.linalg, "svd", refuse)
    monkeypatch.setattr(nn.init, "kaiming_uniform_", refuse)
    load_adapter(base, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), model.parameters(), strict=True))


def test_pattern_matching_nothing_lists_the_linear_layers():
    with pytest.raises(ConfigError, match=r"'attn\.qq' matches no Linear.*blocks\.\*\.attn\.q, .*lm_head"):
        apply_lora(_model(), PeftConfig(targets=["attn.q", "attn.qq"]))


def test_rank_too_big_names_the_layer():
    with pytest.raises(ConfigError, match=r"r=20 exceeds .* = min\(32, 16\) of layer 'blocks\.0\.attn\.k'"):
        apply_lora(_model(), PeftConfig(r=20))


def test_tied_head_is_refused():
    with pytest.raises(ConfigError, match="tied"):
        apply_lora(_model("gpt2"), PeftConfig(targets=["lm_head"]))


def test_adapter_onto_another_model_is_a_checkpoint_error(tmp_path):
    model = _model()
    cfg = PeftConfig(r=4)
    apply_lora(model, cfg)
    save_adapter(model, tmp_path / "a", cfg)
    wider = _model(d_model=48)
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.attn\.q\.lora_A' has shape \(4, 32\).*needs \(4, 48\)"):
        load_adapter(wider, tmp_path / "a")
    assert not lora_layers(wider)  # checked before any surgery
    with pytest.raises(CheckpointError, match=r"unexpected \['blocks\.1\.attn\.k\.lora_A'"):
        load_adapter(_model(n_layer=1), tmp_path / "a")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(CheckpointError, match="peft"):
        load_adapter(_model(), tmp_path / "p")
