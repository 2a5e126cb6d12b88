"""The hand-written training backwards (RMSNorm's C++ kernel, token-major RoPE, RoPE as a complex multiplication): the
values and gradients of the autograd paths they replace, within fp32 rounding, and the training graph actually using
them; the RMSNorm kernel's bits at any thread count, its check, and the eager path where it cannot be used."""

from __future__ import annotations

import ctypes
import shutil

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.model import attention, layers, rms_norm
from lmforge.model.decoder import DecoderLM
from lmforge.model.rotary import pairs_adjacent, rotate_adjacent_pairs, rotate_token_major

TOLERANCE = 1e-5  # of the largest value: fp32 results differ by summation order only (~1e-7)
needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None,
                                    reason="no C++ compiler to build the RMSNorm kernel with")


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return bool((got - want).abs().max() <= TOLERANCE * want.abs().max())


@needs_compiler
@pytest.mark.parametrize("shape", [(3, 5, 24), (2, 100, 45)])  # rows over several chunks; a width of no whole vectors
@pytest.mark.parametrize("trained", ["both", "input", "weight"])
def test_rms_norm_matches_the_decomposition(trained: str, shape: tuple[int, ...]) -> None:
    """Also with the gain frozen (LoRA) or the input not needing a gradient: each asked-for gradient is right."""
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=trained != "weight")
    weight = (torch.rand(shape[-1]) + 0.5).requires_grad_(trained != "input")
    wanted = [t for t in (x, weight) if t.requires_grad]
    grad = torch.randn(*shape)
    assert rms_norm.takes_fast_path(x, weight)
    got = rms_norm.rms_norm(x, weight, 1e-5)
    got_grads = torch.autograd.grad(got, wanted, grad)
    want = F.rms_norm(x, (shape[-1],), eps=1e-5) * weight
    want_grads = torch.autograd.grad(want, wanted, grad)
    assert _close(got, want)
    assert all(_close(g, w) for g, w in zip(got_grads, want_grads, strict=True))


def test_rms_norm_kernel_refuses_what_it_cannot_read() -> None:
    """A weight of another width or a non-fp32 input would be read out of bounds or misread: refused first."""
    x = torch.randn(3, 8, requires_grad=True)
    for bad in ((x, torch.ones(7)), (x.double(), torch.ones(8, dtype=torch.float64))):
        with pytest.raises(ValueError, match="fp32 CPU tensors"):
            rms_norm.rms_norm(*bad, 1e-5)


