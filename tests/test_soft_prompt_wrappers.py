"""Prefix and prompt tuning are wrappers PEFT puts around a plain model (as adapters are): the model layer has no
hook for them, and models tuned and saved before that change load and compute what they computed then.

`fixtures/soft_prompts/<case>` are checkpoints saved by the hook-based implementation (commit f8e29ba): the case's
`tiny_model`, `apply_peft` under seed 1, every trainable tensor moved by N(0, 0.5) noise, `save(model, None, dir,
peft=cfg)`; each with `expected.safetensors`, the outputs of `soft_prompt_cases.compute_outputs` on that model."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmforge
from lmforge.checkpoint import save
from lmforge.model.attention import Attention
from lmforge.model.decoder import DecoderLM
from lmforge.peft.config import apply_peft
from near_ties import assert_clear_choices
from soft_prompt_cases import CASES, compute_outputs, greedy_prompts, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = Path(__file__).parent / "fixtures" / "soft_prompts"


def assert_same_outputs(model: DecoderLM, outputs: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Logits within 1e-5 (the fixtures were computed on one CPU; other kernels round differently, ~3e-6 with
    ATEN_CPU_CAPABILITY=avx2); greedy ids exact, after checking every choice was clear (tests/near_ties.py)."""
    assert outputs.keys() == expected.keys()
    for prompt, row in zip(greedy_prompts(), expected["greedy_ids"].tolist(), strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + row]))[0, len(prompt) - 1:-1]
        assert_clear_choices(logits, "greedy decoding of the fixture")
    for name, want in expected.items():
        if name.endswith("ids"):
            assert torch.equal(outputs[name], want), name
        else:
            torch.testing.assert_close(outputs[name], want, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoints_saved_by_the_hook_implementation_load_and_compute_the_same(case, tmp_path):
    model, _ = lmforge.load(FIXTURES / case)
    expected = load_file(str(FIXTURES / case / "expected.safetensors"))
    assert_same_outputs(model, compute_outputs(model), expected)
    save(model, None, tmp_path / "again", peft=CASES[case][1])  # and the current format round-trips
    again, _ = lmforge.load(tmp_path / "again")
    assert_same_outputs(again, compute_outputs(again), expected)


def test_attention_has_no_prefix_hook():
    attn = Attention(16, 2, 2, 8, bias=False, dropout=0.0)
    assert not hasattr(attn, "prefix")
    assert "prefix" not in inspect.getsource(Attention.forward)


@pytest.mark.parametrize("case", ["llama-prefix", "llama-prefix-reparam"])
def test_prefix_tuning_wraps_each_attention_and_leaves_it_plain(case):
    family, cfg = CASES[case]
    model = tiny_model(family)
    apply_peft(model, cfg)
    for block in model.blocks:
        assert type(block.attn) is not Attention and type(block.attn.base) is Attention
        assert not hasattr(block.attn.base, "prefix")


def test_the_decoder_has_no_soft_prompt_hook_and_prompt_tuning_subclasses_it():
    model = tiny_model("gpt2")
    assert not hasattr(model, "embed_hook")
    source = inspect.getsource(DecoderLM)
    assert "embed_hook" not in source and "virtual" not in source
    apply_peft(model, CASES["gpt2-prompt"][1])
    assert isinstance(model, DecoderLM) and type(model) is not DecoderLM
