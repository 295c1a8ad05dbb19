"""What a caller hands the engine and what comes back: plain dataclasses, no JAX, no HTTP.

A `GenerationRequest` names an adapter (or None for the base model), carries a prompt (text, token ids,
or chat messages rendered with the processor's chat template), zero or more images, sampling settings
and stop conditions, or a classify task answered from the adapter's head in one forward pass.
`Engine.submit` returns a `RequestHandle`: iterate it for `TokenEvent`s as tokens are generated; the
last item is the `Result` (finish reason, token counts, timings). Invalid requests fail alone: their
`Result` has finish reason "error" and a message, and nothing else in the batch is disturbed.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal

FinishReason = Literal["stop", "length", "error", "cancelled"]


class RequestError(ValueError):
    """A request the engine refuses (unknown adapter, undecodable image, prompt too long, bad settings).

    `status` is the HTTP status a server should answer with (400 bad input, 404 unknown model)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters; `seed` makes sampling repeatable;
    `ignore_eos` keeps generating past the end-of-sequence token (vLLM's, for fixed-length benchmarks)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def check(self) -> None:
        if not (0.0 <= self.temperature <= 100.0):
            raise RequestError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclasses.dataclass
class GenerationRequest:
    """One request. Exactly one of `prompt` (text), `prompt_ids` and `messages` (OpenAI-style chat messages,
    content as a string or a list of {"type": "text" | "image"} parts) is given; `images` are PIL images
    (or anything `PIL.Image.open` reads: a path or bytes), in the order of the prompt's image slots.
    `classify` names a classify task of the adapter: the answer is its head's label, from one forward pass.
    """

    adapter: str | None = None
    prompt: str | None = None
    prompt_ids: Sequence[int] | None = None
    messages: Sequence[dict[str, Any]] | None = None
    images: Sequence[Any] = ()
    sampling: SamplingParams = SamplingParams()
    classify: str | None = None
    id: str = ""


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token: its id, the text it adds (detokenised incrementally; may be empty while a
    multi-token character is incomplete), and its log-probability under the sampling distribution."""

    token_id: int
    text: str
    logprob: float | None = None


@dataclasses.dataclass
class Result:
    """How a request ended. `text` / `token_ids` are the whole output; `label` the classify answer.
    Timings are seconds on `time.monotonic()`: `arrival`, `started` (admitted into a slot),
    `first_token`, `finished`, and `token_times` (one per output token)."""

    id: str
    finish_reason: FinishReason
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    label: str | None = None
    prompt_tokens: int = 0
    error: str | None = None
    status: int = 200
    arrival: float = 0.0
    started: float | None = None
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class RequestHandle:
    """The caller's side of a submitted request: iterate for `TokenEvent`s then the final `Result`, or
    `result()` to wait for the end; `cancel()` frees its slot at the next step. Thread-safe."""

    def __init__(self, request_id: str):
        self.id = request_id
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._cancelled = threading.Event()
        self._result: Result | None = None

    # engine side
    def _emit(self, event: TokenEvent) -> None:
        self._events.put(event)

    def _finish(self, result: Result) -> None:
        self._result = result
        self._events.put(result)
        self._done.set()

    # caller side
    def __iter__(self) -> Iterator[TokenEvent | Result]:
        while True:
            item = self._events.get()
            yield item
            if isinstance(item, Result):
                return

    def result(self, timeout: float | None = None) -> Result:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        return self._result

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()


def now() -> float:
    return time.monotonic()
