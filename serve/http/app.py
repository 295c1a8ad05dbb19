"""The OpenAI-compatible FastAPI application over a running engine.

`create_app(engine, settings)` serves, with vLLM's paths and bodies:
`POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models` (the base model and each adapter,
`parent` = the base), `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (only when runtime
updating is allowed), `GET /health` and `GET /metrics`. Request bodies are read and answers written by
`serve.protocol`, as `serve.batch` does; streaming, logprobs, auth, overload and metrics are this
module's. The engine's loop runs in its own thread: handlers translate and submit through worker threads
and await the engine's events through `serve.http.events`, so the event loop never blocks. The caller
owns the engine (starts it before serving, shuts it down after).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import protocol
from serve.engine import GenerationRequest, RequestError, RequestHandle, Result, TokenEvent
from serve.http import formats
from serve.http.errors import APIError
from serve.http.events import MergedEvents
from serve.http.metrics import ServerMetrics

log = logging.getLogger("serve.http")


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What the server adds to the engine. `api_key`: required as `Authorization: Bearer KEY` on /v1 paths.
    `allow_runtime_lora_updating`: serve the load/unload endpoints. `allowed_local_media_path`: a directory
    whose files `image_url` may name (file:// URLs or plain paths); None refuses local paths.
    `model_root` and `lora_paths`: what `/v1/models` shows as each model's `root`."""

    api_key: str | None = None
    allow_runtime_lora_updating: bool = False
    allowed_local_media_path: pathlib.Path | None = None
    model_root: str | None = None
    lora_paths: dict[str, str] = dataclasses.field(default_factory=dict)


class APIKeyMiddleware:
    """401 with an error object for /v1 requests without `Authorization: Bearer <key>`, before any body is
    read (pure ASGI, so streaming responses pass through untouched)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                error = APIError("Incorrect or missing API key: send it as 'Authorization: Bearer <key>'",
                                 401, code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine, settings: ServerSettings = ServerSettings()) -> FastAPI:
    app = FastAPI(title="valora-jax", summary="OpenAI-compatible server for many adapters")
    api = _API(engine, settings)
    app.state.api = api
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)

    app.add_exception_handler(APIError, lambda request, exc: exc.response())
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)

    app.post("/v1/chat/completions")(api.chat_completions)
    app.post("/v1/completions")(api.completions)
    app.get("/v1/models")(api.models)
    if settings.allow_runtime_lora_updating:
        app.post("/v1/load_lora_adapter")(api.load_lora_adapter)
        app.post("/v1/unload_lora_adapter")(api.unload_lora_adapter)
    app.get("/health")(api.health)
    app.get("/metrics")(api.metrics_text)
    return app


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's only validation here is that the body is a JSON object."""
    if any(error.get("type") == "json_invalid" for error in exc.errors()):
        return APIError("the body is not valid JSON").response()
    return APIError("the body must be a JSON object").response()


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return APIError(str(exc.detail), exc.status_code).response()


