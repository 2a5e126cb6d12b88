"""LoRA adapters chosen per batch row (`row_adapters`) and the loader of named adapters a server offers.

A row computed in a mixed batch must match that row run alone with its adapter active (`set_adapter`): max abs
logit difference <= 1e-5 (fp32; the batch's matmuls may block differently from a single row's).
"""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.config import PeftConfig
from lmforge.errors import CheckpointError, ConfigError
from lmforge.model.decoder import DecoderLM
from lmforge.peft.export import export_peft
from lmforge.peft.lora import apply_lora, lora_layers, set_adapter
from lmforge.peft.lora_files import save_adapter
from lmforge.peft.row_adapters import load_named_adapters, row_adapters
from parity_helpers import perturb
from tiny_decoders import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5
NAMES = ["a", None, "b", "a"]


def _base(family: str = "llama", d_model: int = 32) -> DecoderLM:
    model = tiny_model("llama-gqa" if family == "llama" else family, init_std=0.05, d_model=d_model)
    perturb(model)
    return model


@torch.no_grad()
def _move_off_init(model: DecoderLM, name: str) -> None:
    """Stand-in for training: every tensor of adapter `name` away from its init, so that the adapter matters."""
    for layer in lora_layers(model).values():
        if name in layer.cfgs:
            layer.lora_B[name].normal_(0, 0.2)
            layer.lora_A[name].add_(torch.randn_like(layer.lora_A[name]) * 0.2)
            if name in layer.lora_magnitude:
                layer.lora_magnitude[name].mul_(1 + 0.3 * torch.rand_like(layer.lora_magnitude[name]))


def _cfg(method: str, name: str) -> PeftConfig:
    """Adapter a on q, v and the MLP; b (another rank and alpha) on all of attention and the MLP's down projection:
    they share some layers and each has some alone."""
    targets = ["attn.q", "attn.v", "mlp"] if name == "a" else ["attn", "mlp.down"]
    return PeftConfig(method=method, r=4 if name == "a" else 2, alpha=8, targets=targets, qlora_group_size=16)


def _with_adapters(family: str, method_a: str, method_b: str) -> DecoderLM:
    torch.manual_seed(0)
    model = _base(family)
    for name, method in (("a", method_a), ("b", method_b)):
        apply_lora(model, _cfg(method, name), name)
        _move_off_init(model, name)
    return model


@torch.no_grad()
def _alone(model: DecoderLM, ids: torch.Tensor, names: list[str | None], steps: torch.Tensor | None = None):
    """Each row run by itself with its adapter active (set_adapter): logits [B, T + decode steps, vocab]."""
    rows = []
    for i, name in enumerate(names):
        set_adapter(model, [] if name is None else [name])
        rows.append(_run(model, ids[i:i + 1], steps if steps is None else steps[i:i + 1]))
    return torch.cat(rows)


def _run(model: DecoderLM, ids: torch.Tensor, steps: torch.Tensor | None) -> torch.Tensor:
    """Logits of `ids`, then (with `steps`) a KV-cached prefill of `ids` and one decode step per column of steps."""
    if steps is None:
        return model(ids)
    cache = model.new_cache(ids.shape[0])
    logits = [model(ids, cache=cache)]
    logits += [model(steps[:, t:t + 1], cache=cache) for t in range(steps.shape[1])]
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize(("family", "method_a", "method_b"), [
    ("gpt2", "lora", "dora"),  # GPT-2 has biases: DoRA's W0 x is the base output less the bias
    ("llama", "dora", "dora"),
    ("llama", "qlora", "qlora"),
])
@torch.no_grad()
def test_each_row_gets_its_own_adapter(family, method_a, method_b):
    model = _with_adapters(family, method_a, method_b)
    ids = torch.randint(0, 64, (len(NAMES), 10))
    expected = _alone(model, ids, NAMES)
    assert (expected[0] - expected[1]).abs().max() > 1e-2 and (expected[2] - expected[1]).abs().max() > 1e-2
    set_adapter(model, ["b"])  # whatever is active outside, rows get theirs inside
    outside = model(ids)
    with row_adapters(model, NAMES):
        got = model(ids)
    assert (got - expected).abs().max() <= ATOL
    with row_adapters(model, ["b"] * len(NAMES)):  # one adapter on every row: no gather
        assert (model(ids) - outside).abs().max() <= ATOL
    assert torch.equal(model(ids), outside)  # unchanged outside
    assert all(layer.row_groups is None and layer.active == [("b", 1.0)]
               for layer in lora_layers(model).values() if "b" in layer.cfgs)


@torch.no_grad()
def test_kv_cached_decode_with_row_adapters_matches_single_rows():
    model = _with_adapters("llama", "lora", "dora")
    ids, steps = torch.randint(0, 64, (len(NAMES), 6)), torch.randint(0, 64, (len(NAMES), 3))
    expected = _alone(model, ids, NAMES, steps)
    with row_adapters(model, NAMES):
        got = _run(model, ids, steps)
    assert got.shape == expected.shape == (len(NAMES), 9, 64)
    assert (got - expected).abs().max() <= ATOL


