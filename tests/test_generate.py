"""Generation: KV-cache parity, sampling, top-k/top-p, stop strings, EOS, streaming and argument checks."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.decoding import filter_logits, greedy_ids, next_token
from lmforge.infer.generate import SamplingConfig, generate, generate_ids
from lmforge.model.decoder import DecoderLM
from lmforge.tokenizer import Tokenizer, train_tokenizer
from near_ties import assert_clear_greedy
from tiny_decoders import FAMILIES, forced_model, tiny_model


def count_forwards(model: DecoderLM) -> list[torch.Tensor]:
    """Record the input ids of every model forward."""
    calls: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda _m, args, kwargs: calls.append(args[0].clone()), with_kwargs=True)
    return calls


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    lines = [f"once upon a time {i} the owl sang a song about the sea and the stars" for i in range(150)]
    lines += ["König naïve café 😀", "numbers 0123456789", "The Quick Brown Fox!"] * 10
    return train_tokenizer(lines, vocab_size=420, show_progress=False)


# ---- KV cache -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_same_with_and_without_cache(family: str) -> None:
    model = tiny_model(family)
    prompt = [3, 17, 42, 5, 9, 60, 1, 22]
    with_cache = generate_ids(model, prompt, SamplingConfig(max_new_tokens=40, temperature=0, use_cache=True))
    without = generate_ids(model, prompt, SamplingConfig(max_new_tokens=40, temperature=0, use_cache=False))
    assert len(with_cache) == 40
    assert_clear_greedy(model, prompt, without)
    assert with_cache == without
    assert len(set(with_cache)) > 1  # not a degenerate constant output


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_incremental_logits_match_full_forward(family: str) -> None:
    model = tiny_model(family, seed=1)
    torch.manual_seed(2)
    ids = torch.randint(0, 64, (2, 40))
    with torch.inference_mode():
        full = model(ids)
        cache = model.new_cache(2, 40)
        chunks = [model(ids[:, :10], cache=cache), model(ids[:, 10:15], cache=cache)]  # prefill, then a chunk
        chunks += [model(ids[:, t:t + 1], cache=cache) for t in range(15, 40)]  # then one token at a time
    assert cache.length == 40
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)


def test_generate_uses_one_forward_per_token() -> None:
    model = tiny_model("gpt2")
    calls = count_forwards(model)
    out = generate_ids(model, [1, 2, 3], SamplingConfig(max_new_tokens=7, temperature=0))
    assert len(out) == 7
    assert [c.shape[1] for c in calls] == [3] + [1] * 6  # prefill, then single positions; none wasted
    assert [int(c[0, 0]) for c in calls[1:]] == out[:-1]


# ---- sampling --------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible() -> None:
    model = tiny_model("llama-gqa", init_std=0.02)  # near-uniform: sampling has plenty of freedom
    prompt = [4, 8, 15, 16, 23, 42]

    def sample(seed: int, global_seed: int) -> list[int]:
        torch.manual_seed(global_seed)  # the global RNG must not matter, only cfg.seed
        return generate_ids(model, prompt, SamplingConfig(max_new_tokens=40, temperature=1.0, seed=seed))

    a, b, c = sample(7, global_seed=1), sample(7, global_seed=2), sample(8, global_seed=1)
    assert len(a) == len(c) == 40
    assert a == b
    assert a != c
    assert len(set(a)) > 10
    # without a seed, the global RNG decides
    torch.manual_seed(3)
    unseeded = generate_ids(model, prompt, SamplingConfig(max_new_tokens=40, temperature=1.0))
    torch.manual_seed(3)
    assert generate_ids(model, prompt, SamplingConfig(max_new_tokens=40, temperature=1.0)) == unseeded


def test_temperature_zero_is_argmax() -> None:
    model = tiny_model("alibi", seed=3)
    prompt = [10, 20, 30]
    out = generate_ids(model, prompt, SamplingConfig(max_new_tokens=15, temperature=0, seed=5))
    seq = list(prompt)
    with torch.inference_mode():
        for _ in range(15):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert_clear_greedy(model, prompt, seq[len(prompt):])
    assert out == seq[len(prompt):]
    logits = torch.randn(5, 64)
    cfg = SamplingConfig(temperature=0, top_k=3, top_p=0.5)
    assert torch.equal(next_token(logits, cfg, torch.Generator().manual_seed(0)), logits.argmax(dim=-1))


def test_default_config_decodes_greedily() -> None:
    """SamplingConfig() is greedy, like `lmforge generate` and transformers' generate: no seed needed for one
    answer (it sampled at temperature 1 once)."""
    model = tiny_model("llama-gqa", seed=4, max_seq_len=96)
    prompt = [7, 1, 30]
    seq = list(prompt)
    with torch.inference_mode():
        for _ in range(SamplingConfig().max_new_tokens):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    torch.manual_seed(0)
    assert generate_ids(model, prompt, SamplingConfig()) == seq[len(prompt):]


def test_top_k_one_sampling_is_greedy() -> None:
    model = tiny_model("sinusoidal")
    prompt = [1, 2, 3, 4]
    greedy = generate_ids(model, prompt, SamplingConfig(max_new_tokens=20, temperature=0))
    sampled = generate_ids(model, prompt, SamplingConfig(max_new_tokens=20, temperature=1.5, top_k=1, seed=0))
    assert sampled == greedy


# ---- filter_logits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5, 49])
def test_top_k_keeps_exactly_k(k: int) -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    out = filter_logits(logits, top_k=k, top_p=1.0)
    finite = torch.isfinite(out)
    assert finite.sum(dim=-1).tolist() == [k] * 3
    top = torch.topk(logits, k, dim=-1).indices
    assert finite.gather(-1, top).all()
    assert torch.equal(out[finite], logits[finite])  # kept logits are unchanged
    assert (out[~finite] == float("-inf")).all()


@pytest.mark.parametrize("k", [0, 50, 100])
def test_top_k_off_or_larger_than_vocab_is_identity(k: int) -> None:
    logits = torch.randn(2, 50)
    assert torch.equal(filter_logits(logits, top_k=k, top_p=1.0), logits)


def test_top_k_ties_are_kept() -> None:
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]])
    out = filter_logits(logits, top_k=2, top_p=1.0)
    kept = torch.isfinite(out)[0].tolist()
    assert kept[0] and not kept[4]
    assert sum(kept) >= 2


# probabilities in a shuffled order, so the result must be mapped back from the sorted order correctly
PROBS = torch.tensor([0.1, 0.4, 0.2, 0.3])


@pytest.mark.parametrize(
    "top_p, kept",
    [
        (1e-6, {1}),  # the top token always stays
        (0.35, {1}),  # 0.4 >= 0.35
        (0.5, {1, 3}),  # 0.4 < 0.5 <= 0.7
        (0.75, {1, 3, 2}),  # 0.7 < 0.75 <= 0.9
        (0.95, {0, 1, 2, 3}),
        (1.0, {0, 1, 2, 3}),
    ],
)
def test_top_p_hand_computed(top_p: float, kept: set[int]) -> None:
    out = filter_logits(PROBS.log()[None], top_k=0, top_p=top_p)[0]
    assert {i for i in range(4) if torch.isfinite(out[i])} == kept
    assert torch.allclose(out[list(kept)], PROBS.log()[list(kept)])


@pytest.mark.parametrize("top_p, n_kept", [(0.5, 1), (0.75, 2), (0.875, 3), (0.9, 4)])
def test_top_p_exact_boundary(top_p: float, n_kept: int) -> None:
    """Dyadic probabilities are exact in float32: a prefix whose mass equals p exactly is enough."""
    probs = torch.tensor([0.125, 0.5, 0.125, 0.25])  # sorted: 0.5, 0.25, then a tie of 0.125s
    out = filter_logits(probs.log()[None], top_k=0, top_p=top_p)[0]
    assert int(torch.isfinite(out).sum()) == n_kept
    assert torch.isfinite(out[[1, 3][:n_kept]]).all()


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.8, 0.97])
def test_top_p_keeps_smallest_prefix_reaching_p(top_p: float) -> None:
    torch.manual_seed(1)
    logits = torch.randn(16, 30) * 2
    out = filter_logits(logits, top_k=0, top_p=top_p)
    probs = logits.softmax(dim=-1)
    for row in range(logits.shape[0]):
        kept = torch.isfinite(out[row])
        n = int(kept.sum())
        order = probs[row].argsort(descending=True)
        assert kept[order[:n]].all(), "kept tokens must be the most likely ones"
        mass = probs[row][kept].sum()
        assert mass >= top_p - 1e-6  # reaches p
        assert mass - probs[row][kept].min() < top_p + 1e-6  # and no smaller prefix does
        assert kept[order[0]]


def test_top_k_then_top_p() -> None:
    logits = PROBS.log()[None]
    # top-2 leaves {0.4, 0.3}, renormalised to {4/7, 3/7}: 4/7 alone reaches 0.5
    out = filter_logits(logits, top_k=2, top_p=0.5)
    assert torch.isfinite(out)[0].tolist() == [False, True, False, False]
    # top-p alone at 0.5 keeps two; top-k binds when p is loose
    assert torch.isfinite(filter_logits(logits, top_k=0, top_p=0.5)).sum() == 2
    assert torch.isfinite(filter_logits(logits, top_k=3, top_p=0.99))[0].tolist() == [False, True, True, True]


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.6), (10, 0.9), (3, 0.3)])
def test_filter_matches_transformers_warpers(top_k: int, top_p: float) -> None:
    lp = pytest.importorskip("transformers.generation.logits_process")
    torch.manual_seed(4)
    logits = torch.randn(8, 40) * 3
    expected = logits.clone()
    if top_k:
        expected = lp.TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = lp.TopPLogitsWarper(top_p)(None, expected)
    out = filter_logits(logits, top_k, top_p)
    assert torch.equal(torch.isfinite(out), torch.isfinite(expected))


def chi_square(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    expected = expected_probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_top_k_sampling_frequencies() -> None:
    probs = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.15])
    n = 4000
    cfg = SamplingConfig(temperature=1.0, top_k=2)
    draws = next_token(probs.log().expand(n, -1), cfg, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=5).double()
    assert counts[[0, 2, 4]].sum() == 0  # outside the top 2: never drawn
    renormalised = torch.tensor([0.5, 0.2], dtype=torch.float64) / 0.7
    assert chi_square(counts[[1, 3]], renormalised) < 10.83  # chi-square, 1 dof, p = 0.001


def test_temperature_sampling_frequencies() -> None:
    probs = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.15], dtype=torch.float64)
    n = 4000
    cfg = SamplingConfig(temperature=0.5)
    draws = next_token(probs.log().float().expand(n, -1), cfg, torch.Generator().manual_seed(1))
    counts = torch.bincount(draws, minlength=5).double()
    sharpened = probs**2 / (probs**2).sum()  # p^(1/T), renormalised
    assert chi_square(counts, sharpened) < 18.47  # 4 dof, p = 0.001
    assert chi_square(counts, probs) > 100  # and clearly not the untempered distribution


# ---- stop strings, EOS and streaming ---------------------------------------------------------------

STORY = "once upon a time STOP the owl sang and sang"


def run_forced(tok: Tokenizer, prompt: str, target: str, cfg: SamplingConfig) -> tuple[str, list[str], int]:
    """Generate from a model forced to emit `target`'s tokens; returns (text, deltas, forward count)."""
    model = forced_model(tok.vocab_size, len(tok.encode(prompt)), tok.encode(target))
    calls = count_forwards(model)
    deltas: list[str] = []
    text = generate(model, tok, prompt, cfg, stream=deltas.append)
    return text, deltas, len(calls)


