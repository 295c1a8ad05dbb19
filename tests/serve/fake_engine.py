"""A deterministic stand-in for `serve.engine.Engine`, for testing the HTTP layer without a model.

It keeps `serve.engine.Engine`'s interface (submit / handles / stats / adapters / load and unload /
classify tasks) and raises the engine's own refusals (`RequestError` 400/404, `EngineOverloaded` 429
with `retry_after`, `EngineDead` 503), and runs a real loop thread with decode slots and a waiting queue, so running and waiting counts move. Its answers
are a function of the request alone (adapter, rendered prompt, image sizes, seed), written out by
`expected_tokens`, so a test knows each request's answer without the server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import pathlib
import threading
import time

from PIL import Image

from serve.engine import GenerationRequest, RequestError, RequestHandle, Result, TokenEvent
from serve.engine.engine import EngineDead, EngineOverloaded, EngineStats

CLASSIFY_TASKS = {"a": ["colour"], "b": []}


def render_prompt(request: GenerationRequest) -> str:
    if request.prompt is not None:
        return request.prompt
    if request.prompt_ids is not None:
        return " ".join(f"<{t}>" for t in request.prompt_ids)
    lines = []
    for message in request.messages:
        content = message["content"]
        if not isinstance(content, str):
            content = " ".join(p["text"] if p["type"] == "text" else "<image>" for p in content)
        lines.append(f"{message['role']}: {content}")
    return "\n".join(lines)


def image_size(image) -> tuple[int, int]:
    """The size of a PIL image, or of the image in bytes or a file (as the engine, RequestError when it
    does not decode)."""
    if isinstance(image, Image.Image):
        return image.size
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
            return opened.size
    except (OSError, ValueError) as exc:
        raise RequestError(f"the image does not decode: {exc}") from None


def expected_tokens(request: GenerationRequest) -> list[tuple[int, str]]:
    """The (token id, text) pairs the fake generates for `request`, before stop and length rules: 3 to 12
    words drawn from a hash of everything that determines the answer."""
    sizes = [image_size(image) for image in request.images]
    seed = request.sampling.seed if request.sampling.temperature > 0 else None
    digest = hashlib.sha256(repr((request.adapter, render_prompt(request), sizes, seed)).encode()).digest()
    length = 3 + digest[0] % 10
    name = request.adapter or "base"
    return [(1 + digest[1 + i], f" {name}{digest[1 + i]}") for i in range(length)]


def expected_answer(request: GenerationRequest) -> tuple[str, str]:
    """The fake's (text, finish reason) for `request`: its words, cut at max_tokens, a stop token id or the
    first stop string (excluded from the text)."""
    text, reason = "", "stop"
    for count, (token_id, piece) in enumerate(expected_tokens(request), start=1):
        if token_id in request.sampling.stop_token_ids:
            return text, "stop"
        text += piece
        for stop in request.sampling.stop:
            if stop in text:
                return text[: text.index(stop)], "stop"
        if count == request.sampling.max_tokens:
            reason = "length"
            break
    return text, reason


@dataclasses.dataclass
class _Running:
    request: GenerationRequest
    handle: RequestHandle
    result: Result
    tokens: list[tuple[int, str]]
    position: int = 0


class FakeEngine:
    def __init__(self, *, adapters=("a", "b"), served_model_name: str = "fake-base", max_num_seqs: int = 8,
                 max_waiting: int = 256, max_model_len: int = 64, max_loras: int = 8, step_s: float = 0.002):
        self.served_model_name = served_model_name
        self._adapters = {name: f"/adapters/{name}" for name in adapters}
        self.max_num_seqs, self.max_waiting, self.max_model_len = max_num_seqs, max_waiting, max_model_len
        self.max_loras, self.step_s = max_loras, step_s
        self._lock = threading.Lock()
        self._waiting: list[_Running] = []
        self._running: list[_Running] = []
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._dead = False
        self.paused = threading.Event()  # set: the loop admits and decodes nothing
        self.finished: list[Result] = []
        self._thread = threading.Thread(target=self._loop, daemon=True, name="fake-engine")

    @classmethod
    def from_pretrained(cls, model: str, *, lora_modules: dict[str, str] = {}, served_model_name: str | None = None,
                        **settings) -> FakeEngine:
        """The engine's constructor's shape: `lora_modules` name the adapters (paths are not read)."""
        engine = cls(adapters=tuple(lora_modules), served_model_name=served_model_name or model,
                     **{k: v for k, v in settings.items() if k in ("max_num_seqs", "max_waiting", "max_loras", "max_model_len") and v is not None})
        engine.settings = settings
        return engine

    # ----------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread.start()

    def shutdown(self, cancel: bool = False, timeout: float | None = None) -> None:
        if cancel:
            with self._lock:
                for entry in self._running + self._waiting:
                    entry.handle.cancel()
        deadline = time.monotonic() + (timeout or 30.0)
        while (self._running or self._waiting) and time.monotonic() < deadline and not self._dead:
            time.sleep(0.005)
        self._stop.set()
        self._thread.join()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.shutdown(cancel=True)

    def kill(self) -> None:
        """Fail every request in flight as a dead engine does and refuse all later ones with 503."""
        with self._lock:
            self._dead = True
            for entry in self._running + self._waiting:
                self._finish(entry, "error", error="the engine has died", status=503)
            self._running, self._waiting = [], []

    # ------------------------------------------------------------------------------------ requests
    def submit(self, request: GenerationRequest) -> RequestHandle:
        if self._dead:
            raise EngineDead("the engine has died")
        if request.adapter is not None and request.adapter not in self._adapters:
            raise RequestError(f"unknown adapter {request.adapter!r}", status=404)
        request.sampling.check()
        slots = sum(1 for m in request.messages or () if not isinstance(m["content"], str)
                    for p in m["content"] if p["type"] == "image")
        if request.messages is not None and slots != len(request.images):
            raise RequestError(f"{slots} image slots but {len(request.images)} images")
        for image in request.images:
            image_size(image)
        prompt = render_prompt(request)
        prompt_tokens = len(prompt.split()) + 4 * len(request.images)
        if not prompt.strip():
            raise RequestError("the prompt is empty")
        if prompt_tokens + request.sampling.max_tokens > self.max_model_len:
            raise RequestError(f"prompt ({prompt_tokens} tokens) plus max_tokens ({request.sampling.max_tokens}) "
                               f"exceeds the model's {self.max_model_len} tokens")
        if request.classify is not None and request.classify not in self.classify_tasks(request.adapter):
            raise RequestError(f"adapter {request.adapter!r} has no classify task {request.classify!r}")
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise EngineOverloaded(f"{len(self._waiting)} requests are waiting; retry later", retry_after=1.5)
            request_id = request.id or f"fake-{next(self._ids)}"
            handle = RequestHandle(request_id)
            result = Result(id=request_id, finish_reason="stop", prompt_tokens=prompt_tokens,
                            arrival=time.monotonic())
            self._waiting.append(_Running(request, handle, result, expected_tokens(request)))
        return handle

    def generate(self, request: GenerationRequest) -> Result:
        return self.submit(request).result()

    def _finish(self, entry: _Running, reason: str, error: str | None = None, status: int = 200) -> None:
        entry.result.finish_reason, entry.result.error, entry.result.status = reason, error, status
        entry.result.finished = time.monotonic()
        self.finished.append(entry.result)
        entry.handle._finish(entry.result)

    def _loop(self) -> None:
        while not self._stop.is_set():
            time.sleep(self.step_s)
            if self.paused.is_set() or self._dead:
                continue
            with self._lock:
                while self._waiting and len(self._running) < self.max_num_seqs:
                    entry = self._waiting.pop(0)
                    entry.result.started = time.monotonic()
                    self._running.append(entry)
                for entry in list(self._running):
                    if self._step(entry):
                        self._running.remove(entry)
                self._waiting = [e for e in self._waiting if not (e.handle.cancelled and self._cancel(e))]

    def _cancel(self, entry: _Running) -> bool:
        self._finish(entry, "cancelled")
        return True

    def _step(self, entry: _Running) -> bool:
        """Decode one token of `entry`; True when it has finished."""
        request, result = entry.request, entry.result
        if entry.handle.cancelled:
            return self._cancel(entry)
        if request.classify is not None:
            result.label = result.text = f"{request.classify}-{entry.tokens[0][0] % 3}"  # as the engine
            result.first_token = time.monotonic()
            self._finish(entry, "stop")
            return True
        text, reason = expected_answer(request)
        if len(result.text) >= len(text):
            result.text = text
            self._finish(entry, reason)
            return True
        token_id, piece = entry.tokens[entry.position]
        piece = piece[: len(text) - len(result.text)]
        entry.position += 1
        now = time.monotonic()
        result.first_token = result.first_token or now
        result.token_times.append(now)
        result.token_ids.append(token_id)
        result.text += piece
        entry.handle._emit(TokenEvent(token_id, piece, logprob=-0.25 * entry.position))
        return False

    # ------------------------------------------------------------------------------------ adapters
    def adapters(self) -> list[str]:
        return list(self._adapters)

    def classify_tasks(self, adapter: str | None) -> list[str]:
        return CLASSIFY_TASKS.get(adapter, [])

    def load_adapter(self, name: str, path: str) -> None:
        if name == self.served_model_name:
            raise RequestError(f"adapter name {name!r} is the base model's name")
        if name in self._adapters:
            raise RequestError(f"adapter {name!r} is already loaded")
        if not (pathlib.Path(path) / "adapter_config.json").is_file():
            raise RequestError(f"adapter {name!r}: no adapter_config.json under {path}", status=404)
        self._adapters[name] = path

    def unload_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise RequestError(f"adapter {name!r} is not loaded", status=404)
        del self._adapters[name]

    def stats(self) -> EngineStats:
        with self._lock:
            running = sorted({e.request.adapter for e in self._running if e.request.adapter})
            waiting = sorted({e.request.adapter for e in self._waiting if e.request.adapter})
            return EngineStats(running=len(self._running), waiting=len(self._waiting),
                               kv_usage=len(self._running) / self.max_num_seqs, max_loras=self.max_loras,
                               loaded_adapters=list(self._adapters), running_adapters=running,
                               waiting_adapters=waiting, mode="unmerged", merged=None, switches=0,
                               healthy=not self._dead)