@needs_compiler
def test_rms_norm_kernel_gives_the_same_bits_at_any_thread_count() -> None:
    """Rows are independent and the weight's gradient is summed in fixed chunks, so 1 and 2 threads agree exactly."""
    torch.manual_seed(1)
    x, grad = torch.randn(300, 40, requires_grad=True), torch.randn(300, 40)
    weight = (torch.rand(40) + 0.5).requires_grad_()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = rms_norm.rms_norm(x, weight, 1e-5)
            results.append((out, *torch.autograd.grad(out, (x, weight), grad)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


class _ZeroWeightGradient:
    """The real RMSNorm kernel, except that the backward leaves the weight's gradient zero."""

    def __init__(self) -> None:
        self.real = rms_norm.kernel()
        self.rms_norm_forward = self.real.rms_norm_forward

    def rms_norm_backward(self, g, x, w, inv_rms, grad_x, grad_w, shares, rows, d, threads) -> None:
        self.real.rms_norm_backward(g, x, w, inv_rms, grad_x, grad_w, shares, rows, d, threads)
        ctypes.memset(grad_w, 0, 4 * d)


@needs_compiler
def test_rms_norm_check_rejects_a_kernel_that_disagrees() -> None:
    assert rms_norm.kernel_problem(rms_norm.kernel()) is None
    problem = rms_norm.kernel_problem(_ZeroWeightGradient())
    assert problem is not None and "grad_weight" in problem


def test_rms_norm_takes_its_eager_path_without_the_kernel(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No compiler: one warning, and the layer's values and gradients are `F.rms_norm`'s."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    rms_norm.kernel.cache_clear()
    try:
        norm = layers.RMSNorm(16, 1e-5)
        x = torch.randn(4, 16, requires_grad=True)
        with pytest.warns(RuntimeWarning, match="RMSNorm kernel did not build.*F.rms_norm"):
            assert not rms_norm.takes_fast_path(x, norm.weight)
        out = norm(x)
        assert out.grad_fn is not None and type(out.grad_fn).__name__ != "_RMSNormBackward"
        assert torch.equal(out, F.rms_norm(x, (16,), eps=1e-5) * norm.weight)
    finally:
        rms_norm.kernel.cache_clear()


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


def test_rotate_adjacent_pairs_matches_rotate_token_major() -> None:
    """Queries from a projection whose rows `pairs_adjacent` reordered, rotated as complex numbers: the rotated
    queries of the plain projection in the reordered layout, and the same gradients of the input and the weight
    (the incoming gradient reordered alike, so the loss is the same sum)."""
    torch.manual_seed(0)
    heads, head_dim = 3, 8
    cos, sin = layers.rope_tables(7, head_dim, 10000.0)
    x = torch.randn(2, 7, 5, requires_grad=True)
    weight = torch.randn(heads * head_dim, 5, requires_grad=True)
    grad = torch.randn(2, 7, heads, head_dim)
    order = pairs_adjacent(torch.arange(heads * head_dim), heads).view(heads, head_dim)[0]  # each head's new order

    want = rotate_token_major((x @ weight.t()).view(2, 7, heads, head_dim), cos, sin)
    want_grads = torch.autograd.grad(want, (x, weight), grad)
    got = rotate_adjacent_pairs((x @ pairs_adjacent(weight, heads).t()).view(2, 7, heads, head_dim), cos, sin)
    got_grads = torch.autograd.grad(got, (x, weight), grad[..., order])
    assert order.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert _close(got, want[..., order])
    assert all(_close(g, w) for g, w in zip(got_grads, want_grads, strict=True))


@pytest.mark.parametrize(("family", "rotation"), [
    (dict(family="llama", n_kv_head=2), "ViewAsRealBackward0"),  # RoPE as a complex multiplication
    (dict(family="qwen2", n_kv_head=2), "ViewAsRealBackward0"),  # ... with q/k biases reordered too
    (dict(family="qwen3", n_kv_head=2), "_RotateBackward"),  # q/k norms: token-major RoPE
])
def test_decoder_gradients_match_the_autograd_paths(family: dict, rotation: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A GQA Llama, a Qwen2 (q/k/v biases) and a Qwen3 (q/k norms) decoder: the same loss and parameter gradients with
    the hand-written backwards as with autograd's, and the training graph runs through them."""
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
    assert {"_RMSNormBackward", rotation} <= kinds

    monkeypatch.setattr(rms_norm, "takes_fast_path", lambda x, weight: False)
    monkeypatch.setattr(attention.Attention, "_rotated_training_qkv", _autograd_rotated_qkv)
    want_loss, want_grads = loss_and_grads()
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    largest = max(g.abs().max() for g in want_grads)
    for (name, _), got, want in zip(model.named_parameters(), grads, want_grads, strict=True):
        assert (got - want).abs().max() <= TOLERANCE * largest, name


def test_padded_batches_train_through_per_row_rotations() -> None:
    """A padded batch gives each row its own positions, so RoPE's tables are per row [B, 1, T, head_dim]: training on
    one takes `apply_rope` (the training paths take [T, head_dim] tables only), and each row's loss and gradients
    match the row trained alone without its padding."""
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=61, max_seq_len=16, n_layer=2, n_head=4, d_model=32, family="llama"))
    model.train()
    ids, labels = torch.randint(0, 61, (2, 16)), torch.randint(0, 61, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :5] = 0  # row 0 left-padded by 5
    labels[0, :5] = -100
    padded = model(ids, attention_mask=mask, labels=labels)
    got = torch.autograd.grad(padded, list(model.parameters()))
    alone = model(ids[:1, 5:], labels=labels[:1, 5:]) + model(ids[1:], labels=labels[1:])
    want = torch.autograd.grad(alone, list(model.parameters()))
    assert padded.item() == pytest.approx(alone.item(), rel=1e-5)
    largest = max(g.abs().max() for g in want)
    for (name, _), g, w in zip(model.named_parameters(), got, want, strict=True):
        assert (g - w).abs().max() <= 1e-4 * largest, name


def _autograd_rotated_qkv(self: attention.Attention, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
    q, k, v = self.project_qkv(x)
    if self.q_norm is not None:
        q, k = self.q_norm(q), self.k_norm(k)
    return layers.apply_rope(q, *rope), layers.apply_rope(k, *rope), v
