"""The request bodies of /v1/chat/completions and /v1/completions, as OpenAI's API defines them (the fields lmforge
serves); `parse_body` turns bad JSON, a missing field or a wrong type into a 400 naming the field."""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmforge.serve.errors import APIError

# Extra fields a client may send that change nothing here (OpenAI's own clients send some of them).
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields chat and text completions share. OpenAI's defaults: temperature 1, top_p 1, n 1."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(s == "" for s in stops):
            raise APIError(400, "stop must be a non-empty string or a list of up to 4 non-empty strings",
                           param="stop")
        return tuple(stops)

    def check_supported(self) -> None:
        """A 400 for a field lmforge does not implement (logprobs, penalties, tools...) set to anything but its
        neutral value, rather than silently answering something else than asked."""
        for key, value in (self.model_extra or {}).items():
            if key not in IGNORED_FIELDS and value not in (None, False, 0, "", [], {}):
                raise APIError(400, f"the parameter {key!r} is not supported by lmforge serve; leave it out",
                               param=key)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_message(self) -> dict[str, str]:
        """{"role", "content"} for the chat template: text parts joined, "developer" (OpenAI's newer name for the
        system role) as "system"."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int]


Body = TypeVar("Body", bound=SamplingRequest)


def parse_body(raw: bytes, schema: type[Body]) -> Body:
    """The validated request, or APIError 400 naming the first bad field."""
    try:
        data: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON ({err}); send a JSON object") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        body = schema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None
    body.check_supported()
    return body