@pytest.mark.parametrize("use_cache", [True, False])
def test_forced_model_emits_its_target(tok: Tokenizer, use_cache: bool) -> None:
    target = "the owl sang about the stars"
    cfg = SamplingConfig(max_new_tokens=len(tok.encode(target)), temperature=0, use_cache=use_cache)
    text, deltas, _ = run_forced(tok, "Hi", target, cfg)
    assert text == target
    assert "".join(deltas) == target


@pytest.mark.parametrize("use_cache", [True, False])
def test_stop_string_truncates_and_halts(tok: Tokenizer, use_cache: bool) -> None:
    ids = tok.encode(STORY)
    # the token at which "STOP" first appears in the decoded text
    k = next(i for i in range(1, len(ids) + 1) if "STOP" in tok.decode(ids[:i]))
    assert k < len(ids) - 2
    assert len(tok.encode("STOP")) > 1  # the stop string spans several tokens, so hold-back matters
    cfg = SamplingConfig(max_new_tokens=40, temperature=0, stop=["STOP"], use_cache=use_cache)
    text, deltas, forwards = run_forced(tok, "Hi", STORY, cfg)
    assert text == STORY[: STORY.index("STOP")]
    assert "STOP" not in text and "ST" not in text
    assert "".join(deltas) == text
    assert all(deltas)
    assert forwards == k  # stopped right at the token that completed the stop string


