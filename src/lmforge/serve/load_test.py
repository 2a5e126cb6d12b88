"""Measure OpenAI-compatible servers under load: each server runs alone as a subprocess on loopback, and at each
concurrency level that many clients send streamed greedy completions one after another. The clients are plain
aiohttp readers of the server-sent events (as vLLM's serving benchmark uses), not the `openai` client: at a few
thousand chunks/s its per-chunk parsing saturated the load generator's core, and time to first token then measured
the client's backlog rather than the server. Per level: output tokens/s and requests/s over the level's wall time,
and p50/p95 of time to first token (first streamed text) and of request latency. Output tokens are counted by
encoding each reply with the served model's tokenizer, the same count for every server. `benchmarks/serve.py` and
the demo's serving table run on this; `sequential_baseline` is lmforge's own generation, one prompt at a time, for
comparison.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

SERVERS = ("lmforge", "transformers", "transformers-cb")  # transformers-cb: transformers serve --continuous-batching
PROMPT_WORDS = ("the", "king", "said", "to", "his", "friend", "that", "night", "we", "shall", "go", "where", "rain",
                "falls", "and", "all", "men", "sing")


def prompts(n: int) -> list[str]:
    """n distinct short prompts of a few words (deterministic)."""
    k = len(PROMPT_WORDS)
    return [" ".join(PROMPT_WORDS[(i * 7 + j * (i % 5 + 1)) % k] for j in range(4 + i % 6)) + f" {i}"
            for i in range(n)]


def document_openings(files: list[Path], n: int, words: int = 6) -> list[str]:
    """The first `words` words of the first `n` documents of `files` (as `data prepare` reads them): prompts a model
    trained on such text goes on writing, where an unfamiliar prompt may get an end of text at once, and a load
    test would then time requests, not decoding."""
    from lmforge.data.readers import read_documents

    return [" ".join(doc.split()[:words]) for doc in itertools.islice(read_documents(files), n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(name: str, run: Path, hf_dir: Path, port: int, max_batch: int) -> list[str]:
    """The command line that serves `run` (lmforge) or its export `hf_dir` (transformers serve) on `port`."""
    if name == "lmforge":
        return [sys.executable, "-m", "lmforge.cli", "serve", str(run), "--port", str(port),
                "--max-batch", str(max_batch), "--max-queue", str(4 * max_batch)]
    tool = shutil.which("transformers") or str(Path(sys.executable).with_name("transformers"))
    command = [tool, "serve", str(hf_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    return command + (["--continuous-batching"] if name == "transformers-cb" else [])


def wait_healthy(port: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before answering /health")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"no answer on /health within {timeout:.0f} s")


async def _one_request(session, url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, float, str]:
    """(time to first text, latency, text) of one streamed greedy completion."""
    start = time.perf_counter()
    first, text = None, []
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"POST {url}: HTTP {response.status}: {(await response.text())[:200]}")
        async for line in response.content:  # server-sent events, one `data: {chunk}` line each
            if not line.startswith(b"data: {"):
                continue
            choices = json.loads(line[6:])["choices"]
            piece = (choices[0].get("text") or "") if choices else ""
            if piece and first is None:
                first = time.perf_counter() - start
            text.append(piece)
    latency = time.perf_counter() - start
    return (latency if first is None else first), latency, "".join(text)


async def _load_level(port: int, model: str, texts: list[str], clients: int, max_tokens: int) -> tuple[float, list]:
    """`clients` concurrent clients over `texts` (split between them): (wall seconds, per-request results)."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/completions"
    shares = [texts[i::clients] for i in range(clients)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker(share: list[str]) -> list:
            return [await _one_request(session, url, model, prompt, max_tokens) for prompt in share]

        start = time.perf_counter()
        results = await asyncio.gather(*(worker(s) for s in shares))
        wall = time.perf_counter() - start
    return wall, [r for share in results for r in share]


def _percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summarise(wall: float, results: list, count_tokens: Callable[[str], int]) -> dict[str, float]:
    ttft, latency = [r[0] for r in results], [r[1] for r in results]
    tokens = sum(count_tokens(r[2]) for r in results)
    return {"tokens_per_s": tokens / wall, "requests_per_s": len(results) / wall, "output_tokens": tokens,
            "ttft_p50_s": _percentile(ttft, 50), "ttft_p95_s": _percentile(ttft, 95),
            "latency_p50_s": _percentile(latency, 50), "latency_p95_s": _percentile(latency, 95)}


def measure_server(name: str, run: Path, hf_dir: Path, clients: list[int], requests: int, max_tokens: int,
                   count_tokens: Callable[[str], int], texts: list[str], startup_timeout: float = 180.0,
                   threads: int | None = None) -> dict[str, dict]:
    """Start server `name` (with `threads` intra-op threads, as OMP_NUM_THREADS sets them for torch; None: torch's
    default), warm it up, and measure each concurrency level on the first clients x requests of `texts`;
    {clients: figures}."""
    port = free_port()
    log = tempfile.TemporaryFile()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({} if threads is None else {"OMP_NUM_THREADS": str(threads)})}
    process = subprocess.Popen(server_command(name, run, hf_dir, port, max(clients)), stdout=log,
                               stderr=subprocess.STDOUT, env=env)
    try:
        wait_healthy(port, process, startup_timeout)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as r:
            model = json.load(r)["data"][0]["id"]
        asyncio.run(_load_level(port, model, texts[:2], 1, 4))  # first-call costs stay out of the figures
        levels = {}
        for n in clients:
            wall, results = asyncio.run(_load_level(port, model, texts[:n * requests], n, max_tokens))
            levels[str(n)] = summarise(wall, results, count_tokens)
        return levels
    except Exception as err:
        log.seek(0)
        tail = log.read().decode(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{name} serve: {err}; its last output: {' | '.join(tail)}") from None
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def sequential_baseline(run: Path, texts: list[str], max_tokens: int, count_tokens: Callable[[str], int],
                        threads: int | None = None) -> dict[str, float]:
    """lmforge's own generation of `texts`, one at a time in this process (greedy, as the servers run), with
    `threads` intra-op threads (None: as they are)."""
    import torch

    import lmforge
    from lmforge.cpu_threads import set_cpu_threads
    from lmforge.infer.generate import SamplingConfig, generate

    model, tokenizer = lmforge.load(run)
    model.eval()
    generate(model, tokenizer, texts[0], SamplingConfig(max_new_tokens=4, temperature=0.0))
    cfg = SamplingConfig(max_new_tokens=max_tokens, temperature=0.0)
    before = torch.get_num_threads()
    set_cpu_threads(threads or before)
    try:
        start = time.perf_counter()
        tokens = sum(count_tokens(generate(model, tokenizer, t, cfg)) for t in texts)
        wall = time.perf_counter() - start
    finally:
        set_cpu_threads(before)
    return {"tokens_per_s": tokens / wall, "requests_per_s": len(texts) / wall, "output_tokens": tokens}


def compare(run: Path, servers: list[str], clients: list[int], requests: int, max_tokens: int,
            texts: list[str] | None = None, threads: int | None = None) -> dict:
    """Every figure of `servers` on `run` (the transformers servers on its Hugging Face export) and of lmforge's
    sequential generation, with lmforge serve's throughput ratios per level. `texts`: the prompts (at least
    max(clients) x requests; default `prompts`): openings of in-domain text keep a trained model writing, where it
    may end its reply at once after words it never saw together. `threads`: every server's and the sequential
    run's intra-op threads (None: torch's default)."""
    import lmforge
    from lmforge.export import export_run

    _, tokenizer = lmforge.load(run)

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text)) if text else 0

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        if any(s != "lmforge" for s in servers):
            export_run(run, "hf", hf_dir)
        texts = texts or prompts(max(clients) * requests)
        figures = {s: measure_server(s, run, hf_dir, clients, requests, max_tokens, count_tokens, texts,
                                     threads=threads) for s in servers}
    sequential = sequential_baseline(run, texts[:max(clients) * requests], max_tokens, count_tokens, threads)
    ratios = {}
    if "lmforge" in figures:
        for n in map(str, clients):
            ours = figures["lmforge"][n]["tokens_per_s"]
            ratio = {"vs_sequential": ours / sequential["tokens_per_s"]}
            peers = [figures[s][n]["tokens_per_s"] for s in servers if s != "lmforge"]
            if peers:
                ratio["vs_best_transformers"] = ours / max(peers)
            ratios[n] = ratio
    return {"clients": clients, "requests_per_client": requests, "max_tokens": max_tokens, "threads": threads,
            "servers": figures,
            "sequential": sequential, "ratios": ratios}
