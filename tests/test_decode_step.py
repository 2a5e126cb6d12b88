"""The decode step without module calls (`model/decode_step.py`): the forward's logits and cache for every block
layout it takes, taken by the engine's rows, and the forward for the models it does not take."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from lmforge.config import ModelConfig, PeftConfig
from lmforge.infer.engine import Engine, GenerationRequest
from lmforge.infer.slots import BatchSlots
from lmforge.model.attention import fused_qkv
from lmforge.model.decode_step import DecodeStep, supports
from lmforge.model.decoder import DecoderLM
from lmforge.peft.config import apply_peft
from tiny_decoders import TINY, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

LAYOUTS = {
    "gpt2": dict(family="gpt2"),
    "llama-gqa": dict(family="llama", n_kv_head=2),
    "qwen3-qk-norm": dict(family="qwen3", n_kv_head=2),
    "neox-parallel-partial-rope": dict(family="gpt_neox"),
    "mistral-window": dict(family="mistral", sliding_window=6),
    "alibi": dict(family="gpt2", position="alibi"),
    "sinusoidal": dict(family="gpt2", position="sinusoidal"),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused-qkv", "separate-qkv"])
@pytest.mark.parametrize("name", LAYOUTS)
def test_a_decode_step_gives_the_forwards_logits_and_cache(name: str, fused: bool) -> None:
    """Three rows, left-padded differently (one all padding but the new slot), then a step without a mask: the
    logits and every layer's new keys and values as the model's forward gives them, within fp32 rounding."""
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(**{**TINY, "init_std": 0.2, **LAYOUTS[name]})).eval()
    assert supports(model)
    prompt = torch.randint(1, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, :2] = mask[1, :7] = 0
    mask[2, :9] = 0
    caches = [model.new_cache(3, 12), model.new_cache(3, 12)]
    with torch.inference_mode(), fused_qkv(model) if fused else nullcontext():
        for cache in caches:
            model(prompt, cache=cache, attention_mask=mask[:, :9])
        new = torch.tensor([[5], [6], [7]])
        expected = model(new, cache=caches[0], attention_mask=mask)[:, -1]
        got = DecodeStep(model)((new, caches[1], mask))[0]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert caches[0].length == caches[1].length == 10
        for mine, theirs in zip(caches[1].keys + caches[1].values, caches[0].keys + caches[0].values, strict=True):
            torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=0)
        row = [model.new_cache(1, 12), model.new_cache(1, 12)]  # one sequence alone: no mask, the plain path
        for cache in row:
            model(prompt[:1], cache=cache)
        expected = model(new[:1], cache=row[0])[:, -1]
        torch.testing.assert_close(DecodeStep(model)((new[:1], row[1], None))[0], expected, atol=1e-5, rtol=0)


def test_the_engine_rows_decode_through_it_and_leave_it_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every decode step of a supported model goes through one `DecodeStep`, made when the rows get busy and
    dropped when they are all free (the model may change in between)."""
    made: list[DecodeStep] = []
    calls: list[int] = []
    init, call = DecodeStep.__init__, DecodeStep.__call__
    monkeypatch.setattr(DecodeStep, "__init__", lambda self, m: (made.append(self), init(self, m))[1])
    monkeypatch.setattr(DecodeStep, "__call__", lambda self, *a: (calls.append(1), call(self, *a))[1])
    engine = Engine(tiny_model("gpt2"), max_batch=2)
    for _ in range(2):
        engine.submit(GenerationRequest([1, 2, 3], 4, temperature=0))
        engine.submit(GenerationRequest([4, 5], 6, temperature=0))
        while engine.has_work:
            engine.step()
        assert engine.slots._fast_step is None
    assert len(made) == 2 and len(calls) == 2 * 5  # each run: 5 decode steps (the first token comes from prefill)


