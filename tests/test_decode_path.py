"""The decode fast paths: one q|k|v matmul over a shared buffer while decoding, 4-D attention bias (SDPA's
fused kernel), last-position logits at prefill."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig, PeftConfig
from lmforge.infer.batched import generate_batch
from lmforge.infer.beam import beam_search
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.infer.layout import column_major_linears, is_column_major
from lmforge.infer.speculative import speculative_generate
from lmforge.model import attention, layers
from lmforge.model.attention import Attention, attention_bias, fused_qkv
from lmforge.model.decoder import DecoderLM
from lmforge.model.layers import alibi_slopes
from lmforge.peft.config import apply_peft

pytestmark = pytest.mark.usefixtures("one_thread")


def model(family: str = "gpt2", **kw) -> DecoderLM:
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, vocab_size=64, max_seq_len=64, n_layer=2, n_head=4, d_model=32, **kw)
    return DecoderLM(cfg)


def projections(attn: Attention) -> list[torch.Tensor]:
    return [getattr(attn, name).weight for name in "qkv"]


@pytest.mark.parametrize("family, kw", [("gpt2", {}), ("llama", {"n_kv_head": 2}), ("llama", {"n_kv_head": 1})])
def test_fused_projection_matches_separate_projections(family: str, kw: dict) -> None:
    m = model(family, **kw).eval()
    attn = m.blocks[0].attn
    fused = attn.qkv_view()
    assert fused is not None  # a new model's q, k, v share one buffer
    torch.testing.assert_close(fused[0], torch.cat(projections(attn)), rtol=0, atol=0)
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        separate = m(x)
        with fused_qkv(m):
            assert attn._fused is not None  # the fused path runs
            one = m(x)
    assert attn._fused is None
    torch.testing.assert_close(one, separate, atol=1e-5, rtol=1e-5)


def test_the_shared_buffer_follows_training_and_reloads_and_no_copy_is_kept() -> None:
    m = model().eval()
    x = torch.randint(0, 64, (1, 7))
    with torch.no_grad(), fused_qkv(m):
        before = m(x)
    opt = torch.optim.AdamW(m.parameters(), lr=0.5)
    m.train()
    m(x).float().pow(2).mean().backward()
    opt.step()  # in place, into the shared buffer
    m.eval()
    assert m.blocks[0].attn.qkv_view() is not None
    with torch.no_grad():
        reference = m(x)
        with fused_qkv(m):
            after = m(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, reference, atol=1e-5, rtol=1e-5)
    fresh = model().eval()
    fresh.load_state_dict(m.state_dict())  # copy_ into the same storage
    with torch.no_grad(), fused_qkv(fresh):
        torch.testing.assert_close(fresh(x), reference, atol=1e-5, rtol=1e-5)
    weights = projections(fresh.blocks[0].attn)
    assert len({w.untyped_storage().data_ptr() for w in weights}) == 1
    assert weights[0].untyped_storage().nbytes() == sum(w.nbytes for w in weights)  # the buffer is the weights


@pytest.mark.parametrize("convert", ["dtype", "column_major"])
def test_decoding_shares_the_buffer_again_after_a_conversion(convert: str) -> None:
    m = model().eval()
    if convert == "dtype":
        m = m.to(torch.float64)  # .to() gives every parameter its own storage
    else:
        column_major_linears(m, min_bytes=0)
    attn = m.blocks[0].attn
    assert attn.qkv_view() is None
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        separate = m(ids)
    sampling = SamplingConfig(max_new_tokens=3, temperature=0.0, stop_at_eos=False)
    generate_ids(m, ids[0].tolist(), sampling)  # decoding shares the buffer again
    fused = attn.qkv_view()
    assert fused is not None and all(w.dtype == fused[0].dtype for w in projections(attn))
    if convert == "column_major":
        assert all(is_column_major(w) for w in [*projections(attn), fused[0]])
    with torch.no_grad(), fused_qkv(m):
        torch.testing.assert_close(m(ids), separate, atol=1e-5, rtol=1e-5)


def test_training_gradients_reach_every_projection() -> None:
    m = model().train()
    m(torch.randint(0, 64, (2, 8))).sum().backward()
    for name in ("q", "k", "v"):
        grad = getattr(m.blocks[0].attn, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_bitfit_bias_gradients_take_the_separate_projections() -> None:
    m = model().train()
    apply_peft(m, PeftConfig(method="bitfit"))
    m(torch.randint(0, 64, (2, 8))).sum().backward()
    for name in ("q", "k", "v"):
        bias = getattr(m.blocks[0].attn, name).bias
        assert bias.grad is not None and bias.grad.shape == bias.shape and bias.grad.abs().sum() > 0, name


def test_lora_projections_skip_fusion() -> None:
    m = model()
    apply_peft(m, PeftConfig(method="lora", r=4, targets=["attn.q", "attn.v"]))
    with torch.no_grad():  # non-zero adapters (LoRA's B starts at zero): skipping them would change the output
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.5)
    assert m.blocks[0].attn.qkv_view() is None
    x = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        separate = m(x)
        with fused_qkv(m):
            assert m.blocks[0].attn._fused is None
            torch.testing.assert_close(m(x), separate)


@pytest.mark.parametrize("family, kw", [("gpt2", {}), ("gpt2", {"position": "alibi"}), ("llama", {"n_kv_head": 2})])
def test_multi_token_step_over_a_cache_uses_a_4d_bias_and_matches_the_full_forward(family: str, kw: dict) -> None:
    """A verify-style step (5 new tokens over a cache, as speculative decoding runs) gets a 4-D causal bias, which
    SDPA on CPU serves with its fused kernel (a 3-D one sends it to the slow math path), and computes what the
    full forward computes at those positions."""
    bias = attention_bias(5, 25, 20, None, torch.device("cpu"))
    alibi = attention_bias(5, 25, 20, alibi_slopes(4), torch.device("cpu"))
    assert bias.shape == (1, 1, 5, 25) and alibi.shape == (1, 4, 5, 25)
    assert torch.isinf(bias[0, 0, 0, 21:]).all() and torch.isfinite(bias[0, 0, 0, :21]).all()  # query 0 is at 20
    m = model(family, **kw).eval()
    ids = torch.randint(0, 64, (1, 25))
    cache = m.new_cache(1, 32)
    with torch.no_grad():
        m(ids[:, :20], cache=cache)
        step = m(ids[:, 20:], cache=cache)
        torch.testing.assert_close(step, m(ids)[:, 20:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keep", [1, 3])
def test_keep_last_returns_the_last_positions(keep: int) -> None:
    m = model().eval()
    x = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(m(x, keep_last=keep), m(x)[:, -keep:])


def _beam(m: DecoderLM) -> object:
    return beam_search(m, [1, 2, 3], num_beams=2, max_new_tokens=3)


@pytest.mark.parametrize("run", [
    lambda m: generate_ids(m, [1, 2, 3], SamplingConfig(max_new_tokens=3, temperature=0.0)),
    lambda m: generate_batch(m, [[1, 2, 3], [4]], SamplingConfig(max_new_tokens=3, temperature=0.0)),
    lambda m: speculative_generate(m, m, [1, 2, 3], SamplingConfig(max_new_tokens=3, temperature=0.0)),
    _beam,
], ids=["generate_ids", "generate_batch", "speculative", "beam"])
def test_every_decode_loop_uses_the_fused_projection(run, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spy on the projection: the fused path changes only the speed, not the outputs, so no output can show it.
    The model starts converted by `.to()`, so each loop must share the q|k|v buffer again itself."""
    fused_flags: list[bool] = []
    plain = Attention.project_qkv

    def spy(self: Attention, x: torch.Tensor):
        fused_flags.append(self._fused is not None)
        return plain(self, x)

    monkeypatch.setattr(Attention, "project_qkv", spy)
    m = model().to(torch.float64).eval()
    assert m.blocks[0].attn.qkv_view() is None
    run(m)
    assert fused_flags and all(fused_flags)


