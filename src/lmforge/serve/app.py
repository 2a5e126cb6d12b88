"""The FastAPI application: OpenAI's /v1/models, /v1/chat/completions and /v1/completions, /health, /metrics, and
the chat page at `/`. Generation requests go to the engine worker; a client that goes away cancels its requests."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from lmforge.errors import ConfigError
from lmforge.serve.errors import APIError, error_response
from lmforge.serve.metrics import Metrics
from lmforge.serve.schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest, parse_body
from lmforge.serve.served import ServedModel
from lmforge.serve.worker import EngineFailed, EngineWorker, QueueFull

STATIC = Path(__file__).parent / "static"
PUBLIC_PATHS = ("/health", "/", "/static/")  # no API key needed: the liveness probe and the page (it asks for one)
ENDPOINTS = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics", "/")
RETRY_AFTER_SECONDS = 1


class ClientGone(Exception):
    """The client disconnected before its reply was ready: nothing is sent."""


@dataclass
class Choices:
    """What the engine sent for one HTTP request's choices: text, token counts and finish reasons by index."""

    index: dict[int, int]  # engine request id -> choice index
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.text = [""] * len(self.index)
        self.finish = [None] * len(self.index)

    @property
    def unfinished(self) -> list[int]:
        return [rid for rid, i in self.index.items() if self.finish[i] is None]


