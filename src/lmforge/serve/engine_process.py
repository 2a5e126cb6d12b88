"""The decode engine in a process of its own (as vLLM's engine core runs), so that its steps and the HTTP side's work
(JSON, server-sent events, the event loop) do not take turns under one interpreter lock.

`EngineProcess` stands where an `Engine` would for `EngineWorker`: `submit` checks a request here (the same one-line
ConfigError an Engine gives) and sends it on; `step` waits for the next batch of events, which the engine process
sends after each of its steps together with its stats (each event as a tuple of its fields). The model's tensors
reach the engine process through shared memory (torch.multiprocessing), not a second copy. The engine process
ignores SIGINT and SIGTERM (the HTTP process drains its requests first) and ends when told to or when its pipe
closes.
"""

from __future__ import annotations

import itertools
import os
import queue
import signal
import sys
import threading
import traceback
from typing import Any

import torch

from lmforge.cpu_threads import set_cpu_threads
from lmforge.infer.engine import Engine, EngineStats, GenerationRequest, TokenEvent


class EngineProcess:
    """An Engine(model, tokenizer, max_batch=..., prefix_cache_tokens=...) run in a spawned process with `threads`
    intra-op threads. Call `close` when done."""

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int, prefix_cache_tokens: int, threads: int):
        # checks the settings here, then every request; it never runs a step
        self._checker = Engine(model, tokenizer, max_batch=max_batch, prefix_cache_tokens=prefix_cache_tokens)
        context = torch.multiprocessing.get_context("spawn")
        self._conn, theirs = context.Pipe()
        self._process = context.Process(target=_run_engine, name="lmforge-engine", daemon=True,
                                        args=(theirs, model, tokenizer, max_batch, prefix_cache_tokens, threads))
        self._process.start()
        theirs.close()
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._unfinished: set[int] = set()  # submitted, and their last event not yet received
        # commands go out from a thread of their own: `submit` runs under the worker's lock, and a send that waited
        # for a full pipe there could wait for the engine, which may wait for the worker to read its events
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_commands, name="lmforge-engine-commands", daemon=True)
        self._sender.start()

    def submit(self, request: GenerationRequest) -> int:
        self._checker.check(request)
        with self._lock:
            if not self._process.is_alive():
                raise RuntimeError(f"the engine process has exited (status {self._process.exitcode}); restart "
                                   "the server")
            request_id = next(self._ids)
            self._unfinished.add(request_id)
            self._outbox.put(("submit", request_id, request))
        return request_id

    def cancel(self, request_id: int) -> None:
        with self._lock:
            if request_id in self._unfinished:
                self._outbox.put(("cancel", request_id, None))

    @property
    def has_work(self) -> bool:
        with self._lock:
            return bool(self._unfinished)

    def step(self) -> list[TokenEvent]:
        """The events of the engine process's next step (waits for them); raises what its step raised."""
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            with self._lock:
                self._unfinished.clear()
            self._process.join(1)
            raise RuntimeError(f"the engine process exited (status {self._process.exitcode})") from None
        if message[0] == "failed":
            raise message[1]
        _, fields, self.stats = message
        events = [TokenEvent(*f) for f in fields]
        with self._lock:
            self._unfinished.difference_update(e.request_id for e in events if e.finish_reason is not None)
        return events

    def close(self, timeout: float = 5.0) -> None:
        self._outbox.put(("stop", None, None))
        self._outbox.put(None)
        self._sender.join(timeout)
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout)
        self._conn.close()

    def _send_commands(self) -> None:
        while (command := self._outbox.get()) is not None:
            try:
                self._conn.send(command)
            except OSError:  # the engine process has exited: `step` says so
                return


def keep_to_own_cpus(threads: int) -> None:
    """Keep this process on `threads` CPUs, the last of those it may use, when there are more: the HTTP process and
    the clients then run beside it rather than take turns with it (unpinned, the same engine work varied widely in
    CPU time from run to run, and throughput with it)."""
    if hasattr(os, "sched_setaffinity"):
        allowed = sorted(os.sched_getaffinity(0))
        if threads < len(allowed):
            os.sched_setaffinity(0, allowed[-threads:])


def _run_engine(conn: Any, model: Any, tokenizer: Any, max_batch: int, prefix_cache_tokens: int, threads: int
                ) -> None:
    """The engine process: take the commands that came, run a step while there is work (wait for a command when
    there is none), send its events renumbered with the HTTP side's ids."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    set_cpu_threads(threads)
    keep_to_own_cpus(threads)
    engine = Engine(model, tokenizer, max_batch=max_batch, prefix_cache_tokens=prefix_cache_tokens)
    theirs: dict[int, int] = {}  # engine id -> the HTTP side's id
    ours: dict[int, int] = {}  # the HTTP side's id -> engine id
    while True:
        idle = not engine.has_work
        while idle or conn.poll():
            try:
                kind, request_id, request = conn.recv()
            except EOFError:  # the HTTP process has gone
                return
            idle = False
            if kind == "stop":
                return
            if kind == "submit":
                ours[request_id] = engine.submit(request)
                theirs[ours[request_id]] = request_id
            elif request_id in ours:
                engine.cancel(ours[request_id])
        try:
            events = engine.step()
        except Exception as err:  # the HTTP side fails the requests and cancels them; keep serving
            traceback.print_exc(file=sys.stderr)
            try:
                conn.send(("failed", err, None))
            except Exception:  # it does not pickle: its words do
                conn.send(("failed", RuntimeError(f"{type(err).__name__}: {err}"), None))
            continue
        fields = []  # each event's fields in TokenEvent's order, renumbered: tuples pickle faster than dataclasses
        for event in events:
            request_id = theirs[event.request_id]
            if event.finish_reason is not None:
                del theirs[event.request_id], ours[request_id]
            fields.append((request_id, event.token_id, event.text, event.finish_reason, event.stop_id))
        conn.send(("events", fields, engine.stats))