def test_models_it_does_not_take_decode_through_their_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DecodeStep, "__call__", lambda *a: pytest.fail("the fast step ran"))
    post_norm = tiny_model("gpt2", norm_placement="post")
    prompt_tuned = tiny_model("gpt2")
    apply_peft(prompt_tuned, PeftConfig(method="prompt", prompt_len=2))
    prefix_tuned = tiny_model("gpt2")
    apply_peft(prefix_tuned, PeftConfig(method="prefix", prefix_len=2, reparam=False))
    training = tiny_model("gpt2").train()
    hooked = tiny_model("gpt2")  # a hook must see the forward it hooks
    hooked.blocks[1].mlp.register_forward_hook(lambda *a: None)
    for model in (post_norm, prompt_tuned.eval(), prefix_tuned.eval(), training, hooked):
        assert not supports(model)
        slots = BatchSlots.for_model(model, 1)
        with torch.inference_mode():
            slots.prefill(0, [1, 2], 4)
            assert slots.decode({0: 3}).shape == (1, model.cfg.vocab_size)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "mistral-window"])
def test_a_prefill_in_the_decode_steps_pass_gives_each_batch_its_own_forward(name: str) -> None:
    """The running rows' step and a left-padded prefill over a cached prefix (a cache of its own), their tokens in
    the same matmuls: each batch's last logits and cache as its own forward gives them."""
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(**{**TINY, "init_std": 0.2, **LAYOUTS[name]})).eval()
    ids = torch.randint(1, 64, (4, 12), generator=torch.Generator().manual_seed(2))
    running_mask = torch.ones(2, 9, dtype=torch.long)
    running_mask[1, :3] = 0
    prefill_mask = torch.ones(2, 12, dtype=torch.long)
    prefill_mask[1, 4:7] = 0  # the second prompt: 4 cached slots, 3 padding, then its 5 tokens
    with torch.inference_mode(), fused_qkv(model):
        running, prompts = [model.new_cache(2, 12) for _ in range(2)], [model.new_cache(2, 12) for _ in range(2)]
        for r, p in zip(running, prompts, strict=True):
            model(ids[:2, :8], cache=r, attention_mask=running_mask[:, :8])
            model(ids[2:, :4], cache=p)  # the cached prefix
        new = ids[:2, 8:9]
        expected = (model(new, cache=running[0], attention_mask=running_mask)[:, -1],
                    model(ids[2:, 4:], cache=prompts[0], attention_mask=prefill_mask, keep_last=1)[:, -1])
        got = DecodeStep(model)((new, running[1], running_mask), (ids[2:, 4:], prompts[1], prefill_mask))
        for mine, theirs in zip(got, expected, strict=True):
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
        # The new rows' keys and values come out of matmuls over another number of rows, which a CPU's BLAS may sum
        # in another order (AMD Zen 4's does): a few ulps of entries up to about 4.
        for mine, theirs in zip(running[1:] + prompts[1:], running[:1] + prompts[:1], strict=True):
            assert mine.length == theirs.length
            for a, b in zip(mine.keys + mine.values, theirs.keys + theirs.values, strict=True):
                torch.testing.assert_close(a, b, atol=5e-6, rtol=0)


def test_the_engine_prefills_arrivals_in_the_running_rows_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request that arrives while others run is prefilled in their decode step's pass (one `DecodeStep` call of two
    batches, no forward of the model's own), and gets the tokens it gets alone."""
    model = tiny_model("gpt2")
    batches: list[int] = []
    call = DecodeStep.__call__
    monkeypatch.setattr(DecodeStep, "__call__", lambda self, *b: (batches.append(len(b)), call(self, *b))[1])
    alone = []
    for ids in ([1, 2, 3], [4, 5, 6, 7, 8]):
        engine = Engine(model, max_batch=2)
        engine.submit(GenerationRequest(ids, 6, temperature=0))
        alone.append([e.token_id for _ in range(6) for e in engine.step()])
    engine = Engine(model, max_batch=2)
    first = engine.submit(GenerationRequest([1, 2, 3], 6, temperature=0))
    events = engine.step()
    batches.clear()
    forwards: list[int] = []
    model.register_forward_pre_hook(lambda *a: forwards.append(1))  # a probe: the rows keep the fast step they took
    second = engine.submit(GenerationRequest([4, 5, 6, 7, 8], 6, temperature=0))
    events += engine.step()
    assert batches == [2] and not forwards
    while engine.has_work:
        events += engine.step()
    got = [[e.token_id for e in events if e.request_id == rid] for rid in (first, second)]
    assert got == alone
