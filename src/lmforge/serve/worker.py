"""One thread runs the engine: it calls `Engine.step()` while there is work and hands each TokenEvent to the asyncio
queue of the HTTP request it belongs to (through `loop.call_soon_threadsafe`, the only safe way into a loop from
another thread; one call carries all of a step's events, since each call wakes the loop). The engine's slots plus
`max_queue` waiting requests bound what may be in flight."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("lmforge.serve")


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is full."""


@dataclass(frozen=True)
class EngineFailed:
    """Put on a request's queue instead of its events when the engine raised: the request cannot finish."""

    message: str


class EngineWorker:
    def __init__(self, engine: Any, max_batch: int, max_queue: int):
        self.engine, self.capacity = engine, max_batch + max_queue
        self._cond = threading.Condition()
        self._routes: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)

    @property
    def in_flight(self) -> int:
        """Engine requests submitted and not yet finished (cancelled ones count until the engine frees them)."""
        with self._cond:
            return len(self._routes)

    def start(self) -> None:
        self._thread.start()

    def submit(self, requests: list[Any], loop: asyncio.AbstractEventLoop) -> tuple[list[int], asyncio.Queue]:
        """Submit all of `requests` or none (QueueFull); their events arrive on the returned queue. The engine's
        own refusals (an unknown adapter, a prompt too long) propagate as its ConfigError."""
        queue: asyncio.Queue = asyncio.Queue()
        ids: list[int] = []
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._routes) + len(requests) > self.capacity:
                raise QueueFull(f"{len(self._routes)} requests are in flight, the most this server holds is "
                                f"{self.capacity} (--max-batch plus --max-queue)")
            try:
                for request in requests:  # under the lock: no event can be dispatched before its route exists
                    ids.append(self.engine.submit(request))
                    self._routes[ids[-1]] = (loop, queue)
            except BaseException:
                self._cancel_locked(ids)
                raise
            self._cond.notify()
        return ids, queue

    def cancel(self, request_ids: list[int]) -> None:
        """Stop generating for these requests; the engine frees their slots at its next step."""
        with self._cond:
            self._cancel_locked(request_ids)
            self._cond.notify()

    def _cancel_locked(self, request_ids: list[int]) -> None:
        for request_id in request_ids:
            if request_id in self._routes:
                self.engine.cancel(request_id)

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel whatever is left and end the thread."""
        with self._cond:
            self._stopping = True
            self._cancel_locked(list(self._routes))
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self.engine.has_work and not self._stopping:
                    self._cond.wait()
                if not self.engine.has_work:
                    return
            try:
                events = self.engine.step()
            except Exception as err:  # a bug or an out-of-memory: fail the requests, keep serving
                log.exception("the engine failed a step")
                self._fail_all(f"the engine failed: {type(err).__name__}: {err}")
                continue
            self._dispatch(events)

    def _dispatch(self, events: list[Any]) -> None:
        with self._cond:
            # a request failed by _fail_all has no route left when the engine reports it cancelled
            routed = [((self._routes.pop if e.finish_reason else self._routes.get)(e.request_id, None), e)
                      for e in events]
        _deliver((route, event) for route, event in routed if route is not None)

    def _fail_all(self, message: str) -> None:
        with self._cond:
            routes, self._routes = self._routes, {}
            for request_id in routes:
                self.engine.cancel(request_id)
        # one EngineFailed per queue: a request's choices share one
        _deliver((route, EngineFailed(message)) for route in {id(r[1]): r for r in routes.values()}.values())


def _deliver(routed: Iterable[tuple[tuple[asyncio.AbstractEventLoop, asyncio.Queue], Any]]) -> None:
    """Put each item on its route's queue: one call into each event loop for all of its items, since each call
    wakes the loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
    for (loop, queue), item in routed:
        by_loop.setdefault(loop, []).append((queue, item))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the loop has closed (the server stopped): nobody waits for these events
            pass


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
