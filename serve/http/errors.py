"""The exception that carries OpenAI's error object (`serve.protocol.error_body`) to the client.

Every failure the server answers is `{"error": {"message", "type", "param", "code"}}` with the HTTP status
that fits it (the `openai` client raises its exception class by status): 400 bad input, 401 a wrong or
missing API key, 404 an unknown model or adapter, 429 and 503 overload or a dead engine, with
`Retry-After` when the engine says when to retry, 500 only for a bug in the server itself.
"""

from __future__ import annotations

import math

from fastapi.responses import JSONResponse

from serve import protocol


class APIError(Exception):
    """A request the server answers with an error object instead of a result."""

    def __init__(self, message: str, status: int = 400, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.retry_after = message, status, param, code, retry_after

    @classmethod
    def from_engine(cls, exc: Exception) -> APIError:
        """The engine's refusals carry their status (`RequestError` 400/404, `EngineOverloaded` 429,
        `EngineDead` 503) and, when retrying makes sense, `retry_after` seconds."""
        status = getattr(exc, "status", 500)
        code = "model_not_found" if status == 404 else None
        return cls(str(exc), status, code=code, retry_after=getattr(exc, "retry_after", None))

    def body(self) -> dict:
        return protocol.error_body(self.message, self.status, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return JSONResponse(self.body(), status_code=self.status, headers=headers)
