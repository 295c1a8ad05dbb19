"""The OpenAI-compatible FastAPI application over a running engine.

`create_app(engine, settings)` serves, with vLLM's paths and bodies:
`POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models` (the base model and each adapter,
`parent` = the base), `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (only when runtime
updating is allowed), `GET /health` and `GET /metrics`. The engine's loop runs in its own thread: handlers
submit through a worker thread and await the engine's events through `serve.http.events`, so the event
loop never blocks. The caller owns the engine (starts it before serving, shuts it down after).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import secrets
import uuid
from collections.abc import AsyncIterator, Sequence

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.engine import GenerationRequest, RequestHandle, Result, SamplingParams, TokenEvent
from serve.http import formats
from serve.http.errors import APIError
from serve.http.events import MergedEvents
from serve.http.media import load_image
from serve.http.metrics import ServerMetrics
from serve.http.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ImagePart,
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
)

log = logging.getLogger("serve.http")


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What the server adds to the engine. `api_key`: required as `Authorization: Bearer KEY` on /v1 paths.
    `allow_runtime_lora_updating`: serve the load/unload endpoints. `allowed_local_media_path`: a directory
    whose files `image_url` may name (file:// URLs or plain paths); None refuses local paths.
    `default_max_tokens`: the output limit of a request that sets none. `model_root` and `lora_paths`: what
    `/v1/models` shows as each model's `root`."""

    api_key: str | None = None
    allow_runtime_lora_updating: bool = False
    allowed_local_media_path: pathlib.Path | None = None
    default_max_tokens: int = 16
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
    problems = []
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            problems.append(f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})")
            continue
        location = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        problems.append(f"{location or 'body'}: {error.get('msg')}")
    first = next((e for e in exc.errors() if e.get("type") != "json_invalid"), None)
    param = ".".join(str(p) for p in first["loc"] if p != "body") if first else None
    return APIError("; ".join(problems), 400, param=param or None).response()


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return APIError(str(exc.detail), exc.status_code).response()