@pytest.mark.parametrize("family, kw", [("llama", {"n_kv_head": 2}), ("gpt_neox", {})])
def test_a_decode_step_rotates_queries_and_keys_with_one_rope_per_layer(family: str, kw: dict,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside `fused_qkv` q and k are adjacent heads of one matmul's output: one rotation covers both (each op call
    costs a decode step of a small model about as much as its arithmetic). The values are the same element-wise ops
    on the same numbers as rotating each, so exactly equal."""
    m = model(family, **kw).eval()
    calls: list[int] = []
    plain = layers.apply_rope

    def spy(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == m.cfg.head_dim:  # not the inner call of a partial rotary (GPT-NeoX)
            calls.append(x.shape[1])
        return plain(x, cos, sin)

    monkeypatch.setattr(attention, "apply_rope", spy)
    attn = m.blocks[0].attn
    x, rope = torch.randn(2, 3, 32), m._rope(5, 3)
    with torch.inference_mode(), fused_qkv(m):
        q, k, v = attn.project_qkv(x)
        each = (plain(q, *rope), plain(k, *rope), v)
        together = attn.queries_keys_values(x, rope)
        calls.clear()
        cache = m.new_cache(1, 8)
        m(torch.tensor([[1, 2, 3]]), cache=cache)
        m(torch.tensor([[4]]), cache=cache)
    assert all(torch.equal(a, b) for a, b in zip(together, each, strict=True))
    assert calls == [attn.n_head + attn.n_kv] * 2 * len(m.blocks)  # prefill and decode step: one per layer each
