"""The shared decode engine: continuous batching parity with one-request generation, cancelling, per-request
seeds, text and stop strings, refusals, and prefix caching."""

from __future__ import annotations

import threading

import pytest
import torch

from lmforge.config import PeftConfig
from lmforge.errors import ConfigError
from lmforge.infer import engine as engine_module
from lmforge.infer.engine import Engine, GenerationRequest, TokenEvent
from lmforge.infer.generate import SamplingConfig, generate, generate_ids
from lmforge.infer.prefix_cache import BLOCK, PrefixCache
from lmforge.infer.slots import BatchSlots
from lmforge.model.attention import Attention
from lmforge.model.decoder import DecoderLM
from lmforge.peft.config import apply_peft
from lmforge.peft.lora import apply_lora, lora_layers, set_adapter
from lmforge.tokenizer import Tokenizer, train_tokenizer
from near_ties import assert_clear_choices, greedy_logits
from tiny_decoders import FAMILIES, forced_model, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

Schedule = list[tuple[int, GenerationRequest]]  # (the step before which it is submitted, the request)


def run(engine: Engine, schedule: Schedule) -> list[list[TokenEvent]]:
    """Step `engine` until every request of `schedule` is done; returns each request's events, in schedule order."""
    ids: list[int] = []
    events: dict[int, list[TokenEvent]] = {}
    step = 0
    while len(ids) < len(schedule) or engine.has_work:
        ids += [engine.submit(r) for at, r in schedule if at == step]
        for event in engine.step():
            events.setdefault(event.request_id, []).append(event)
        step += 1
    return [events[i] for i in ids]