class _API:
    def __init__(self, engine, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self.metrics = ServerMetrics(engine)
        self.lora_paths = dict(settings.lora_paths)
        self.created = formats.now()
        self.in_flight: set[MergedEvents] = set()

    def cancel_all(self) -> None:
        """Cancel every request in flight: each ends at the engine's next step with finish reason "abort"
        (used at shutdown, once the grace period is over)."""
        for events in list(self.in_flight):
            events.cancel()

    # ----------------------------------------------------------------------------------------- models
    def _adapter(self, model: str | None) -> str | None:
        """The adapter a request's `model` names (None: the base model); 404 for anything else."""
        if model is None or model == self.engine.served_model_name:
            return None
        if model in self.engine.adapters():
            return model
        self.metrics.record_refusal("unknown", 404)
        raise APIError(f"The model `{model}` does not exist.", 404, param="model", code="model_not_found")

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
    async def chat_completions(self, body: ChatCompletionRequest) -> Response:
        if body.top_logprobs:
            raise APIError("top_logprobs > 0 is not supported: logprobs returns the sampled token's "
                           "log-probability only", param="top_logprobs")
        adapter = self._adapter(body.model)
        messages, images = await anyio.to_thread.run_sync(self._chat_messages, body.messages)
        requests = [GenerationRequest(adapter=adapter, messages=messages, images=images,
                                      sampling=self._sampling(body, i), classify=body.classify)
                    for i in range(body.n)]
        return await self._answer(formats.ChatFormat(), f"chatcmpl-{uuid.uuid4().hex}", body, requests,
                                  logprobs=body.logprobs, prompts=1)

    async def completions(self, body: CompletionRequest) -> Response:
        if body.logprobs:
            raise APIError("logprobs > 0 is not supported: logprobs=0 returns the sampled token's "
                           "log-probability only", param="logprobs")
        adapter = self._adapter(body.model)
        prompts = body.prompts()
        if not prompts:
            raise APIError("prompt is empty", param="prompt")
        requests = [GenerationRequest(adapter=adapter, sampling=self._sampling(body, i), classify=body.classify,
                                      **({"prompt": p} if isinstance(p, str) else {"prompt_ids": p}))
                    for p in prompts for i in range(body.n)]
        return await self._answer(formats.CompletionFormat(), f"cmpl-{uuid.uuid4().hex}", body, requests,
                                  logprobs=body.logprobs is not None, prompts=len(prompts))

    def _chat_messages(self, messages: Sequence[ChatMessage]) -> tuple[list[dict], list]:
        """OpenAI messages as the engine's: image parts become {"type": "image"} slots, their images
        decoded in order; a developer message is a system message."""
        rendered, images = [], []
        for i, message in enumerate(messages):
            content = message.content
            if content is None:
                content = ""
            elif not isinstance(content, str):
                parts = []
                for j, part in enumerate(content):
                    if isinstance(part, ImagePart):
                        images.append(load_image(part.image_url.url, param=f"messages.{i}.content.{j}.image_url",
                                                 allowed_local_media_path=self._media_dir()))
                        parts.append({"type": "image"})
                    else:
                        parts.append({"type": "text", "text": part.text})
                content = parts
            rendered.append({"role": "system" if message.role == "developer" else message.role,
                             "content": content})
        return rendered, images

    def _media_dir(self) -> pathlib.Path | None:
        path = self.settings.allowed_local_media_path
        return None if path is None else pathlib.Path(path).resolve()

    def _sampling(self, body: ChatCompletionRequest | CompletionRequest, index: int) -> SamplingParams:
        """The engine's settings for choice `index`; a seeded request's choices get seeds seed, seed+1, ..."""
        limit = body.token_limit()
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_k=body.top_k or 0, top_p=1.0 if body.top_p is None else body.top_p,
            seed=None if body.seed is None else body.seed + index,
            max_tokens=self.settings.default_max_tokens if limit is None else limit,
            stop_token_ids=tuple(body.stop_token_ids or ()), stop=body.stop_strings())

    async def _submit(self, model: str, requests: list[GenerationRequest]) -> list[RequestHandle]:
        """Submit every request (through a worker thread: the engine may tokenise); on a refusal cancel the
        ones already in and answer the engine's status."""
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

    async def _answer(self, fmt, request_id: str, body, requests: list[GenerationRequest], *, logprobs: bool,
                      prompts: int) -> Response:
        model = body.model or self.engine.served_model_name
        handles = await self._submit(model, requests)
        events = MergedEvents(handles, on_result=lambda result: self.metrics.record_result(model, result))
        self.in_flight.add(events)
        streaming = False
        try:
            stream = aiter(events)
            first = await anext(stream)
            if isinstance(first[1], Result) and first[1].finish_reason == "error":
                raise _result_error(first[1])
            answer = _Answer(fmt, request_id, model, body.n, prompts, logprobs)
            if not body.stream:
                return JSONResponse(await answer.whole(first, stream))
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            streaming = True
            return StreamingResponse(answer.stream(first, stream, self._release(events), include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        finally:
            if not streaming:
                self._release(events)()

    def _release(self, events: MergedEvents):
        """What ends a response: cancel what is left of its requests and forget them."""
        def release() -> None:
            events.cancel()
            self.in_flight.discard(events)
        return release

    # ------------------------------------------------------------------------------------- adapters
    async def load_lora_adapter(self, body: LoadLoRAAdapterRequest) -> PlainTextResponse:
        if body.lora_name == self.engine.served_model_name:
            raise APIError(f"'{body.lora_name}' is the base model's name; choose another adapter name",
                           param="lora_name")
        await self._adapter_call(self.engine.load_adapter, body.lora_name, body.lora_path)
        self.lora_paths[body.lora_name] = body.lora_path
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def unload_lora_adapter(self, body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        await self._adapter_call(self.engine.unload_adapter, body.lora_name)
        self.lora_paths.pop(body.lora_name, None)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

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

    def __init__(self, fmt, request_id: str, model: str, n: int, prompts: int, logprobs: bool):
        self.fmt, self.id, self.model, self.n, self.logprobs = fmt, request_id, model, n, logprobs
        self.created = formats.now()
        self.choices = n * prompts
        self.results: list[Result | None] = [None] * self.choices
        self.entries: list[list] = [[] for _ in range(self.choices)]

    def usage(self) -> dict:
        # A prompt counts once however many choices it has (OpenAI's usage for n > 1).
        prompt = sum(r.prompt_tokens for i, r in enumerate(self.results) if r is not None and i % self.n == 0)
        completion = sum(r.completion_tokens for r in self.results if r is not None)
        return formats.usage(prompt, completion)

    @staticmethod
    def _final_text(result: Result) -> str:
        return result.label if result.label is not None else result.text

    async def whole(self, first, rest: AsyncIterator) -> dict:
        index, item = first
        while True:
            if isinstance(item, TokenEvent):
                self.entries[index].append((item.text, item.logprob))
            else:
                if item.finish_reason == "error":
                    raise _result_error(item)
                self.results[index] = item
            try:
                index, item = await anext(rest)
            except StopAsyncIteration:
                break
        choices = [self.fmt.choice(i, self._final_text(r), self.entries[i] if self.logprobs else None,
                                   formats.FINISH_REASONS[r.finish_reason])
                   for i, r in enumerate(self.results)]
        return formats.envelope(self.fmt, self.id, self.model, self.created, chunk=False, choices=choices,
                                usage=self.usage())

    def _chunk(self, choices: list[dict], include_usage: bool, usage: dict | None = None) -> str:
        body = formats.envelope(self.fmt, self.id, self.model, self.created, chunk=True, choices=choices,
                                usage=usage, include_usage=include_usage)
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

    async def stream(self, first, rest: AsyncIterator, release, include_usage: bool):
        """Server-sent events: an opening chunk per choice (chat), a chunk per token, a closing chunk with
        the finish reason per choice, the usage chunk when asked, then `data: [DONE]`. A choice that fails
        after the stream began sends an error object in place of its chunks."""
        sent = [0] * self.choices
        try:
            for i in range(self.choices):
                opening = self.fmt.opening(i)
                if opening is not None:
                    yield self._chunk([opening], include_usage)
            index, item = first
            while True:
                if isinstance(item, TokenEvent):
                    entries = [(item.text, item.logprob)] if self.logprobs else None
                    yield self._chunk([self.fmt.delta(index, item.text, entries, None, sent[index])],
                                      include_usage)
                    sent[index] += len(item.text)
                elif item.finish_reason == "error":
                    yield f"data: {json.dumps(_result_error(item).body())}\n\n"
                else:
                    self.results[index] = item
                    text = item.label if item.label is not None else ""
                    yield self._chunk([self.fmt.delta(index, text, [] if self.logprobs else None,
                                                      formats.FINISH_REASONS[item.finish_reason], sent[index])],
                                      include_usage)
                try:
                    index, item = await anext(rest)
                except StopAsyncIteration:
                    break
            if include_usage:
                yield self._chunk([], True, self.usage())
            yield "data: [DONE]\n\n"
        finally:
            release()
