"""The chunked head + cross-entropy the causal LM loss uses: the loss and every gradient of the plain logits path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.model import linear_cross_entropy
from lmforge.model.decoder import DecoderLM
from lmforge.train.objectives import causal_lm_loss, token_cross_entropy


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_chunked_loss_and_gradients_match_the_logits_path(tied: bool, precision: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Several chunks (7 tokens each) and ignored labels: the same summed loss and count, and the same gradient of
    every parameter (fp32: 1e-5 of the largest gradient; bf16 autocast: 2% for bf16's rounding of the head's
    gradient, which the chunks accumulate in fp32 where the logits path adds in bf16 inside one matmul)."""
    monkeypatch.setattr(linear_cross_entropy, "CHUNK_ELEMENTS", 50 * 7)
    torch.manual_seed(0)
    chunked = DecoderLM(ModelConfig(vocab_size=50, n_layer=1, n_head=2, d_model=16, max_seq_len=8,
                                    tie_embeddings=tied)).train()
    plain = copy.deepcopy(chunked)
    ids, labels = torch.randint(0, 50, (3, 8)), torch.randint(0, 50, (3, 8))
    labels[0, :3] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        got = causal_lm_loss(chunked, {"input_ids": ids, "labels": labels})
        want = token_cross_entropy(plain(ids), labels)
    assert got.total.dtype == torch.float32 and int(got.count) == int(want.count) == 21
    assert got.total.item() == pytest.approx(want.total.item(), rel=1e-5)
    got.total.backward()
    want.total.backward()
    largest = max(p.grad.abs().max() for p in plain.parameters())
    tolerance = 1e-5 if precision == "fp32" else 2e-2
    for (name, p), q in zip(chunked.named_parameters(), plain.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max() <= tolerance * largest, name



def test_fp32_head_is_cast_inside_under_bf16_autocast() -> None:
    """The bf16 copy of an fp32 head is made inside the function, so autograd holds no cast of the weight: its
    [vocab, d] gradient comes back in fp32 directly, not cast to bf16 and back (two passes over it)."""
    torch.manual_seed(0)
    hidden = torch.randn(12, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (12,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy.linear_cross_entropy(hidden, weight, labels)
    weight_edge = loss.grad_fn.next_functions[1][0]
    assert type(weight_edge).__name__ == "AccumulateGrad" and weight_edge.variable is weight
    loss.backward()
    assert weight.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = hidden.bfloat16() @ weight.bfloat16().t()
    want = torch.autograd.grad(F.cross_entropy(logits.float(), labels, reduction="sum"), weight)[0]
    assert (weight.grad - want).abs().max() <= 2e-2 * want.abs().max()