def test_earliest_of_several_stop_strings_wins(tok: Tokenizer) -> None:
    cfg = SamplingConfig(max_new_tokens=40, temperature=0, stop=["sang", "time", "zebra"])
    text, deltas, _ = run_forced(tok, "Hi", STORY, cfg)
    assert text == "once upon a "
    assert "".join(deltas) == text


def test_partial_stop_prefix_is_released(tok: Tokenizer) -> None:
    """Text that looks like the start of a stop string is held back, then streamed once it is not one."""
    target = "once upon a STORM the owl"
    n = len(tok.encode(target))
    cfg = SamplingConfig(max_new_tokens=n, temperature=0, stop=["STOP"])
    text, deltas, forwards = run_forced(tok, "Hi", target, cfg)
    assert text == target
    assert "".join(deltas) == target
    assert forwards == n


def test_split_utf8_is_not_streamed_half_done(tok: Tokenizer) -> None:
    target = "owl 🦜 and 🐙 sea"  # emojis the tokenizer never saw: several byte tokens each
    assert len(tok.encode("🦜")) > 1
    cfg = SamplingConfig(max_new_tokens=len(tok.encode(target)), temperature=0)
    text, deltas, _ = run_forced(tok, "Hi", target, cfg)
    assert text == target
    assert "".join(deltas) == target
    assert not any("\ufffd" in d for d in deltas)


