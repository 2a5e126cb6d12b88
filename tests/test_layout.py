"""Column-major Linear weights for inference (infer/layout.py): same values and outputs, other strides."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lmforge
from lmforge.config import ModelConfig, PeftConfig
from lmforge.infer import layout
from lmforge.infer.batched import generate_batch
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.infer.layout import column_major_linears, is_column_major, linear_weights
from lmforge.infer.quant import QuantConfig, quantize_model
from lmforge.model.decoder import DecoderLM
from lmforge.peft.config import apply_peft
from near_ties import assert_clear_greedy

pytestmark = pytest.mark.usefixtures("one_thread")


def model(family: str = "gpt2", **kw) -> DecoderLM:
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, vocab_size=64, max_seq_len=64, n_layer=2, n_head=4, d_model=32, **kw)
    return DecoderLM(cfg).eval()


@pytest.mark.parametrize("family, kw", [("gpt2", {}), ("llama", {"n_kv_head": 2})])
def test_every_linear_becomes_column_major_with_the_same_values_and_outputs(family: str, kw: dict) -> None:
    m = model(family, **kw)
    converted = column_major_linears(copy.deepcopy(m), min_bytes=0)
    linears = [mod for mod in converted.modules() if type(mod) is nn.Linear]
    assert linears and all(is_column_major(mod.weight) for mod in linears)
    assert not any(is_column_major(mod.weight) for mod in m.modules() if type(mod) is nn.Linear)
    for (name, a), (_, b) in zip(m.state_dict().items(), converted.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    x = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(converted(x), m(x), atol=1e-5, rtol=1e-5)


def test_models_whose_weights_fit_in_cache_keep_the_row_major_layout() -> None:
    m = model("gpt2")  # ~0.05 MB of Linear weights, far below any CPU's last-level cache
    weights = linear_weights(m)
    ptrs = [w.data_ptr() for w in weights]
    column_major_linears(m, threads=2)
    assert [w.data_ptr() for w in weights] == ptrs and not any(is_column_major(w) for w in weights)
    column_major_linears(m, min_bytes=sum(w.nbytes for w in weights))  # exactly at the threshold
    assert all(is_column_major(w) for w in weights)


@pytest.mark.parametrize("threads", [1, 2])
def test_one_thread_takes_the_column_major_layout_at_any_size(threads: int, monkeypatch) -> None:
    """One intra-op thread multiplies a few rows faster from columns even in cache: a model far below the LLC is
    converted for one thread (given, or torch's own count) and kept for two."""
    assert not any(is_column_major(w) for w in linear_weights(column_major_linears(model("gpt2"), threads=2)))
    converted = linear_weights(column_major_linears(model("gpt2"), threads=1))
    assert all(is_column_major(w) for w in converted)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    by_default = linear_weights(column_major_linears(model("gpt2")))
    assert all(is_column_major(w) == (threads == 1) for w in by_default)


def test_the_threshold_is_this_cpus_last_level_cache(monkeypatch) -> None:
    """Weights of at least the LLC size go column-major, smaller ones stay: a faked cache size flips the choice (real
    weights of this CPU's LLC size would take up to hundreds of MiB)."""
    nbytes = sum(w.nbytes for w in linear_weights(model("gpt2")))
    monkeypatch.setattr(layout, "last_level_cache_bytes", lambda: nbytes + 1)
    assert not any(is_column_major(w) for w in linear_weights(column_major_linears(model("gpt2"), threads=2)))
    monkeypatch.setattr(layout, "last_level_cache_bytes", lambda: nbytes)
    assert all(is_column_major(w) for w in linear_weights(column_major_linears(model("gpt2"), threads=2)))


def _fake_cache(root, entries: list[tuple[str, str, str]]) -> None:
    for i, (level, kind, size) in enumerate(entries):
        (root / f"index{i}").mkdir(parents=True)
        for name, text in (("level", level), ("type", kind), ("size", size)):
            (root / f"index{i}" / name).write_text(text + "\n")


def test_the_last_level_cache_is_read_from_sysfs_with_a_fallback(tmp_path) -> None:
    sapphire_rapids_vm = [("1", "Data", "48K"), ("1", "Instruction", "32K"), ("2", "Unified", "2048K"),
                          ("3", "Unified", "307200K")]
    _fake_cache(tmp_path / "spr", sapphire_rapids_vm)
    assert layout.largest_cache_bytes(tmp_path / "spr") == 300 * 2**20
    missing = layout.largest_cache_bytes(tmp_path / "missing")  # no sysfs (macOS, Windows, a sandbox)
    assert missing == layout.FALLBACK_CACHE_BYTES
    _fake_cache(tmp_path / "l2_only", [("1", "Data", "32K"), ("2", "Unified", "1M"), ("3", "Instruction", "8M")])
    assert layout.largest_cache_bytes(tmp_path / "l2_only") == 2**20


def test_weights_off_the_cpu_are_never_converted() -> None:
    with torch.device("meta"):
        m = model("gpt2")
    column_major_linears(m, min_bytes=0)
    assert not any(is_column_major(w) for w in linear_weights(m))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_weights_are_never_converted() -> None:
    m = column_major_linears(model("llama").cuda(), min_bytes=0)
    assert not any(is_column_major(w) for w in linear_weights(m))


def test_tied_head_stays_tied_and_converts_once() -> None:
    m = column_major_linears(model("gpt2"), min_bytes=0)  # GPT-2 ties the head to the embedding
    assert m.lm_head.weight is m.tok_emb.weight and is_column_major(m.tok_emb.weight)
    ptr = m.lm_head.weight.data_ptr()
    column_major_linears(m, min_bytes=0)  # idempotent: already column-major, nothing copied
    assert m.lm_head.weight.data_ptr() == ptr


def test_the_shared_qkv_buffer_keeps_the_layout_and_generation_is_unchanged() -> None:
    m = model("llama", n_kv_head=2, init_std=0.5)  # logits spread out: no near-tie in the greedy choices
    converted = column_major_linears(copy.deepcopy(m), min_bytes=0)
    cfg = SamplingConfig(max_new_tokens=20, temperature=0.0, stop_at_eos=False)
    reference = generate_ids(m, [1, 5, 9], cfg)
    assert_clear_greedy(m, [1, 5, 9], reference)  # the layouts round differently
    assert generate_ids(converted, [1, 5, 9], cfg) == reference
    fused_weight, _ = converted.blocks[0].attn.qkv_view()  # shared again by decoding, column-major
    assert is_column_major(fused_weight) and fused_weight.t().is_contiguous()
    prompts = [[3, 4, 5, 6, 7], [8, 9]]
    reference = generate_batch(m, prompts, cfg)
    for prompt, new_ids in zip(prompts, reference, strict=True):
        assert_clear_greedy(m, prompt, new_ids)
    assert generate_batch(converted, prompts, cfg) == reference


def test_quantised_and_adapter_layers_work_on_converted_weights() -> None:
    x = torch.randint(0, 64, (1, 9))
    converted, reference = column_major_linears(model("gpt2"), min_bytes=0), model("gpt2")
    for m in (converted, reference):
        quantize_model(m, QuantConfig(bits=8))  # quantising a converted model gives the same codes
    with torch.no_grad():
        torch.testing.assert_close(converted(x), reference(x), atol=1e-5, rtol=1e-5)
    converted, reference = model("llama"), model("llama")
    for m in (converted, reference):
        apply_peft(m, PeftConfig(method="lora", r=4))
        torch.manual_seed(1)
        for p in m.parameters():  # non-zero adapters (LoRA's B starts at zero), so they change the output
            if p.requires_grad:
                torch.nn.init.normal_(p, 0.0, 0.02)
    column_major_linears(converted, min_bytes=0)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), reference(x), atol=1e-5, rtol=1e-5)


def test_a_converted_model_saves_and_loads_unchanged(tmp_path) -> None:
    m = column_major_linears(model("gpt2"), min_bytes=0)
    path = lmforge.save(m, None, tmp_path / "ckpt")
    loaded, _ = lmforge.load(path)
    x = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), atol=1e-6, rtol=1e-6)
