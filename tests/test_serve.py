"""`lmforge serve` over HTTP: the official openai client against the server on loopback (chat, streaming,
completions, models, n > 1, seeds, the API key), OpenAI-style errors for bad requests, a full queue, a client that
leaves mid-stream, and 64 concurrent clients."""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

import lmforge
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.peft.row_adapters import load_named_adapters, row_adapters
from near_ties import assert_clear_greedy
from serving import API_KEY, Running, adapter_dir, open_stream, request, serving, tiny_checkpoint
from tiny_pretraining import WORDS

pytestmark = pytest.mark.usefixtures("one_thread")

USER = [{"role": "user", "content": "the king rode to the castle"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return adapter_dir(tmp_path_factory.mktemp("serve") / "support")


@pytest.fixture(scope="module")
def server(checkpoint: Path, adapter: Path) -> Running:
    with serving(checkpoint, max_batch=8, max_queue=64, adapters={"support": adapter}) as running:
        yield running


@pytest.fixture
def client(server: Running) -> openai.OpenAI:
    server.step_delay(0.0)
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def greedy(server: Running, prompt_ids: list[int], max_new: int, stop_ids) -> tuple[str, str]:
    """(text, finish reason) of greedy decoding alone, each choice checked to be clear of near-ties."""
    return greedy_ids(server, prompt_ids, max_new, stop_ids)[:2]


def greedy_ids(server: Running, prompt_ids: list[int], max_new: int, stop_ids, chat: bool = False
               ) -> tuple[str, str, list[int]]:
    new = generate_ids(server.served.model, prompt_ids, SamplingConfig(max_new_tokens=max_new), list(stop_ids))
    stopped = len(new) < max_new
    assert_clear_greedy(server.served.model, prompt_ids, new + [next(iter(stop_ids))] * stopped)
    # a chat reply leaves special tokens out (as `lmforge chat` does): sent back as history, one would be refused
    text = server.served.tokenizer.decode(new, skip_special_tokens=chat)
    return text, "stop" if stopped else "length", new


def chat_ids(server: Running, messages: list[dict]) -> list[int]:
    return server.served.template.render(messages, add_generation_prompt=True).ids


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["tiny", "support"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_an_adapter_is_chosen_by_model_name_in_a_shared_batch(server: Running, client: openai.OpenAI,
                                                              checkpoint: Path, adapter: Path) -> None:
    server.step_delay(0.01)  # both requests are in flight together

    def ask(model: str) -> str:
        return client.completions.create(model=model, prompt="the queen", temperature=0, max_tokens=8).choices[0].text

    with ThreadPoolExecutor(2) as pool:
        base, adapted = pool.map(ask, ["tiny", "support"])
    tok = server.served.tokenizer
    assert base == greedy(server, tok.encode("the queen"), 8, server.served.stop_ids(chat=False))[0]
    model, _ = lmforge.load(checkpoint)
    load_named_adapters(model, {"support": adapter})
    with row_adapters(model, ["support"]):
        new = generate_ids(model, tok.encode("the queen"), SamplingConfig(max_new_tokens=8), tok.eos_id)
        assert_clear_greedy(model, tok.encode("the queen"), new + [tok.eos_id] * (len(new) < 8))
    assert adapted == tok.decode(new) and adapted != base


def test_chat_is_greedy_decoding_through_the_chat_template(server: Running, client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="tiny", messages=USER, temperature=0, max_tokens=16)
    ids = chat_ids(server, USER)
    text, finish, new = greedy_ids(server, ids, 16, server.served.template.stop_ids, chat=True)
    assert server.served.tokenizer.decode(new) != text  # this reply holds special tokens, left out
    assert reply.choices[0].message.content == text and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == finish
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), len(new))


def test_chat_streams_the_same_text_and_ends_with_done(server: Running, client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="tiny", messages=USER, temperature=0, max_tokens=10)
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, temperature=0, max_tokens=10,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # it came in pieces
    status, headers, raw = request(server.port, "POST", "/v1/chat/completions",
                                   {"model": "tiny", "messages": USER, "max_tokens": 3, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert raw.endswith("data: [DONE]\n\n")


def test_completions_plain_and_streamed(server: Running, client: openai.OpenAI) -> None:
    tok = server.served.tokenizer
    text, finish = greedy(server, tok.encode("the queen"), 8, server.served.stop_ids(chat=False))
    reply = client.completions.create(model="tiny", prompt="the queen", temperature=0, max_tokens=8)
    assert reply.choices[0].text == text and reply.choices[0].finish_reason == finish
    streamed = client.completions.create(model="tiny", prompt="the queen", temperature=0, max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text
    default = client.completions.create(model="tiny", prompt="the queen", temperature=0)
    assert default.usage.completion_tokens <= 16  # OpenAI's default max_tokens for completions


@pytest.mark.parametrize("trained_template", [False, True])
def test_text_completions_stop_where_the_exported_generation_config_says(checkpoint: Path, tmp_path: Path,
                                                                         trained_template: bool) -> None:
    """EOS alone for a model without a chat template of its own; also the end of turn for one trained with one,
    as transformers serve and vLLM stop at generation_config.json's eos ids."""
    from lmforge.data.chat import get_chat_template
    from lmforge.model.hf import export_hf
    from lmforge.serve.served import load_served

    model, tok = lmforge.load(checkpoint)
    template = get_chat_template("lmforge", tok) if trained_template else None
    hf_dir = export_hf(model, tok, tmp_path / "hf", chat_template=template)
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    served = load_served(hf_dir, name=None, template=None, adapters={}, max_batch=2)
    assert served.stop_ids(chat=False) == set(generation["eos_token_id"])
    assert (len(served.stop_ids(chat=False)) == 2) == trained_template
    assert served.stop_ids(chat=True) == set(template.stop_ids if trained_template else served.template.stop_ids)


def test_n_choices_with_a_seed_are_reproducible_and_each_its_own_seed(client: openai.OpenAI) -> None:
    def texts(seed: int, n: int) -> list[str]:
        reply = client.chat.completions.create(model="tiny", messages=USER, n=n, seed=seed, max_tokens=12)
        assert [c.index for c in reply.choices] == list(range(n))
        return [c.message.content for c in reply.choices]

    three = texts(7, 3)
    assert texts(7, 3) == three  # the same seed gives the same text (temperature 1, the default)
    assert len(set(three)) > 1  # derived seeds: the choices differ
    assert [texts(7 + i, 1)[0] for i in range(3)] == three  # choice i is seed + i


def test_a_wrong_or_missing_key_is_401_but_health_is_open(server: Running) -> None:
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="tiny", messages=USER)
    for key in ("sk-wrong", None):
        status, _, body = request(server.port, "GET", "/v1/models", key=key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key" and body["error"]["message"]
    assert request(server.port, "GET", "/health", key=None)[:1] == (200,)
    assert request(server.port, "GET", "/metrics", key=None)[0] == 401


CHAT = {"model": "tiny", "messages": USER}
BAD_REQUESTS = {
    "malformed JSON": (b'{"model": "tiny", "messages": [', 400, None),
    "not an object": (b"[1, 2]", 400, None),
    "missing messages": ({"model": "tiny"}, 400, "messages"),
    "missing model": ({"messages": USER}, 400, "model"),
    "wrong type": ({**CHAT, "max_tokens": "ten"}, 400, "max_tokens"),
    "bad role": ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    "unknown model": ({**CHAT, "model": "gpt-4"}, 404, "model"),
    "max_tokens 0": ({**CHAT, "max_tokens": 0}, 400, "max_tokens"),
    "max_tokens negative": ({**CHAT, "max_tokens": -5}, 400, "max_tokens"),
    "max_tokens beyond the context": ({**CHAT, "max_tokens": 10_000}, 400, "max_tokens"),
    "prompt longer than the context": ({"model": "tiny", "messages": [{"role": "user", "content": "king " * 200}]},
                                       400, "messages"),
    "n too large": ({**CHAT, "n": 9}, 400, "n"),
    "temperature out of range": ({**CHAT, "temperature": 5}, 400, "temperature"),
    "empty stop": ({**CHAT, "stop": [""]}, 400, "stop"),
    "unsupported parameter": ({**CHAT, "logprobs": True}, 400, "logprobs"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_openai_style_errors(server: Running, case: str) -> None:
    body, status, param = BAD_REQUESTS[case]
    got, _, reply = request(server.port, "POST", "/v1/chat/completions", body)
    assert got == status, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert "\n" not in error["message"] and error["param"] == param, error
    assert server.worker.in_flight == 0


def test_completion_prompt_errors(server: Running) -> None:
    for body, param in (({"model": "tiny", "prompt": ""}, "prompt"), ({"model": "tiny", "prompt": [10**6]}, "prompt"),
                        ({"model": "tiny", "prompt": "king " * 200}, "prompt"), ({"model": "tiny"}, "prompt")):
        status, _, reply = request(server.port, "POST", "/v1/completions", body)
        assert status == 400 and reply["error"]["param"] == param, reply
    status, _, reply = request(server.port, "GET", "/v1/nowhere")
    assert status == 404 and "/v1/chat/completions" in reply["error"]["message"]


def test_a_full_queue_answers_429_with_retry_after(checkpoint: Path) -> None:
    with serving(checkpoint, max_batch=1, max_queue=1) as small:
        small.step_delay(0.02)
        streams = [open_stream(small.port, {**CHAT, "max_tokens": 40}) for _ in range(2)]
        deadline = time.perf_counter() + 5
        while small.worker.in_flight < 2:
            assert time.perf_counter() < deadline
            time.sleep(0.005)
        status, headers, reply = request(small.port, "POST", "/v1/chat/completions", CHAT)
        assert status == 429 and int(headers["retry-after"]) >= 1
        assert reply["error"]["type"] == "rate_limit_error" and "--max-queue" in reply["error"]["message"]
        for conn in streams:
            conn.close()
        small.wait_idle()


def test_a_client_leaving_mid_stream_frees_its_slot_at_once(server: Running) -> None:
    server.step_delay(0.02)  # the whole reply would take about a second
    conn = open_stream(server.port, {**CHAT, "temperature": 0})
    response = conn.getresponse()
    assert response.status == 200
    while not streamed_text(response.readline()):
        pass  # read until text has come
    assert server.engine.stats.running == 1 and server.worker.in_flight == 1
    conn.close()
    assert server.wait_idle(timeout=0.5) < 0.5
    metrics = request(server.port, "GET", "/metrics")[2]
    assert "lmforge_running_requests 0" in metrics and "lmforge_in_flight_requests 0" in metrics


def test_a_client_leaving_before_a_plain_reply_frees_its_slot(server: Running) -> None:
    server.step_delay(0.02)
    conn = http.client.HTTPConnection("127.0.0.1", server.port)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({**CHAT, "temperature": 0}).encode(),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    deadline = time.perf_counter() + 5
    while server.engine.stats.running == 0:
        assert time.perf_counter() < deadline
        time.sleep(0.005)
    conn.close()
    assert server.wait_idle(timeout=0.6) < 0.6  # the reply would take about a second; disconnects are polled 4/s


def test_an_engine_failure_is_a_500_and_the_server_goes_on(server: Running, client: openai.OpenAI) -> None:
    server.fail_next_step()
    status, _, reply = request(server.port, "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 4})
    assert status == 500 and reply["error"]["type"] == "server_error"
    assert "injected failure" in reply["error"]["message"]
    server.wait_idle()
    assert client.chat.completions.create(model="tiny", messages=USER, max_tokens=4).choices[0].finish_reason


def test_a_bug_in_a_route_is_an_openai_style_500(server: Running, monkeypatch) -> None:
    monkeypatch.setattr(server.served, "chat_prompt", lambda body: 1 / 0)
    status, _, reply = request(server.port, "POST", "/v1/chat/completions", CHAT)
    assert status == 500 and reply["error"] == {"message": "internal error: ZeroDivisionError: division by zero",
                                                "type": "server_error", "param": None, "code": None}


def streamed_text(line: bytes) -> str:
    """The content of a chat chunk's server-sent event line ("" for other lines)."""
    if not line.startswith(b"data: {"):
        return ""
    return json.loads(line[6:])["choices"][0]["delta"].get("content", "")


def test_64_concurrent_clients_get_their_own_greedy_outputs(server: Running, client: openai.OpenAI) -> None:
    tok = server.served.tokenizer
    prompts = [f"the {WORDS[i % len(WORDS)]} {WORDS[(i * 5) % len(WORDS)]} {WORDS[(i * 3) % len(WORDS)]}"
               for i in range(64)]
    expected = [greedy(server, tok.encode(p), 6, server.served.stop_ids(chat=False)) for p in prompts]

    def ask(prompt: str) -> tuple[str, str]:
        choice = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=6).choices[0]
        return choice.text, choice.finish_reason

    errors_before = server_errors(server)
    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(ask, prompts))  # a 5xx would raise openai.InternalServerError
    assert answers == expected
    server.wait_idle(timeout=1)
    assert server_errors(server) == errors_before
    assert 'lmforge_requests_total{endpoint="/v1/completions",status="200"}' in request(server.port, "GET",
                                                                                       "/metrics")[2]


def server_errors(server: Running) -> int:
    """The 5xx answers /metrics has counted."""
    counts = [line for line in request(server.port, "GET", "/metrics")[2].splitlines()
              if line.startswith("lmforge_requests_total{")]
    return sum(int(line.split()[-1]) for line in counts if 'status="5' in line)


@pytest.mark.parametrize("chat", [False, True])
def test_a_text_event_is_the_whole_event_with_only_its_text_encoded(chat: bool) -> None:
    """The event of each new piece of text is made from its choice's event encoded once (per-token work of the HTTP
    side): the same bytes as encoding the whole event, whatever the text holds."""
    import asyncio

    from lmforge.serve.app import Choices, Reply

    reply = Reply(chat, 'a "quoted" model', 5, Choices({10: 0, 11: 1}), asyncio.Queue(), 0.0)
    for index, text in [(0, " the"), (1, 'é "q"\n\\'), (0, "🦜"), (1, "\0text\0"), (0, "")]:
        assert reply._text_chunk(index, text) == reply._chunk(index, text, None)