def test_stop_string_in_the_prompt_does_not_stop(tok: Tokenizer) -> None:
    target = "the owl sang"
    cfg = SamplingConfig(max_new_tokens=len(tok.encode(target)), temperature=0, stop=["STOP"])
    text, _, _ = run_forced(tok, "STOP now", target, cfg)
    assert text == target


@pytest.mark.parametrize("use_cache", [True, False])
def test_eos_stops_generation(tok: Tokenizer, use_cache: bool) -> None:
    eos = tok.eos_id
    assert eos is not None
    a, b, c, d = 300, 301, 302, 303
    model = forced_model(tok.vocab_size, 3, [a, b, eos, c, d])
    stop = generate_ids(model, [5, 6, 7], SamplingConfig(max_new_tokens=5, temperature=0, use_cache=use_cache),
                        eos_id=eos)
    assert stop == [a, b]
    keep = generate_ids(model, [5, 6, 7], SamplingConfig(max_new_tokens=5, temperature=0, use_cache=use_cache,
                                                         stop_at_eos=False), eos_id=eos)
    assert keep == [a, b, eos, c, d]
    # without an eos id nothing is special either
    assert generate_ids(model, [5, 6, 7], SamplingConfig(max_new_tokens=5, temperature=0)) == keep


def test_eos_stops_text_generation(tok: Tokenizer) -> None:
    prompt = "Hi"
    p = len(tok.encode(prompt))
    body = tok.encode("the owl")
    model = forced_model(tok.vocab_size, p, [*body, tok.eos_id, *tok.encode(" more")])
    deltas: list[str] = []
    assert generate(model, tok, prompt, SamplingConfig(max_new_tokens=20, temperature=0),
                    stream=deltas.append) == "the owl"
    assert "".join(deltas) == "the owl"
    cont = generate(model, tok, prompt, SamplingConfig(max_new_tokens=len(body) + 2, temperature=0,
                                                       stop_at_eos=False))
    assert cont.startswith("the owl<|eos|>")


def test_on_token_true_stops_early() -> None:
    model = tiny_model("gpt2")
    calls = count_forwards(model)
    seen: list[int] = []

    def on_token(tid: int) -> bool:
        seen.append(tid)
        return len(seen) == 3

    out = generate_ids(model, [1, 2], SamplingConfig(max_new_tokens=30, temperature=0), on_token=on_token)
    assert out == seen
    assert len(out) == 3
    assert len(calls) == 3
    full = generate_ids(model, [1, 2], SamplingConfig(max_new_tokens=30, temperature=0))
    assert full[:3] == out and len(full) == 30


