"""The OpenAI API's request and response bodies, translated to and from the engine's types.

Shared by the HTTP server and `serve.batch`, so both accept the same bodies and answer the same JSON.
- Chat completions: `messages` whose content is a string or a list of parts (`{"type": "text"}` and
  `{"type": "image_url", "image_url": {"url": ...}}` with a `data:` base64 URL; a local file path only
  where the caller allows it; http(s) URLs are refused, since nothing is fetched).
- Completions: `prompt` as a string, a list of one string, or a list of token ids.
- Sampling: `temperature`, `top_p`, `top_k` (vLLM's extension), `seed`, `max_tokens` /
  `max_completion_tokens`, `stop` (a string or a list), `stop_token_ids` and `ignore_eos` (vLLM's); `n` copies.
- Classify (this project's extension): `"classify": "<task>"` asks the adapter's head for that task;
  the answer (the label) is the message content, from one forward pass.
"""

from __future__ import annotations

import base64
import binascii
import pathlib
import time
import uuid
from collections.abc import Mapping
from typing import Any

from serve.engine.requests import GenerationRequest, RequestError, Result, SamplingParams

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
DEFAULT_MAX_TOKENS = 16


def _field(body: Mapping, name: str, kinds, default=None):
    """body[name] checked against `kinds` (booleans are not numbers); `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    kinds = _tuple(kinds)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise RequestError(f"'{name}' must be {_kind_names(kinds)}, got {type(value).__name__}")
    return value


def _tuple(kinds) -> tuple:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _kind_names(kinds) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object",
             bool: "a boolean"}
    return " or ".join(names.get(k, k.__name__) for k in _tuple(kinds))


def sampling_params(body: Mapping) -> SamplingParams:
    max_tokens = _field(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", int, DEFAULT_MAX_TOKENS)
    stop = _field(body, "stop", (str, list), ())
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) for s in stop):
        raise RequestError("'stop' must be a string or a list of strings")
    stop_ids = _field(body, "stop_token_ids", list, [])
    if not all(isinstance(t, int) for t in stop_ids):
        raise RequestError("'stop_token_ids' must be a list of integers")
    params = SamplingParams(
        temperature=float(_field(body, "temperature", (int, float), 1.0)),
        top_k=max(0, _field(body, "top_k", int, 0)),  # vLLM's -1, like 0, disables it
        top_p=float(_field(body, "top_p", (int, float), 1.0)), seed=_field(body, "seed", int),
        max_tokens=max_tokens, stop_token_ids=tuple(stop_ids), stop=stop,
        ignore_eos=bool(_field(body, "ignore_eos", bool, False)))
    params.check()
    return params


def _image(url: str, allow_local_paths: bool) -> bytes | str:
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if ";base64" not in header:
            raise RequestError("image data URLs must be base64 encoded (data:image/png;base64,...)")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as err:
            raise RequestError(f"the image data URL is not valid base64: {err}") from err
    if url.startswith(("http://", "https://")):
        raise RequestError("image URLs over http(s) are not fetched: send the image as a data: URL")
    if not allow_local_paths:
        raise RequestError("local image paths are not allowed here: send the image as a data: URL")
    path = pathlib.Path(url.removeprefix("file://"))
    if not path.is_file():
        raise RequestError(f"image file {path} does not exist")
    return str(path)


def chat_request(body: Mapping, *, base_model: str, allow_local_paths: bool = False) -> GenerationRequest:
    """A GenerationRequest from a chat completions body; RequestError (400) for a malformed one."""
    messages = _field(body, "messages", list)
    if not messages:
        raise RequestError("'messages' must be a non-empty list")
    rendered, images = [], []
    for message in messages:
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise RequestError("each message must be an object with a 'role'")
        content = message.get("content")
        if isinstance(content, str) or content is None:
            rendered.append({"role": message["role"], "content": content or ""})
            continue
        if not isinstance(content, list):
            raise RequestError("message content must be a string or a list of parts")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url" and isinstance(part.get("image_url"), Mapping | str):
                url = part["image_url"] if isinstance(part["image_url"], str) else part["image_url"].get("url")
                if not isinstance(url, str):
                    raise RequestError("an image_url part needs image_url.url")
                images.append(_image(url, allow_local_paths))
                parts.append({"type": "image"})
            else:
                raise RequestError(f"unsupported message part {kind!r}: use 'text' or 'image_url'")
        rendered.append({"role": message["role"], "content": parts})
    return GenerationRequest(adapter=adapter_of(body, base_model), messages=rendered, images=images,
                             sampling=sampling_params(body), classify=_field(body, "classify", str))


def completion_request(body: Mapping, *, base_model: str) -> GenerationRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    request = GenerationRequest(adapter=adapter_of(body, base_model), sampling=sampling_params(body),
                                classify=_field(body, "classify", str))
    if isinstance(prompt, str):
        request.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        request.prompt_ids = prompt
    else:
        raise RequestError("'prompt' must be a string, a list of one string, or a list of token ids")
    return request


def adapter_of(body: Mapping, base_model: str) -> str | None:
    """The adapter a body's `model` names; None for the base model."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' must name the base model or an adapter")
    return None if model == base_model else model


def copies(body: Mapping) -> int:
    n = _field(body, "n", int, 1)
    if not 1 <= n <= 16:
        raise RequestError(f"'n' must be in [1, 16], got {n}")
    return n


# The engine's "cancelled" is vLLM's "abort"; "stop" and "length" are OpenAI's own.
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort"}

LogprobEntries = list[tuple[str, float]]


def logprobs_body(kind: str, entries: LogprobEntries, offset: int = 0) -> dict[str, Any]:
    """OpenAI's `logprobs` object of one choice from its (token text, log-probability) pairs: the sampled
    tokens only (no alternatives). `offset`: where the first token starts in the choice's text."""
    if kind == CHAT:
        return {"content": [{"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []}
                            for token, logprob in entries]}
    offsets = []
    for token, _ in entries:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": [token for token, _ in entries], "token_logprobs": [logprob for _, logprob in entries],
            "top_logprobs": None, "text_offset": offsets}


def usage(results: list[Result]) -> dict[str, int]:
    """Token counts of one request's choices: the prompt once, every choice's output."""
    prompt = results[0].prompt_tokens if results else 0
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response_body(kind: str, results: list[Result], model: str, *, request_id: str | None = None,
                  logprobs: list[LogprobEntries] | None = None) -> dict[str, Any]:
    """The chat.completion / text_completion object for `results` (one per choice), with each choice's
    `logprobs` object when `logprobs` gives its entries."""
    choices = []
    for index, result in enumerate(results):
        choice = {"index": index, "finish_reason": FINISH_REASONS.get(result.finish_reason, result.finish_reason),
                  "logprobs": None if logprobs is None else logprobs_body(kind, logprobs[index])}
        if kind == CHAT:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        choices.append(choice)
    return {
        "id": request_id or new_id(kind), "object": "chat.completion" if kind == CHAT else "text_completion",
        "created": int(time.time()), "model": model, "choices": choices, "usage": usage(results),
    }


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == CHAT else 'cmpl'}-{uuid.uuid4().hex}"


def error_body(message: str, status: int, *, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    """OpenAI's error object; `code` defaults to the status."""
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            429: "rate_limit_error", 503: "service_unavailable_error"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status if code is None else code}}
