"""HTTP errors with OpenAI's error body: {"error": {"message", "type", "param", "code"}}, one line of message."""

from __future__ import annotations

from starlette.responses import JSONResponse

from lmforge.errors import one_line

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error answered to the client; `param` names the request field at fault, `code` is OpenAI's code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(one_line(message))
        self.status, self.param, self.code, self.headers = status, param, code, headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, str(self), param=self.param, code=self.code, headers=self.headers)


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": one_line(message), "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)
