"""bf16 training attention on CPU (flash forward in bf16, backward in fp32): the values of plain SDPA, and taken by
both decoder families under autocast."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.model import cpu_attention, layers
from lmforge.model.decoder import DecoderLM


def test_forward_is_sdpa_and_gradients_are_closer_to_fp32() -> None:
    """The output is SDPA's bf16 output; the gradients are within bf16 rounding (1% of the largest) of fp32 SDPA's
    on the same bf16 inputs."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, 3, 16, 8, dtype=torch.bfloat16)
    assert cpu_attention.takes_fast_path(q, k, v)
    out = cpu_attention.causal_attention(q, k, v, scale=0.3)
    assert out.dtype == torch.bfloat16
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    assert (out.float() - want.float()).abs().max() <= 1e-2 * want.float().abs().max()
    got = torch.autograd.grad(out, (q, k, v), grad)
    exact = [t.detach().float().requires_grad_() for t in (q, k, v)]
    reference = torch.autograd.grad(F.scaled_dot_product_attention(*exact, is_causal=True, scale=0.3), exact,
                                    grad.float())
    for g, r in zip(got, reference, strict=True):
        assert g.dtype == torch.bfloat16
        assert (g.float() - r).abs().max() <= 1e-2 * r.abs().max()


def test_not_taken_without_a_gradient_in_fp32_with_grouped_heads_or_long_sequences() -> None:
    q = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    long = torch.randn(1, 4, cpu_attention.MAX_POSITIONS + 1, 8, dtype=torch.bfloat16, requires_grad=True)
    assert not cpu_attention.takes_fast_path(long, long, long)
    assert not cpu_attention.takes_fast_path(q.float(), q.float(), q.float())
    assert not cpu_attention.takes_fast_path(q, q[:, :2], q[:, :2])
    with torch.no_grad():
        assert not cpu_attention.takes_fast_path(q, q, q)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_training_under_bf16_autocast_takes_it(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layer's attention takes the path (Llama's too: RoPE keeps the queries and keys in bf16), and the loss and
    gradients match the plain SDPA path within bf16 autocast's rounding (2% of the largest gradient)."""
    torch.manual_seed(0)
    fast = DecoderLM(ModelConfig(family=family, vocab_size=64, max_seq_len=16, n_layer=2, n_head=4,
                                 d_model=32)).train()
    plain = copy.deepcopy(fast)
    ids = torch.randint(0, 64, (3, 16))
    calls = []

    def counted(*args):
        calls.append(args[0].dtype)
        return cpu_attention.causal_attention(*args)

    def loss_of(model: DecoderLM) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        return loss

    monkeypatch.setattr(layers, "causal_attention", counted)
    got = loss_of(fast)
    assert calls == [torch.bfloat16] * 2
    monkeypatch.setattr(layers, "takes_fast_path", lambda *_: False)
    want = loss_of(plain)
    assert len(calls) == 2
    assert got.item() == pytest.approx(want.item(), rel=1e-2)
    largest = max(p.grad.abs().max() for p in plain.parameters())
    for (name, p), q in zip(fast.named_parameters(), plain.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max() <= 2e-2 * largest, name