# ---- argument checks -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=-3), "max_new_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=-0.5), "top_p"),
        (dict(stop=["ok", ""]), "stop strings"),
        (dict(top_p=1.01), "top_p"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(stop=["ok", "\udcff"]), "stop"),  # a non-UTF-8 byte from argv (surrogate escape) never matches text
    ],
)
def test_bad_sampling_args_fail_before_any_work(tok: Tokenizer, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        SamplingConfig(**kwargs)  # checked when made, naming the field and its `lmforge generate` option
    flag = "--" + match.split()[0].replace("_", "-")
    assert flag in str(info.value) and "\n" not in str(info.value)
    model = tiny_model("gpt2", vocab_size=tok.vocab_size)
    calls = count_forwards(model)
    cfg = SamplingConfig(max_new_tokens=3)
    for key, value in kwargs.items():  # a field changed after the config was made is checked before any work
        setattr(cfg, key, value)
    with pytest.raises(ConfigError, match=match):
        generate_ids(model, [1, 2, 3], cfg)
    with pytest.raises(ConfigError, match=match):
        generate(model, tok, "hello", cfg)
    assert calls == []


def test_boundary_sampling_args_are_valid() -> None:
    model = tiny_model("gpt2")
    for cfg in (SamplingConfig(max_new_tokens=1), SamplingConfig(max_new_tokens=2, temperature=0, top_k=0, top_p=1.0),
                SamplingConfig(max_new_tokens=2, temperature=1.0, top_p=1e-9, seed=0)):
        assert len(generate_ids(model, [1], cfg)) == cfg.max_new_tokens


def test_prompt_longer_than_context(tok: Tokenizer) -> None:
    model = tiny_model("gpt2")  # 64-token context
    calls = count_forwards(model)
    prompt = [(7 * i) % 64 for i in range(60)]
    with pytest.raises(LmforgeError, match="--truncate-prompt") as info:
        generate_ids(model, prompt, SamplingConfig(max_new_tokens=10, temperature=0))
    assert "60 tokens" in str(info.value) and "54" in str(info.value)
    assert calls == []
    # exactly filling the window is fine; one token more is not
    assert len(generate_ids(model, prompt[-54:], SamplingConfig(max_new_tokens=10, temperature=0))) == 10
    with pytest.raises(LmforgeError, match="--truncate-prompt"):
        generate_ids(model, prompt[-55:], SamplingConfig(max_new_tokens=10, temperature=0))
    with pytest.raises(LmforgeError, match="no room"):
        generate_ids(model, [1], SamplingConfig(max_new_tokens=64))


@pytest.mark.parametrize("use_cache", [True, False])
def test_truncate_prompt_keeps_last_tokens(use_cache: bool) -> None:
    model = tiny_model("llama-gqa")
    prompt = [(7 * i + 3) % 64 for i in range(60)]
    calls = count_forwards(model)
    cfg = SamplingConfig(max_new_tokens=10, temperature=0, truncate_prompt=True, use_cache=use_cache)
    out = generate_ids(model, prompt, cfg)
    assert calls[0][0].tolist() == prompt[-54:]
    cfg_plain = SamplingConfig(max_new_tokens=10, temperature=0, use_cache=use_cache)
    assert out == generate_ids(model, prompt[-54:], cfg_plain)
    assert len(out) == 10


def test_empty_prompt_raises(tok: Tokenizer) -> None:
    model = tiny_model("gpt2", vocab_size=tok.vocab_size)
    with pytest.raises(LmforgeError, match="empty"):
        generate_ids(model, [], SamplingConfig())
    with pytest.raises(LmforgeError, match="empty"):
        generate(model, tok, "", SamplingConfig())


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_greedy_ids() -> None:
    """SamplingConfig(compile=True) runs the decode step under torch.compile; the output must not change."""
    from lmforge.infer.decoding import _COMPILED

    model = tiny_model("llama-gqa")
    prompt = [3, 9, 27, 14]
    eager = generate_ids(model, prompt, SamplingConfig(max_new_tokens=12, temperature=0.0))
    compiled = generate_ids(model, prompt, SamplingConfig(max_new_tokens=12, temperature=0.0, compile=True))
    assert_clear_greedy(model, prompt, eager)
    assert compiled == eager and model in _COMPILED
    assert not any(n.startswith("_") for n, _ in model.named_modules())  # the wrapper is not a submodule


def test_greedy_ids_is_argmax_with_its_first_maximum_tie_break() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (64, 300), generator=g).float()  # many tied maxima per row
    assert torch.equal(greedy_ids(logits), logits.argmax(dim=-1))
    wide = torch.randn(3, 50257, generator=g)
    assert torch.equal(greedy_ids(wide), wide.argmax(dim=-1))
