"""A tiny decoder served in-process: uvicorn on a free loopback port in a thread, over the real engine, for the tests
of `lmforge serve` (the openai client, raw HTTP, the browser)."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import lmforge
from lmforge.config import ModelConfig, PeftConfig
from lmforge.infer.engine import Engine
from lmforge.model import build_model
from lmforge.peft.lora import apply_lora, lora_layers
from lmforge.peft.lora_files import save_adapter
from lmforge.serve.app import create_app
from lmforge.serve.metrics import Metrics
from lmforge.serve.served import ServedModel, load_served
from lmforge.serve.server import bind, make_server
from lmforge.serve.worker import EngineWorker
from lmforge.tokenizer import train_tokenizer
from tiny_pretraining import word_documents

API_KEY = "sk-test-key"


def tiny_checkpoint(directory: Path, max_seq_len: int = 64) -> Path:
    """A random-init 2-layer decoder with a word tokenizer (lmforge's role tokens included), saved to `directory`."""
    tok = train_tokenizer(word_documents(200), vocab_size=400, show_progress=False)
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=400, max_seq_len=max_seq_len, n_layer=2, n_head=2, d_model=32,
                                    init_std=0.5))
    return lmforge.save(model, tok, directory)


@torch.no_grad()
def adapter_dir(path: Path, d_model: int = 32) -> Path:
    """A LoRA adapter (on q and v, moved off its init so that it changes the outputs) saved from a decoder shaped like
    `tiny_checkpoint`'s but `d_model` wide (another width: an adapter for another base)."""
    torch.manual_seed(1)
    model = build_model(ModelConfig(vocab_size=400, max_seq_len=64, n_layer=2, n_head=2, d_model=d_model))
    cfg = PeftConfig(method="lora", r=4, alpha=8, targets=["attn.q", "attn.v"])
    apply_lora(model, cfg, "a")
    for layer in lora_layers(model).values():
        layer.lora_B["a"].normal_(0, 0.5)
    return save_adapter(model, path, cfg, "a")


@dataclass
class Running:
    url: str
    port: int
    served: ServedModel
    engine: Any
    worker: EngineWorker
    step_delay: Callable[[float], None]  # slow each engine step down (seconds), to watch a reply mid-way
    fail_next_step: Callable[[], None]  # the engine's next step raises, as a bug or out-of-memory would

    def wait_idle(self, timeout: float = 5.0) -> float:
        """Seconds until nothing is in flight and the engine's slots are empty (AssertionError after `timeout`)."""
        start = time.perf_counter()
        while self.worker.in_flight or self.engine.stats.running or self.engine.stats.waiting:
            assert time.perf_counter() - start < timeout, (
                f"still busy after {timeout} s: {self.worker.in_flight} in flight, engine {self.engine.stats}")
            time.sleep(0.005)
        return time.perf_counter() - start


@contextmanager
def serving(checkpoint: Path, *, max_batch: int = 8, max_queue: int = 64, api_key: str | None = API_KEY,
            adapters: dict[str, Path] | None = None) -> Iterator[Running]:
    served = load_served(checkpoint, name="tiny", template=None, adapters=adapters or {}, max_batch=max_batch)
    engine = Engine(served.model, served.tokenizer, max_batch=max_batch)
    delay, faults = [0.0], []
    step = engine.step

    def slowed_step() -> list:
        if delay[0]:
            time.sleep(delay[0])
        if faults:
            raise faults.pop()
        return step()

    engine.step = slowed_step
    worker = EngineWorker(engine, max_batch, max_queue)
    worker.start()
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = make_server(create_app(served, worker, Metrics(), api_key), shutdown_timeout=2)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield Running(f"http://127.0.0.1:{port}", port, served, engine, worker,
                      lambda seconds: delay.__setitem__(0, seconds),
                      lambda: faults.append(RuntimeError("injected failure")))
    finally:
        server.should_exit = True
        thread.join(10)
        worker.stop()


def request(port: int, method: str, path: str, body: bytes | dict | None = None, key: str | None = API_KEY
            ) -> tuple[int, dict[str, str], Any]:
    """(status, headers, parsed JSON body or text) of one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers=headers)
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text
    return response.status, dict(response.getheaders()), parsed


def open_stream(port: int, body: dict, key: str | None = API_KEY) -> http.client.HTTPConnection:
    """Send a streaming POST to /v1/chat/completions without reading the reply; close the connection to leave."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}).encode(),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    return conn
