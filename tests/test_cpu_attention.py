"""The C++ causal-attention kernel for CPU training (model/cpu_attention.cpp): SDPA's values and gradients in fp64 up
to fp32 rounding, for every head size it has, grouped heads, odd lengths and strided layouts, with and without the
RoPE it applies itself; bf16 through fp32; the
same bits at any thread count; built once into the cache; not used (one warning) when it cannot be built or
disagrees; and taken by both decoder families in training."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.model import attention, cpu_attention
from lmforge.model.decoder import DecoderLM

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None,
                                reason="no C++ compiler to build the kernel with")


def token_major(batch: int, heads: int, length: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, T, head_dim] as a view of [B, T, H, head_dim], the layout the attention layer hands over."""
    return torch.randn(batch, length, heads, head_dim, dtype=dtype).transpose(1, 2).requires_grad_()


def attention_and_grads(fn, q, k, v, grad):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def sdpa(q, k, v, scale=0.3):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


def rope_tables(length: int, head_dim: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head_dim] of random angles in the half-split layout (each half the same angles)."""
    angles = torch.rand(length, head_dim // 2, dtype=torch.float64).mul_(6).repeat(1, 2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize(("batch", "heads", "kv_heads", "length", "head_dim"), [
    (2, 4, 4, 37, 16), (3, 6, 2, 256, 32), (1, 2, 1, 130, 64), (2, 2, 2, 9, 128), (1, 3, 3, 2, 32)])
def test_fp32_matches_sdpa_in_fp64(batch: int, heads: int, kv_heads: int, length: int, head_dim: int,
                                   rope: bool) -> None:
    """Output and gradients within 2e-5 of the largest value of fp64 SDPA's (after `layers.apply_rope`, with RoPE),
    as fp32 SDPA is; a wrong mask, scale, head group, stride or rotation is off by O(1)."""
    torch.manual_seed(0)
    q = token_major(batch, heads, length, head_dim, torch.float32)
    k, v = (token_major(batch, kv_heads, length, head_dim, torch.float32) for _ in range(2))
    grad = torch.randn(batch, heads, length, head_dim)
    tables = rope_tables(length, head_dim, torch.float64) if rope else None
    got = attention_and_grads(
        lambda *t: cpu_attention.causal_attention(*t, scale=0.3, rope=tables and tuple(x.float() for x in tables)),
        q, k, v, grad)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = attention_and_grads(lambda *t: cpu_attention.reference_attention(*t, 0.3, tables), *exact, grad.double())
    for name, g, w in zip(("output", "dq", "dk", "dv"), got, want, strict=True):
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        assert (g.double() - w).abs().max() <= 2e-5 * w.abs().max(), name


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 4, 32), (6, 2, 16), (2, 1, 64)])
def test_packed_matches_sdpa_in_fp64(heads: int, kv_heads: int, head_dim: int, rope: bool) -> None:
    """q, k and v packed in one tensor [B, T, H + 2 H_kv, head_dim] as one fused projection writes them: the same
    output as `reference_attention` on their views, and the gradient written in one tensor like the input."""
    torch.manual_seed(3)
    length = 45
    qkv = torch.randn(2, length, heads + 2 * kv_heads, head_dim, requires_grad=True)
    grad = torch.randn(2, heads, length, head_dim)
    tables = rope_tables(length, head_dim, torch.float64) if rope else None
    out = cpu_attention.packed_causal_attention(qkv, heads, kv_heads, 0.3, tables and tuple(t.float() for t in tables))
    (got,) = torch.autograd.grad(out, qkv, grad)
    exact = qkv.detach().double().requires_grad_()
    want_out = cpu_attention.reference_attention(*cpu_attention.unpack_heads(exact, heads, kv_heads), 0.3, tables)
    (want,) = torch.autograd.grad(want_out, exact, grad.double())
    assert got.shape == qkv.shape and got.dtype == torch.float32
    assert (out.double() - want_out).abs().max() <= 2e-5 * want_out.abs().max()
    assert (got.double() - want).abs().max() <= 2e-5 * want.abs().max()


def test_rope_tables_of_another_shape_are_refused() -> None:
    """The kernel reads T rows of head_dim from each table: anything else is refused before it reads."""
    q = token_major(1, 2, 8, 32, torch.float32)
    with pytest.raises(ValueError, match=r"\[T, head_dim\] = \[8, 32\]"):
        cpu_attention.causal_attention(q, q, q, rope=rope_tables(7, 32))


def test_bf16_is_computed_in_fp32_and_rounded_once() -> None:
    """bf16 in, bf16 out: within one bf16 rounding (2^-8 of the largest) of the exact result on the same inputs."""
    torch.manual_seed(1)
    q, k, v = (token_major(2, 4, 64, 32, torch.bfloat16) for _ in range(3))
    grad = torch.randn(2, 4, 64, 32, dtype=torch.bfloat16)
    got = attention_and_grads(lambda *t: cpu_attention.causal_attention(*t, scale=0.3), q, k, v, grad)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = attention_and_grads(sdpa, *exact, grad.double())
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.bfloat16
        assert (g.double() - w).abs().max() <= 2**-8 * w.abs().max()


def test_the_same_bits_at_any_thread_count() -> None:
    """Each (batch, kv head) is summed by one thread in a fixed order, so 1 and 2 threads agree exactly."""
    torch.manual_seed(2)
    q, k, v = (token_major(2, 4, 100, 32, torch.float32) for _ in range(3))
    grad = torch.randn(2, 4, 100, 32)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(attention_and_grads(cpu_attention.causal_attention, q, k, v, grad))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_not_taken_without_a_gradient_in_fp64_for_other_head_sizes_or_lengths() -> None:
    q = token_major(1, 4, 8, 32, torch.float32)
    assert cpu_attention.takes_fast_path(q, q, q)
    assert cpu_attention.takes_fast_path(q, q[:, :2], q[:, :2])  # grouped heads
    assert not cpu_attention.takes_fast_path(q.double(), q.double(), q.double())
    odd = token_major(1, 4, 8, 48, torch.float32)
    assert not cpu_attention.takes_fast_path(odd, odd, odd)
    assert not cpu_attention.takes_fast_path(q, q[:, :, :4], q[:, :, :4])  # keys of another length
    assert not cpu_attention.takes_fast_path(q, q[:, :3], q[:, :3])  # 4 query heads do not group over 3
    with torch.no_grad():
        assert not cpu_attention.takes_fast_path(q, q, q)


def test_not_taken_with_fewer_batch_and_kv_head_pairs_than_threads() -> None:
    """The kernel gives each thread whole (batch, kv head) pairs; with fewer pairs than threads SDPA keeps them busy."""
    q = token_major(2, 4, 8, 32, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        assert cpu_attention.takes_fast_path(q, q, q)  # 2 x 4 pairs
        assert not cpu_attention.takes_fast_path(q, q[:, :2], q[:, :2])  # 2 x 2
        torch.set_num_threads(1)
        assert cpu_attention.takes_fast_path(q[:1], q[:1, :1], q[:1, :1])
    finally:
        torch.set_num_threads(threads)


def test_built_once_into_the_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu_attention.kernel.cache_clear()
    try:
        assert cpu_attention.kernel() is not None
        built = list((tmp_path / "lmforge").glob("cpu_attention-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        cpu_attention.kernel.cache_clear()
        assert cpu_attention.kernel() is not None
        assert built[0].stat().st_mtime_ns == stamp and len(list((tmp_path / "lmforge").iterdir())) == 1
    finally:
        cpu_attention.kernel.cache_clear()


@pytest.mark.parametrize("compiler", ["/nonexistent/g++", "false"])
def test_without_a_working_compiler_attention_falls_back_to_sdpa(compiler: str, tmp_path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", compiler)
    cpu_attention.kernel.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="did not build.*runs through SDPA"):
            assert cpu_attention.kernel() is None
        q = token_major(1, 2, 8, 32, torch.float32)
        assert not cpu_attention.takes_fast_path(q, q, q)
    finally:
        cpu_attention.kernel.cache_clear()


def test_an_unusable_cache_dir_falls_back_to_sdpa(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    cpu_attention.kernel.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="did not build.*runs through SDPA"):
            assert cpu_attention.kernel() is None
        assert blocker.read_text() == "not a directory"
    finally:
        cpu_attention.kernel.cache_clear()


class _WrongBackward:
    """The real kernel with the backward's softmax scale doubled."""

    def __init__(self) -> None:
        self.real = cpu_attention.kernel()
        self.causal_attention_forward = self.real.causal_attention_forward

    def causal_attention_backward(self, *args) -> int:
        *head, scale, cos, sin, threads = args
        return self.real.causal_attention_backward(*head, 2 * scale, cos, sin, threads)