def tokens(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(1, 64, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# prompt and output lengths, and the step each request arrives at (3 rows: some wait for a free one; one prompt is
# longer than the shared cache so far, and the 64-token cache fills, so rows shift both ways)
ARRIVALS = [(0, 3, 45), (0, 12, 5), (2, 1, 20), (4, 25, 30), (6, 7, 10), (20, 20, 40), (21, 9, 2)]


def greedy_schedule() -> Schedule:
    return [(at, GenerationRequest(prompt(n, 20 + i), new, temperature=0))
            for i, (at, n, new) in enumerate(ARRIVALS)]


def soft_prompted(family: str, peft: PeftConfig) -> DecoderLM:
    """A tiny model with random soft-prompt parameters (prompt tuning keeps its slots in front of every cache row)."""
    model = tiny_model(family)
    apply_peft(model, peft)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.5)
    return model.eval()


MODELS = {**{family: lambda f=family: tiny_model(f) for family in FAMILIES},
          "gpt2-prompt-tuned": lambda: soft_prompted("gpt2", PeftConfig(method="prompt", prompt_len=4)),
          "llama-prefix-tuned": lambda: soft_prompted("llama-gqa", PeftConfig(method="prefix", prefix_len=3,
                                                                              reparam=False))}


@pytest.mark.parametrize("name", MODELS)
def test_concurrent_greedy_requests_match_each_alone(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = MODELS[name]()
    shifts: list[int] = []
    shift = BatchSlots._shift
    monkeypatch.setattr(BatchSlots, "_shift", lambda self, by: (shifts.append(by), shift(self, by))[1])
    batches: list[tuple[int, int]] = []  # (rows running, rows the decode step computes)
    decode = BatchSlots.decode
    monkeypatch.setattr(BatchSlots, "decode", lambda self, fed, **kw: (batches.append((len(fed), max(fed) + 1)),
                                                                       decode(self, fed, **kw))[1])
    engine = Engine(model, max_batch=3)
    seen: dict[int, list[torch.Tensor]] = {}
    engine.logits_hook = lambda rid, logits: seen.setdefault(rid, []).append(logits.clone())
    schedule = greedy_schedule()
    results = run(engine, schedule)
    assert min(shifts) < 0 < max(shifts)  # a prompt longer than the cache so far, and a full cache, both happened
    # the running rows move down into the rows freed below them: a decode step computes no free row
    assert all(running == computed for running, computed in batches) and min(batches)[0] < 3
    for rid, ((_, request), events) in enumerate(zip(schedule, results, strict=True)):
        alone = generate_ids(model, request.prompt_ids, SamplingConfig(max_new_tokens=request.max_new_tokens))
        reference = greedy_logits(model, request.prompt_ids, alone)
        assert_clear_choices(reference, f"request {rid}")
        assert tokens(events) == alone
        assert [e.finish_reason for e in events] == [None] * (len(alone) - 1) + ["length"]
        torch.testing.assert_close(torch.stack(seen[rid]), reference, atol=1e-5, rtol=0)
    assert engine.stats.running == engine.stats.waiting == 0
    assert all(m._fused is None for m in model.modules() if isinstance(m, Attention))  # unfused once idle
    assert engine.stats.generated_tokens == sum(r.max_new_tokens for _, r in schedule)
    assert engine.stats.prefill_tokens == sum(len(r.prompt_ids) for _, r in schedule)


def test_a_prefill_takes_at_most_its_padded_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Arrivals whose padded prompts exceed PREFILL_SLOTS are prefilled in several forwards, with the same outputs."""
    model = tiny_model("gpt2")
    schedule = [(0, r) for _, r in greedy_schedule()]  # all at once: 3, 12, 1, 25, 7, 20 and 9 tokens
    together = [tokens(e) for e in run(Engine(model, max_batch=7), schedule)]
    monkeypatch.setattr(engine_module, "PREFILL_SLOTS", 40)
    groups: list[list[int]] = []
    admit = Engine._admit
    monkeypatch.setattr(Engine, "_admit", lambda self, group, events: (
        groups.append([len(r.prompt_ids) for _, r, _ in group]), admit(self, group, events))[1])
    assert [tokens(e) for e in run(Engine(model, max_batch=7), schedule)] == together
    assert len(groups) > 1 and sorted(n for g in groups for n in g) == sorted(len(r.prompt_ids) for _, r in schedule)
    assert all(len(g) * max(g) <= 40 for g in groups if len(g) > 1)


def test_a_stop_id_ends_only_its_request() -> None:
    model = tiny_model("llama-gqa")
    schedule = greedy_schedule()[:3]
    plain = [tokens(e) for e in run(Engine(model, max_batch=3), schedule)]
    k = next(i for i, t in enumerate(plain[0]) if i >= 3 and t not in plain[0][:i] + plain[1] + plain[2])
    ended = GenerationRequest(schedule[0][1].prompt_ids, 45, temperature=0, stop_ids=frozenset({plain[0][k]}))
    results = run(Engine(model, max_batch=3), [(0, ended), *schedule[1:]])
    assert tokens(results[0]) == plain[0][:k] and results[0][-1] == TokenEvent(0, None, "", "stop", stop_id=plain[0][k])
    assert [tokens(e) for e in results[1:]] == plain[1:]


def test_cancel_frees_the_row_and_emits_one_event() -> None:
    engine = Engine(tiny_model("gpt2"), max_batch=1)
    running = engine.submit(GenerationRequest(prompt(5, 0), 30, temperature=0))
    waiting = engine.submit(GenerationRequest(prompt(4, 1), 30, temperature=0))
    queued = engine.submit(GenerationRequest(prompt(3, 2), 3, temperature=0))
    engine.step()
    assert (engine.stats.running, engine.stats.waiting) == (1, 2)
    engine.cancel(running)
    engine.cancel(queued)
    events = engine.step()
    assert [e for e in events if e.request_id in (running, queued)] == [
        TokenEvent(queued, None, "", "cancelled"), TokenEvent(running, None, "", "cancelled")]
    assert [e.request_id for e in events if e.token_id is not None] == [waiting, waiting]  # it took the free row
    assert (engine.stats.running, engine.stats.waiting) == (1, 0)
    engine.cancel(waiting)
    engine.cancel(running)  # already gone: ignored
    assert engine.step() == [TokenEvent(waiting, None, "", "cancelled")]
    assert not engine.has_work and engine.stats.running == 0 and engine.slots.busy() == []


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa"])
def test_a_seed_gives_the_same_samples_whatever_else_runs(family: str) -> None:
    model = tiny_model(family, init_std=0.05)  # flatter logits: samples differ from greedy
    seeded = GenerationRequest(prompt(6, 0), 20, temperature=1.0, top_k=30, top_p=0.95, seed=7)
    alone = tokens(run(Engine(model), [(0, seeded)])[0])
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=30, top_p=0.95, seed=7)
    assert alone == generate_ids(model, seeded.prompt_ids, cfg)
    same = dict(temperature=1.0, top_k=30, top_p=0.95)  # sampled together with the seeded request
    others = [(0, GenerationRequest(prompt(9, 1), 25, **same, seed=3)), (0, GenerationRequest(prompt(2, 2), 8, **same)),
              (3, GenerationRequest(prompt(4, 3), 12, temperature=0)), (2, GenerationRequest(prompt(5, 4), 9))]
    torch.manual_seed(0)
    beside = run(Engine(model, max_batch=5), [others[0], others[1], (2, seeded), *others[2:]])
    assert tokens(beside[2]) == alone
    assert alone != tokens(run(Engine(model), [(0, GenerationRequest(prompt(6, 0), 20, seed=8))])[0])


@pytest.mark.parametrize("change, match", [
    (dict(prompt_ids=list(range(1, 60)), max_new_tokens=6), "59 tokens; with max_new_tokens=6 it needs 65 of the 64"),
    (dict(prompt_ids=[]), "prompt is empty"),
    (dict(prompt_ids=[1, 64]), "token id 64 is not in the model's vocabulary of 64"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(adapter="fr"), r"unknown adapter\(s\) \['fr'\]; this model has no adapters"),
    (dict(stop_strings=("x",)), "stop strings need a tokenizer"),
])
def test_a_request_that_cannot_run_is_refused_in_one_line(change: dict, match: str) -> None:
    engine = Engine(tiny_model("gpt2"))
    request = GenerationRequest(**{"prompt_ids": [1, 2, 3], "max_new_tokens": 4, **change})
    with pytest.raises(ConfigError, match=match) as info:
        engine.submit(request)
    assert "\n" not in str(info.value) and not engine.has_work


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    lines = [f"once upon a time {i} the owl sang a song about the sea and the stars" for i in range(100)]
    return train_tokenizer(lines, vocab_size=400, show_progress=False)


@pytest.mark.parametrize("target, stop", [("once upon a time STOP the owl", ("STOP",)),
                                          ("the owl 🦜 sang of the 🐙 sea", ()),
                                          ("the owl sang a STORM song", ("STOP", "zebra"))])
def test_text_streams_whole_characters_and_stops_at_a_stop_string(tok: Tokenizer, target: str,
                                                                   stop: tuple[str, ...]) -> None:
    """The same text as `generate`, streamed in the same pieces, beside a request without stop strings."""
    text_prompt = "Hi"
    model = forced_model(tok.vocab_size, len(tok.encode(text_prompt)), tok.encode(target))
    n = len(tok.encode(target))
    deltas: list[str] = []
    expected = generate(model, tok, text_prompt, SamplingConfig(max_new_tokens=n, stop=stop), stream=deltas.append)
    request = GenerationRequest(tok.encode(text_prompt), n, temperature=0, stop_strings=stop)
    other = GenerationRequest(tok.encode(text_prompt), n, temperature=0)
    events, plain = run(Engine(model, tok), [(0, request), (1, other)])
    assert [e.text for e in events if e.text] == deltas and "".join(deltas) == expected
    assert events[-1].finish_reason == ("stop" if "STOP" in target and stop else "length")
    assert "".join(e.text for e in plain) == target


def test_a_stop_id_releases_the_text_held_back(tok: Tokenizer) -> None:
    """Text held back as a possible stop string start is emitted on the final event when a stop id ends the text."""
    text_prompt, body = "Hi", tok.encode("the owl ST")
    model = forced_model(tok.vocab_size, len(tok.encode(text_prompt)), [*body, tok.eos_id, *tok.encode(" sang")])
    request = GenerationRequest(tok.encode(text_prompt), 20, temperature=0, stop_ids=frozenset({tok.eos_id}),
                                stop_strings=("STOP",))
    [events] = run(Engine(model, tok), [(0, request)])
    assert tokens(events) == body and "".join(e.text for e in events) == "the owl ST"
    assert events[-1].token_id is None and events[-1].finish_reason == "stop" and events[-1].text.endswith("ST")


def test_requests_submitted_from_other_threads_all_finish() -> None:
    engine = Engine(tiny_model("gpt2"), max_batch=4)
    ids: list[int] = []

    def client(seed: int) -> None:
        ids.extend(engine.submit(GenerationRequest(prompt(3 + i, seed * 10 + i), 5 + i, temperature=0))
                   for i in range(5))

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    finished: dict[int, int] = {}
    while any(t.is_alive() for t in threads) or engine.has_work:
        for event in engine.step():
            finished[event.request_id] = finished.get(event.request_id, 0) + (event.token_id is not None)
            assert event.finish_reason in (None, "length")
    assert sorted(ids) == sorted(finished) == list(range(20))
    assert sorted(finished.values()) == sorted(5 + i for _ in range(4) for i in range(5))
    assert engine.stats.running == engine.stats.waiting == 0 and engine.slots.busy() == []


def shared_prefix_schedule() -> tuple[Schedule, int]:
    """Requests after one long system prompt (2.5 blocks) with different questions, arriving over time, then three
    at once (one prefill): one sharing only the system prompt's first block, one sharing nothing, one sharing it
    all. Also returns how many prompt tokens the prefix cache can serve."""
    system = prompt(40, 100)
    alone = [(at, system + prompt(n, at)) for at, n in [(0, 5), (1, 3), (4, 9)]]
    together = [(20, system[:20] + prompt(7, 20)), (20, prompt(30, 21)), (20, system + prompt(1, 22))]
    hits = (0 + 2 + 2 + 1 + 0 + 2) * BLOCK
    return [(at, GenerationRequest(ids, 8, temperature=0)) for at, ids in alone + together], hits


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa"])
def test_prefix_cache_computes_a_shared_system_prompt_once(family: str) -> None:
    model = tiny_model(family, max_seq_len=128)
    schedule, hits = shared_prefix_schedule()
    plain, cached = Engine(model, max_batch=3), Engine(model, max_batch=3, prefix_cache_tokens=256)
    seen: dict[int, list[torch.Tensor]] = {}
    cached.logits_hook = lambda rid, logits: seen.setdefault(rid, []).append(logits.clone())
    expected, got = run(plain, schedule), run(cached, schedule)
    assert [tokens(e) for e in got] == [tokens(e) for e in expected]
    for rid, ((_, request), events) in enumerate(zip(schedule, expected, strict=True)):
        reference = greedy_logits(model, request.prompt_ids, tokens(events))
        assert_clear_choices(reference, f"request {rid}")
        torch.testing.assert_close(torch.stack(seen[rid]), reference, atol=1e-5, rtol=0)
    total = sum(len(r.prompt_ids) for _, r in schedule)
    assert plain.stats.prefill_tokens == total and plain.stats.prefix_hit_tokens == 0
    assert (cached.stats.prefill_tokens, cached.stats.prefix_hit_tokens) == (total - hits, hits)


def test_prefix_cache_evicts_least_recently_used_blocks_within_its_budget() -> None:
    model = tiny_model("llama-gqa", max_seq_len=128)
    engine = Engine(model, prefix_cache_tokens=4 * BLOCK)
    first, second, third = (prompt(2 * BLOCK + 1, seed) for seed in (1, 2, 3))  # two whole blocks each
    for ids in (first, second, first, third):  # `first` used again, so `second` is the least recently used
        run(engine, [(0, GenerationRequest(ids, 1, temperature=0))])
        assert engine.prefix.tokens <= 4 * BLOCK
        assert engine.stats.prefix_cache_tokens == engine.prefix.tokens
    hit = engine.stats.prefix_hit_tokens
    assert hit == 2 * BLOCK  # `first` again: both its blocks
    for ids, kept in ((third, 2 * BLOCK), (first, 2 * BLOCK), (second, 0)):
        run(engine, [(0, GenerationRequest(ids, 1, temperature=0))])
        assert engine.stats.prefix_hit_tokens - hit == kept
        hit = engine.stats.prefix_hit_tokens


def test_eviction_takes_the_blocks_that_extend_a_prefix_first() -> None:
    model = tiny_model("gpt2", max_seq_len=128)
    engine = Engine(model, prefix_cache_tokens=3 * BLOCK)
    first, second = prompt(2 * BLOCK + 1, 1), prompt(2 * BLOCK + 1, 2)
    for ids in (first, second, first):
        run(engine, [(0, GenerationRequest(ids, 1, temperature=0))])
    assert engine.stats.prefix_hit_tokens == BLOCK  # `first`'s second block went, its first stayed usable


def test_the_prefix_cache_key_covers_the_adapter() -> None:
    model = tiny_model("gpt2")
    ids = prompt(BLOCK + 3, 0)
    cache = model.new_cache(1, len(ids))
    with torch.no_grad():
        model(torch.tensor([ids]), cache=cache)
    prefixes = PrefixCache(4 * BLOCK)
    prefixes.store(ids, "fr", [t[0, :, :len(ids)] for t in cache.keys + cache.values])
    assert prefixes.lookup(ids, None) == []
    assert len(prefixes.lookup(ids, "fr")) == 1


def adapted_model() -> DecoderLM:
    """Adapters "a" (q, v) and "b" (the MLP) on one base, neither active, both moved off their zero start."""
    torch.manual_seed(0)
    model = tiny_model("llama-gqa", init_std=0.5)
    for name, targets in (("a", ["attn.q", "attn.v"]), ("b", ["mlp"])):
        apply_lora(model, PeftConfig(method="lora", r=4, alpha=8, targets=targets), name)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                if name in layer.cfgs:
                    layer.lora_B[name].normal_(0, 0.3)
    set_adapter(model, [])
    return model.eval()


def test_requests_choose_their_adapter_in_one_batch() -> None:
    """Rows with adapter a, none and b run side by side (and join mid-run); each gives what its adapter alone
    gives, and the adapters do change the output."""
    model = adapted_model()
    names = ["a", None, "b", "a", "b"]
    schedule = [(2 * i, GenerationRequest(prompt(5 + 3 * i, 40 + i), 12, temperature=0, adapter=name))
                for i, name in enumerate(names)]
    outputs = [tokens(e) for e in run(Engine(model, max_batch=3, prefix_cache_tokens=4 * BLOCK), schedule)]
    cfg = SamplingConfig(max_new_tokens=12, temperature=0, stop_at_eos=False)
    alone = []
    for (_, request), name in zip(schedule, names, strict=True):
        set_adapter(model, [name] if name else [])
        alone.append(generate_ids(model, request.prompt_ids, cfg))
        assert_clear_choices(greedy_logits(model, request.prompt_ids, alone[-1]), f"adapter {name}")
    set_adapter(model, [])
    assert outputs == alone
    base = [generate_ids(model, r.prompt_ids, cfg) for _, r in schedule]
    assert all(o != b for o, b, n in zip(outputs, base, names, strict=True) if n)


def test_adapter_requests_need_a_model_without_an_active_adapter() -> None:
    model = adapted_model()
    set_adapter(model, ["a"])
    with pytest.raises(ConfigError, match=r"adapter 'b': the model runs with adapter\(s\) \['a'\] active"):
        Engine(model).submit(GenerationRequest([1, 2, 3], 4, adapter="b"))


def test_rows_shift_left_once_their_shared_padding_is_an_eighth_of_the_cache() -> None:
    """Attention spends every step on the columns no running row uses: once they are 1/8 of the cache the rows move
    left (each row's blocks copied in place), and the row that stays decodes as it did alone."""
    model = tiny_model("gpt2")
    long, short = prompt(12, 1), prompt(4, 2)
    alone = BatchSlots.for_model(model, 1)
    expected = [alone.prefill(0, short, 30)[-1]]
    slots = BatchSlots.for_model(model, 2)
    slots.prefill(0, long, 30)
    got = [slots.prefill(1, short, 30)[-1]]  # right-aligned after the long prompt: it starts at column 8
    fed = [int(expected[-1].argmax())]
    for _ in range(8):
        expected.append(alone.decode({0: fed[-1]})[0])
        got.append(slots.decode({0: 0, 1: fed[-1]})[1])
        fed.append(int(expected[-1].argmax()))
    slots.leave(0)  # 8 columns of 20 now unused by every row: less than half, more than an eighth
    expected.append(alone.decode({0: fed[-1]})[0])
    got.append(slots.decode({1: fed[-1]})[1])
    assert (slots.start[1], slots.length) == (0, 13)
    torch.testing.assert_close(torch.stack(got), torch.stack(expected), atol=1e-5, rtol=0)
