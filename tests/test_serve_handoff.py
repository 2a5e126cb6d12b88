"""The per-token work between the engine thread and the HTTP replies: one wake-up of the event loop per engine step
(not one per event), and the server-sent events that are ready at once written together."""

from __future__ import annotations

import asyncio
import json
import threading

from lmforge.infer.engine import TokenEvent
from lmforge.serve.app import Choices, Reply
from lmforge.serve.metrics import Metrics
from lmforge.serve.worker import EngineWorker


class ThreeTokenEngine:
    """Every submitted request gets three tokens, one per step, all requests in the same steps."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.steps = 0
        self.lock = threading.Lock()

    def submit(self, _request: object) -> int:
        with self.lock:
            self.ids.append(len(self.ids))
            return self.ids[-1]

    def cancel(self, _request_id: int) -> None:
        pass

    @property
    def has_work(self) -> bool:
        with self.lock:
            return bool(self.ids) and self.steps < 3

    def step(self) -> list[TokenEvent]:
        with self.lock:
            self.steps += 1
            return [TokenEvent(i, 10 + self.steps, f"t{self.steps} ", "length" if self.steps == 3 else None)
                    for i in self.ids]


def test_one_engine_step_wakes_the_event_loop_once_for_all_its_events() -> None:
    async def main() -> tuple[int, list]:
        loop = asyncio.get_running_loop()
        wakeups = 0
        real = loop.call_soon_threadsafe

        def counting(*args):
            nonlocal wakeups
            wakeups += 1
            return real(*args)

        loop.call_soon_threadsafe = counting
        engine = ThreeTokenEngine()
        worker = EngineWorker(engine, max_batch=4, max_queue=0)
        ids, queue = worker.submit([object()] * 4, loop)  # submitted before the thread starts: one batch
        worker.start()
        events = [await queue.get() for _ in range(3 * len(ids))]
        worker.stop()
        return wakeups, events

    wakeups, events = asyncio.run(main())
    assert wakeups == 3  # three steps, each with four events
    assert [e.token_id for e in events] == [11] * 4 + [12] * 4 + [13] * 4


def test_the_events_ready_at_once_go_out_in_one_write() -> None:
    async def writes() -> list[str]:
        queue: asyncio.Queue = asyncio.Queue()
        for k, finish in ((1, None), (2, None), (3, "length")):
            queue.put_nowait(TokenEvent(7, k, f"w{k} ", finish))
        reply = Reply(chat=True, model="m", prompt_tokens=2, choices=Choices({7: 0}), queue=queue, start=0.0)
        return [w async for w in reply.stream(worker=None, metrics=Metrics(), include_usage=False)]

    sent = asyncio.run(writes())
    assert len(sent) == 1
    events = [line[6:] for line in sent[0].split("\n\n") if line]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert [d["delta"].get("content") for d in deltas] == ["", "w1 ", "w2 ", "w3 ", None]  # one event per token
    assert deltas[0]["delta"]["role"] == "assistant" and deltas[-1]["finish_reason"] == "length"