class _SwappedTables:
    """The kernel, handed RoPE's sin table for its cos and the reverse: a rotation by 90 degrees less the angle."""

    def __init__(self) -> None:
        self.real = cpu_attention.kernel()
        self.causal_attention_backward = self.real.causal_attention_backward

    def causal_attention_forward(self, *args) -> int:
        *head, cos, sin, threads = args
        return self.real.causal_attention_forward(*head, sin, cos, threads)


def test_the_check_rejects_a_kernel_that_disagrees() -> None:
    assert cpu_attention.kernel_problem(cpu_attention.kernel()) is None
    problem = cpu_attention.kernel_problem(_WrongBackward())
    assert problem is not None and "dq" in problem
    problem = cpu_attention.kernel_problem(_SwappedTables())
    assert problem is not None and "output" in problem and "RoPE" in problem


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("packed", [True, False])
def test_decoder_training_takes_it(family: str, bf16: bool, packed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layer's attention takes the kernel, in fp32 and under bf16 autocast (Llama's with its RoPE applied inside
    the kernel): with plain projections their one fused output packed, else (wrapped projections, as LoRA's) three
    tensors. The loss and gradients match the SDPA path: within fp32 rounding (1e-5 of the largest gradient), or bf16
    autocast's (2%)."""
    torch.manual_seed(0)
    fast = DecoderLM(ModelConfig(family=family, vocab_size=64, max_seq_len=16, n_layer=2, n_head=4,
                                 d_model=64)).train()
    plain = copy.deepcopy(fast)
    ids = torch.randint(0, 64, (3, 16))
    calls = []

    def counted(*args):
        calls.append(("three", args[0].dtype, len(args) == 5 and args[4] is not None))
        return cpu_attention.causal_attention(*args)

    def counted_packed(*args):
        calls.append(("packed", args[0].dtype, args[4] is not None))
        return cpu_attention.packed_causal_attention(*args)

    if not packed:  # as for projections LoRA wraps
        monkeypatch.setattr(attention.Attention, "_plain_qkv", lambda self: None)
    monkeypatch.setattr(attention, "packed_causal_attention", counted_packed)

    def loss_of(model: DecoderLM) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        return loss

    monkeypatch.setattr(attention, "causal_attention", counted)
    got = loss_of(fast)
    kind = "packed" if packed else "three"
    assert calls == [(kind, torch.bfloat16 if bf16 else torch.float32, family == "llama")] * 2  # Llama's RoPE inside
    monkeypatch.setattr(attention, "takes_fast_path", lambda *_: False)
    want = loss_of(plain)
    assert len(calls) == 2
    tolerance = 2e-2 if bf16 else 1e-5
    assert got.item() == pytest.approx(want.item(), rel=tolerance)
    largest = max(p.grad.abs().max() for p in plain.parameters())
    for (name, p), q in zip(fast.named_parameters(), plain.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max() <= tolerance * largest, name


def test_a_frozen_decoder_under_grad_mode_attends_without_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Grad mode on but nothing wanting a gradient (a frozen model): the shape fits the kernel, but it needs a
    gradient to record, so the layer rotates q and k itself and attends through SDPA, with the same loss as without
    grad mode."""
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(family="llama", vocab_size=64, max_seq_len=16, n_layer=2, n_head=4, d_model=64))
    model.requires_grad_(False).train()
    ids = torch.randint(0, 64, (3, 16))
    calls = []
    monkeypatch.setattr(attention, "causal_attention", lambda *args: calls.append(args))
    monkeypatch.setattr(attention, "packed_causal_attention", lambda *args: calls.append(args))
    loss = model(ids[:, :-1], labels=ids[:, 1:])
    with torch.no_grad():
        want = model(ids[:, :-1], labels=ids[:, 1:])
    assert not calls and not loss.requires_grad
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)

