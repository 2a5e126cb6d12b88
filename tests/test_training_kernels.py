"""The hand-written training backwards (RMSNorm, token-major RoPE): the values and gradients of the autograd paths
they replace, within fp32 rounding, and the training graph actually using them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.model import layers, rms_norm
from lmforge.model.decoder import DecoderLM
from lmforge.model.rotary import rotate_token_major

TOLERANCE = 1e-5  # of the largest value: fp32 results differ by summation order only (~1e-7)


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return bool((got - want).abs().max() <= TOLERANCE * want.abs().max())


def test_rms_norm_matches_the_decomposition() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 24, requires_grad=True)
    weight = (torch.rand(24) + 0.5).requires_grad_()
    grad = torch.randn(3, 5, 24)
    got = rms_norm.rms_norm(x, weight, 1e-5)
    got_x, got_w = torch.autograd.grad(got, (x, weight), grad)
    want = F.rms_norm(x, (24,), eps=1e-5) * weight
    want_x, want_w = torch.autograd.grad(want, (x, weight), grad)
    assert _close(got, want) and _close(got_x, want_x) and _close(got_w, want_w)


def test_rotate_token_major_matches_apply_rope() -> None:
    torch.manual_seed(0)
    cos, sin = layers.rope_tables(7, 8, 10000.0)
    x = torch.randn(2, 7, 3, 8, requires_grad=True)  # [B, T, heads, head_dim]
    grad = torch.randn(2, 7, 3, 8)
    got = rotate_token_major(x, cos, sin)
    (got_x,) = torch.autograd.grad(got, x, grad)
    want = layers.apply_rope(x.transpose(1, 2), cos, sin).transpose(1, 2)
    (want_x,) = torch.autograd.grad(want, x, grad)
    assert _close(got, want) and _close(got_x, want_x)


@pytest.mark.parametrize("family", [dict(family="llama", n_kv_head=2), dict(family="qwen3", n_kv_head=2)])
def test_decoder_gradients_match_the_autograd_paths(family: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GQA Llama and a Qwen3 (q/k norms) decoder: the same loss and parameter gradients with the hand-written
    backwards as with autograd's, and the training graph runs through them."""
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=61, max_seq_len=16, n_layer=2, n_head=4, d_model=32, **family)).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # norm gains off 1, so their gradients matter
    ids, labels = torch.randint(0, 61, (3, 16)), torch.randint(0, 61, (3, 16))

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        loss = model(ids, labels=labels)
        return loss, list(torch.autograd.grad(loss, list(model.parameters())))

    loss, grads = loss_and_grads()
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(edge for edge, _ in node.next_functions)
    kinds = {type(node).__name__ for node in seen}
    assert {"_RMSNormBackward", "_RotateBackward"} <= kinds

    monkeypatch.setattr(rms_norm, "takes_fast_path", lambda x, weight: False)
    monkeypatch.setattr(layers.Attention, "_rotated_training_qkv", _autograd_rotated_qkv)
    want_loss, want_grads = loss_and_grads()
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    largest = max(g.abs().max() for g in want_grads)
    for (name, _), got, want in zip(model.named_parameters(), grads, want_grads, strict=True):
        assert (got - want).abs().max() <= TOLERANCE * largest, name


def _autograd_rotated_qkv(self: layers.Attention, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
    q, k, v = self.project_qkv(x)
    if self.q_norm is not None:
        q, k = self.q_norm(q), self.k_norm(k)
    return layers.apply_rope(q, *rope), layers.apply_rope(k, *rope), v