class Gatekeeper:
    """Pure ASGI middleware (a BaseHTTPMiddleware would hide a client's disconnect from a streaming response):
    checks the API key, then counts each answered request by endpoint and status."""

    def __init__(self, app: Any, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        status = 500

        async def send_counting(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.api_key is not None and not _public(path) and not self._authorized(scope):
                await error_response(401, "Incorrect or missing API key: send the header 'Authorization: Bearer "
                                          "KEY' with the key the server was started with (--api-key)",
                                     code="invalid_api_key")(scope, receive, send_counting)
                return
            await self.app(scope, receive, send_counting)
        finally:
            self.metrics.record_request(endpoint, status)

    def _authorized(self, scope: dict) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, key = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode())


def _public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith("/static/")


def create_app(served: ServedModel, worker: EngineWorker, metrics: Metrics, api_key: str | None = None) -> Any:
    """The ASGI app answering for `served`, its generation run by `worker`."""
    app = FastAPI(title="lmforge serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> Response:  # a bug: uvicorn logs the traceback
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, __: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = (f"no endpoint {request.method} {request.url.path}; this server answers "
                   f"{', '.join(ENDPOINTS)}") if exc.status_code in (404, 405) else str(exc.detail)
        return error_response(exc.status_code, message)

    @app.get("/")
    async def page() -> Response:
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        stats = worker.engine.stats
        live = {
            "lmforge_queue_depth": ("gauge", "engine requests waiting for a slot", stats.waiting),
            "lmforge_running_requests": ("gauge", "engine requests decoding in a slot", stats.running),
            "lmforge_in_flight_requests": ("gauge", "engine requests submitted and not finished", worker.in_flight),
            "lmforge_prefill_tokens_total": ("counter", "prompt tokens computed by prefill", stats.prefill_tokens),
            "lmforge_prefix_hit_tokens_total": ("counter", "prompt tokens reused from the prefix cache",
                                                stats.prefix_hit_tokens),
            "lmforge_generated_tokens_total": ("counter", "tokens the engine generated", stats.generated_tokens),
        }
        return PlainTextResponse(metrics.render(live), media_type="text/plain; version=0.0.4")

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "lmforge"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card(name) for name in served.model_names]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        served.adapter_for(name)  # 404 when unknown
        return model_card(name)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = parse_body(await request.body(), ChatCompletionRequest)
        served.adapter_for(body.model)
        prompts = [served.chat_prompt(body)]
        return await generate(request, body, prompts, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse_body(await request.body(), CompletionRequest)
        served.adapter_for(body.model)
        return await generate(request, body, served.completion_prompts(body), chat=False)

    async def generate(request: Request, body: SamplingRequest, prompts: list[list[int]], chat: bool) -> Response:
        requests = served.generation_requests(body, prompts, chat)
        start = time.perf_counter()
        try:
            ids, queue = worker.submit(requests, asyncio.get_running_loop())
        except QueueFull as err:
            raise APIError(429, f"the server is busy: {err}; retry after {RETRY_AFTER_SECONDS} s",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except ConfigError as err:
            raise APIError(400, str(err)) from None
        choices = Choices({rid: i for i, rid in enumerate(ids)})
        reply = Reply(chat, body.model, sum(len(p) for p in prompts), choices, queue, start)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(reply.stream(worker, metrics, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        choices = await _unless_disconnected(request, reply.collect(worker, metrics))
        return JSONResponse(reply.json(choices))

    return Gatekeeper(app, api_key, metrics)


async def _unless_disconnected(request: Request, work: Any, poll_seconds: float = 0.25) -> Any:
    """Await `work`, cancelling it if the client disconnects first (starlette cancels a streaming response by
    itself, a plain one not)."""
    task = asyncio.ensure_future(work)
    while not (await asyncio.wait({task}, timeout=poll_seconds))[0]:
        if await request.is_disconnected():
            task.cancel()
            raise ClientGone
    return task.result()


@dataclass
class Reply:
    """One generation request's answer, whole (`collect`) or as server-sent events (`stream`)."""

    chat: bool
    model: str
    prompt_tokens: int
    choices: Choices
    queue: asyncio.Queue
    start: float
    first_token: float | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    text_chunks: dict[int, list[str]] = field(default_factory=dict)  # choice index -> its text event around the text

    async def events(self, worker: EngineWorker, metrics: Metrics) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice index, new text, finish reason) as the engine sends them; cancels the unfinished requests when
        the consumer stops early (the client went away)."""
        try:
            while self.choices.unfinished:
                event = await self.queue.get()
                if isinstance(event, EngineFailed):
                    raise APIError(500, event.message)
                i = self.choices.index[event.request_id]
                if event.token_id is not None:
                    self.choices.tokens += 1
                    if self.first_token is None:
                        self.first_token = time.perf_counter() - self.start
                self.choices.text[i] += event.text
                self.choices.finish[i] = event.finish_reason
                yield i, event.text, event.finish_reason
            metrics.record_generation(self.prompt_tokens, self.choices.tokens, time.perf_counter() - self.start,
                                      self.first_token)
        finally:
            if self.choices.unfinished:
                worker.cancel(self.choices.unfinished)

    async def collect(self, worker: EngineWorker, metrics: Metrics) -> Choices:
        async for _ in self.events(worker, metrics):
            pass
        return self.choices

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.choices.tokens,
                "total_tokens": self.prompt_tokens + self.choices.tokens}

    def _envelope(self, chunk: bool) -> dict:
        kind = ("chat.completion" + ".chunk" * chunk) if self.chat else "text_completion"
        return {"id": ("chatcmpl-" if self.chat else "cmpl-") + self.id, "object": kind, "created": self.created,
                "model": self.model}

    def json(self, choices: Choices) -> dict:
        pairs = enumerate(zip(choices.text, choices.finish, strict=True))
        if self.chat:
            items = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                      "logprobs": None} for i, (text, finish) in pairs]
        else:
            items = [{"index": i, "text": text, "finish_reason": finish, "logprobs": None}
                     for i, (text, finish) in pairs]
        return {**self._envelope(chunk=False), "choices": items, "usage": self.usage}

    def _chunk(self, index: int, text: str | None, finish: str | None, role: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        return _sse({**self._envelope(chunk=True), "choices": [choice]})

    def _text_chunk(self, index: int, text: str) -> str:
        """`_chunk(index, text, None)`, the event of each new piece of text: only the text is encoded, into the rest
        of the event made once per choice (building and encoding the whole event each time took most of the HTTP
        side's work per token)."""
        around = self.text_chunks.get(index)
        if around is None:
            around = self.text_chunks[index] = self._chunk(index, _SLOT, None).split(_json_string(_SLOT))
        return around[0] + _json_string(text) + around[1]

    async def stream(self, worker: EngineWorker, metrics: Metrics, include_usage: bool) -> AsyncIterator[str]:
        """The reply's server-sent events, one per token; the events ready at once go out in one write."""
        ready = [self._chunk(i, None, None, role=True) for i in range(len(self.choices.text))] if self.chat else []
        try:
            async for i, text, finish in self.events(worker, metrics):
                if text:
                    ready.append(self._text_chunk(i, text))
                if finish is not None:
                    ready.append(self._chunk(i, None, finish))
                if ready and self.queue.empty() and self.choices.unfinished:
                    yield "".join(ready)
                    ready.clear()
        except APIError as err:  # headers are sent: the error goes in the stream, as OpenAI's does
            yield "".join(ready) + _sse({"error": {"message": str(err), "type": "server_error", "param": None,
                                                   "code": None}})
            return
        if include_usage:
            ready.append(_sse({**self._envelope(chunk=True), "choices": [], "usage": self.usage}))
        yield "".join(ready) + "data: [DONE]\n\n"


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


_SLOT = "\0text\0"  # where `_text_chunk` puts the text: no model name or id holds a NUL
_json_string = json.JSONEncoder(ensure_ascii=False).encode  # a str as `_sse` encodes it