def _flag(body: dict, name: str, kinds: tuple = (bool,), default: Any = False) -> Any:
    """An HTTP-only field of the body (streaming, logprobs), checked like `serve.protocol`'s fields."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise APIError(f"'{name}' must be {' or '.join(k.__name__ for k in kinds)}", param=name)
    return value


class _API:
    def __init__(self, engine, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self.metrics = ServerMetrics(engine)
        self.lora_paths = dict(settings.lora_paths)
        self.created = int(time.time())
        media = settings.allowed_local_media_path
        self.media_dir = None if media is None else pathlib.Path(media).resolve()
        self.in_flight: set[MergedEvents] = set()

    def cancel_all(self) -> None:
        """Cancel every request in flight: each ends at the engine's next step with finish reason "abort"
        (used at shutdown, once the grace period is over)."""
        for events in list(self.in_flight):
            events.cancel()

    # ----------------------------------------------------------------------------------------- models
    def _check_model(self, body: dict) -> str:
        """The body's `model` when it is the base or a loaded adapter; 404 for another name (a missing or
        non-string model is left to `serve.protocol`'s 400)."""
        model = body.get("model")
        if isinstance(model, str) and model != self.engine.served_model_name and model not in self.engine.adapters():
            self.metrics.record_refusal("unknown", 404)
            raise APIError(f"The model `{model}` does not exist.", 404, param="model", code="model_not_found")
        return model if isinstance(model, str) else "unknown"

    def _card(self, name: str, root: str, parent: str | None) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "valora-jax",
                "root": root, "parent": parent, "permission": []}

    async def models(self) -> dict:
        base = self.engine.served_model_name
        cards = [self._card(base, self.settings.model_root or base, None)]
        for name in self.engine.adapters():
            card = self._card(name, self.lora_paths.get(name, name), base)
            try:
                card["classify_tasks"] = list(self.engine.classify_tasks(name))
            except KeyError:  # unloaded since adapters() listed it
                continue
            cards.append(card)
        return {"object": "list", "data": cards}

    # ---------------------------------------------------------------------------------- completions
    async def chat_completions(self, body: dict = Body(...)) -> Response:
        if _flag(body, "top_logprobs", (int,), 0):
            raise APIError("top_logprobs > 0 is not supported: logprobs returns the sampled token's "
                           "log-probability only", param="top_logprobs")
        return await self._complete(protocol.CHAT, body, logprobs=_flag(body, "logprobs"))

    async def completions(self, body: dict = Body(...)) -> Response:
        logprobs = _flag(body, "logprobs", (int,), None)
        if logprobs:
            raise APIError("logprobs > 0 is not supported: logprobs=0 returns the sampled token's "
                           "log-probability only", param="logprobs")
        return await self._complete(protocol.COMPLETIONS, body, logprobs=logprobs is not None)

    def _request(self, kind: str, body: dict) -> tuple[GenerationRequest, int]:
        """The engine request of a body and its number of choices (`serve.protocol`'s reading)."""
        base = self.engine.served_model_name
        if kind == protocol.CHAT:
            request = protocol.chat_request(body, base_model=base, allow_local_paths=self.media_dir is not None)
        else:
            request = protocol.completion_request(body, base_model=base)
        for image in request.images:
            if isinstance(image, str) and not pathlib.Path(image).resolve().is_relative_to(self.media_dir):
                raise RequestError(f"image file {image} is outside the allowed media directory {self.media_dir}")
        return request, protocol.copies(body)

    async def _complete(self, kind: str, body: dict, *, logprobs: bool) -> Response:
        model = self._check_model(body)
        stream = _flag(body, "stream")
        include_usage = _flag(_flag(body, "stream_options", (dict,), {}), "include_usage")
        try:
            request, n = await anyio.to_thread.run_sync(self._request, kind, body)
        except RequestError as exc:
            self.metrics.record_refusal(model, exc.status)
            raise APIError.from_engine(exc) from None
        handles = await self._submit(model, [request] * n)
        events = MergedEvents(handles, on_result=lambda result: self.metrics.record_result(model, result))
        self.in_flight.add(events)
        streaming = False
        try:
            rest = aiter(events)
            first = await anext(rest)
            if isinstance(first[1], Result) and first[1].finish_reason == "error":
                raise _result_error(first[1])
            answer = _Answer(kind, model, n, logprobs)
            if not stream:
                return JSONResponse(await answer.whole(first, rest))
            streaming = True
            return StreamingResponse(answer.stream(first, rest, self._release(events), include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        finally:
            if not streaming:
                self._release(events)()

    async def _submit(self, model: str, requests: list[GenerationRequest]) -> list[RequestHandle]:
        """Submit every request (through a worker thread: the engine tokenises and decodes images); on a
        refusal cancel the ones already in and answer the engine's status."""
        handles = []
        try:
            for request in requests:
                handles.append(await anyio.to_thread.run_sync(self.engine.submit, request))
        except Exception as exc:
            for handle in handles:
                handle.cancel()
            if getattr(exc, "status", None) is None:
                raise
            self.metrics.record_refusal(model, exc.status)
            raise APIError.from_engine(exc) from None
        return handles

    def _release(self, events: MergedEvents):
        """What ends a response: cancel what is left of its requests and forget them."""
        def release() -> None:
            events.cancel()
            self.in_flight.discard(events)
        return release

    # ------------------------------------------------------------------------------------- adapters
    @staticmethod
    def _name(body: dict, field: str) -> str:
        value = body.get(field)
        if not isinstance(value, str) or not value:
            raise APIError(f"'{field}' must be a non-empty string", param=field)
        return value

    async def load_lora_adapter(self, body: dict = Body(...)) -> PlainTextResponse:
        name, path = self._name(body, "lora_name"), self._name(body, "lora_path")
        await self._adapter_call(self.engine.load_adapter, name, path)
        self.lora_paths[name] = path
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, body: dict = Body(...)) -> PlainTextResponse:
        name = self._name(body, "lora_name")
        await self._adapter_call(self.engine.unload_adapter, name)
        self.lora_paths.pop(name, None)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @staticmethod
    async def _adapter_call(fn, *args) -> None:
        try:
            await anyio.to_thread.run_sync(fn, *args)
        except Exception as exc:
            if getattr(exc, "status", None) is None:
                raise
            raise APIError.from_engine(exc) from None

    # -------------------------------------------------------------------------------- health, metrics
    async def health(self) -> Response:
        try:
            healthy = (await anyio.to_thread.run_sync(self.engine.stats)).healthy
        except Exception:
            log.exception("engine.stats() failed")
            healthy = False
        return Response(status_code=200 if healthy else 503)

    async def metrics_text(self) -> Response:
        text = await anyio.to_thread.run_sync(generate_latest, self.metrics.registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)


def _result_error(result: Result) -> APIError:
    return APIError(result.error or "the request failed", result.status if result.status >= 400 else 500)


class _Answer:
    """One response's choices as the engine's events arrive: a whole JSON body, or a stream of chunks."""

    def __init__(self, kind: str, model: str, n: int, logprobs: bool):
        self.kind, self.model, self.logprobs = kind, model, logprobs
        self.id, self.created = protocol.new_id(kind), int(time.time())
        self.results: list[Result | None] = [None] * n
        self.entries: list[protocol.LogprobEntries] = [[] for _ in range(n)]

    async def whole(self, first, rest: AsyncIterator) -> dict:
        index, item = first
        while True:
            if isinstance(item, TokenEvent):
                self.entries[index].append((item.text, item.logprob))
            elif item.finish_reason == "error":
                raise _result_error(item)
            else:
                self.results[index] = item
            try:
                index, item = await anext(rest)
            except StopAsyncIteration:
                break
        return protocol.response_body(self.kind, self.results, self.model, request_id=self.id,
                                      logprobs=self.entries if self.logprobs else None)

    def _event(self, choices: list[dict], include_usage: bool, usage: dict | None = None) -> str:
        return formats.event(self.kind, self.id, self.model, self.created, choices, include_usage=include_usage,
                             usage=usage)

    async def stream(self, first, rest: AsyncIterator, release, include_usage: bool):
        """Server-sent events: an opening chunk per choice (chat), a chunk per token, a closing chunk with
        the finish reason per choice, the usage chunk when asked, then `data: [DONE]`. A choice that fails
        after the stream began sends an error object in place of its chunks. A classify answer (no token
        events) arrives whole in its closing chunk."""
        sent = [0] * len(self.results)
        try:
            for index in range(len(self.results)):
                opening = formats.opening(self.kind, index)
                if opening is not None:
                    yield self._event([opening], include_usage)
            index, item = first
            while True:
                if isinstance(item, TokenEvent):
                    entries = [(item.text, item.logprob)] if self.logprobs else None
                    yield self._event([formats.delta(self.kind, index, item.text, entries, None, sent[index])],
                                      include_usage)
                    sent[index] += len(item.text)
                elif item.finish_reason == "error":
                    yield f"data: {json.dumps(_result_error(item).body())}\n\n"
                else:
                    self.results[index] = item
                    text = item.text[sent[index]:]
                    yield self._event([formats.delta(self.kind, index, text, [] if self.logprobs else None,
                                                     item.finish_reason, sent[index])], include_usage)
                try:
                    index, item = await anext(rest)
                except StopAsyncIteration:
                    break
            if include_usage:
                yield self._event([], True, protocol.usage([r for r in self.results if r is not None]))
            yield "data: [DONE]\n\n"
        finally:
            release()