def test_unknown_pissa_merged_and_wrong_batch_are_refused():
    model = _with_adapters("llama", "lora", "lora")
    with pytest.raises(ConfigError, match=r"unknown adapter\(s\) \['c'\]; this model has \['a', 'b'\]"):
        row_adapters(model, ["a", "c"]).__enter__()
    with row_adapters(model, ["a", None]), pytest.raises(ValueError, match="chosen for 2 rows, but the batch has 3"):
        model(torch.zeros(3, 4, dtype=torch.long))
    lora_layers(model)["blocks.0.attn.q"].merge()
    with pytest.raises(ConfigError, match="'blocks.0.attn.q' has adapters merged"):
        row_adapters(model, [None]).__enter__()
    pissa = _base()
    apply_lora(pissa, PeftConfig(method="pissa", r=2, targets=["attn.q"]), "p")
    with pytest.raises(ConfigError, match="'p' is PiSSA"):  # even base-only rows: its layers' base is a residual
        row_adapters(pissa, [None]).__enter__()
    assert all(layer.row_groups is None for layer in lora_layers(model).values())


@torch.no_grad()
def test_loader_adds_lmforge_and_peft_adapters_that_reproduce_their_outputs(tmp_path):
    base = _base()
    model = copy.deepcopy(base)
    apply_lora(model, _cfg("lora", "a"), "a")
    apply_lora(model, _cfg("dora", "b"), "b")
    for name in "ab":
        _move_off_init(model, name)
    ids = torch.randint(0, 64, (2, 8))
    expected = {}
    for name in ("a", "b"):
        set_adapter(model, [name])
        expected[name] = model(ids)
    save_adapter(model, tmp_path / "a", _cfg("lora", "a"), "a")
    export_peft(model, None, tmp_path / "b", _cfg("dora", "b"), "b", base_name="the-base")
    plain = base(ids)

    cfgs = load_named_adapters(base, {"first": tmp_path / "a", "second": tmp_path / "b"})
    assert cfgs["first"] == _cfg("lora", "a") and cfgs["second"].method == "dora"
    assert not base.training and not any(p.requires_grad for p in base.parameters())
    assert (base(ids) - plain).abs().max() <= ATOL  # no adapter active
    for served, name in (("first", "a"), ("second", "b")):
        set_adapter(base, [served])
        assert (base(ids) - expected[name]).abs().max() <= ATOL
    with row_adapters(base, ["second", "first"]):
        got = base(ids)
    assert (got[0] - expected["b"][0]).abs().max() <= ATOL and (got[1] - expected["a"][1]).abs().max() <= ATOL

    set_adapter(base, [])
    load_named_adapters(base, {"later": tmp_path / "b"})  # onto layers already adapted
    with pytest.raises(CheckpointError, match="adapter 'later': .*adapter 'later' already exists"):
        load_named_adapters(base, {"later": tmp_path / "a"})
    set_adapter(base, ["later"])
    assert (base(ids) - expected["b"]).abs().max() <= ATOL


@pytest.mark.parametrize("fmt", ["lmforge", "peft"])
def test_loader_refuses_an_adapter_of_another_base_before_touching_the_model(tmp_path, fmt):
    good, other = _base(), _base(d_model=48)
    for model, name in ((copy.deepcopy(good), "good"), (other, "bad")):
        cfg = _cfg("lora", "a")
        apply_lora(model, cfg, "a")
        if fmt == "lmforge":
            save_adapter(model, tmp_path / name, cfg, "a")
        else:
            export_peft(model, None, tmp_path / name, cfg, "a", base_name="the-base")
    with pytest.raises(CheckpointError, match=rf"^adapter 'bad': .*{tmp_path / 'bad'}") as err:
        load_named_adapters(good, {"good": tmp_path / "good", "bad": tmp_path / "bad"})
    assert "\n" not in str(err.value)
    assert lora_layers(good) == {}  # the good adapter, checked first, was not added either


def test_loader_refuses_pissa_qlora_on_a_plain_base_active_adapters_and_bad_names(tmp_path):
    for method in ("pissa", "qlora"):
        model = _base()
        apply_lora(model, _cfg(method, "a"), "a")
        save_adapter(model, tmp_path / method, _cfg(method, "a"), "a")
    with pytest.raises(CheckpointError, match="is a PiSSA adapter.*--format peft"):
        load_named_adapters(_base(), {"p": tmp_path / "pissa"})
    with pytest.raises(CheckpointError, match="is a QLoRA adapter, but this base's layer 'blocks.0.attn.q' is not NF4"):
        load_named_adapters(_base(), {"q": tmp_path / "qlora"})
    with pytest.raises(ConfigError, match=r"computes with LoRA adapter\(s\) \['a'\].*merge"):
        load_named_adapters(model, {})
    with pytest.raises(ConfigError, match="adapter name 'my-lora' must be a Python identifier"):
        load_named_adapters(_base(), {"my-lora": tmp_path / "qlora"})
