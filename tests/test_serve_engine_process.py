"""`lmforge serve`'s engine in a process of its own: the same tokens as the engine in-process, a request it cannot
run refused at submit in one line, cancellation, its stats, and a clean end."""

from __future__ import annotations

import os

import pytest

import lmforge
from lmforge.errors import ConfigError
from lmforge.infer.engine import Engine, GenerationRequest, TokenEvent
from lmforge.serve.engine_process import EngineProcess
from serving import tiny_checkpoint


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    model, tokenizer = lmforge.load(tiny_checkpoint(tmp_path_factory.mktemp("engine_process") / "tiny"))
    return model.eval(), tokenizer


def run_all(engine, requests: list[GenerationRequest]) -> dict[int, list[TokenEvent]]:
    ids = [engine.submit(r) for r in requests]
    events: dict[int, list[TokenEvent]] = {i: [] for i in ids}
    while engine.has_work:
        for event in engine.step():
            events[event.request_id].append(event)
    return {i: events[i] for i in ids}


def test_the_engine_process_gives_the_tokens_the_engine_gives_in_process(loaded: tuple) -> None:
    model, tokenizer = loaded
    requests = [GenerationRequest(prompt_ids=tokenizer.encode(text), max_new_tokens=n, temperature=t, seed=3)
                for text, n, t in (("the king", 12, 0.0), ("rain falls", 5, 1.0), ("we shall go", 9, 0.7))]
    here = list(run_all(Engine(model, tokenizer, max_batch=2), requests).values())
    process = EngineProcess(model, tokenizer, max_batch=2, prefix_cache_tokens=0, threads=1)
    try:
        there = list(run_all(process, requests).values())
        assert not process.has_work
        if hasattr(os, "sched_getaffinity"):  # Linux: its one thread on a CPU of its own, the last one
            allowed = sorted(os.sched_getaffinity(0))
            assert os.sched_getaffinity(process._process.pid) == set(allowed[-1:] if len(allowed) > 1 else allowed)
        assert process.stats.generated_tokens == sum(e.token_id is not None for es in there for e in es) == 26
        long = process.submit(GenerationRequest(prompt_ids=tokenizer.encode("the"), max_new_tokens=40))
        process.cancel(long)
        cancelled = [e for _ in range(40) if process.has_work for e in process.step()]
        with pytest.raises(ConfigError, match="context window") as refused:  # checked here, before it is sent
            process.submit(GenerationRequest(prompt_ids=[1] * 60, max_new_tokens=10))
    finally:
        process.close()
    assert [[(e.token_id, e.text, e.finish_reason) for e in es] for es in there] == \
        [[(e.token_id, e.text, e.finish_reason) for e in es] for es in here]
    assert cancelled[-1] == TokenEvent(long, None, "", "cancelled") and not process.has_work
    assert "\n" not in str(refused.value)
    assert not process._process.is_alive()


def test_a_model_pickles_for_the_engine_process(loaded: tuple) -> None:
    import pickle

    model, _ = loaded
    assert pickle.loads(pickle.dumps(model)).cfg == model.cfg  # GPT-2's tanh GELU once was a lambda
