"""Streamed answers: the chunks of server-sent events for chat and text completions (the whole answer is
`serve.protocol.response_body`, shared with `serve.batch`)."""

from __future__ import annotations

import json

from serve import protocol


def opening(kind: str, index: int) -> dict | None:
    """A chat stream opens each choice with the assistant's role; a text completion stream does not."""
    if kind != protocol.CHAT:
        return None
    return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


def delta(kind: str, index: int, text: str, entries: protocol.LogprobEntries | None, finish_reason: str | None,
          offset: int = 0) -> dict:
    """One choice's piece of a chunk: new text (with its tokens' logprobs when asked), or its finish reason."""
    logprobs = None if entries is None else protocol.logprobs_body(kind, entries, offset)
    reason = None if finish_reason is None else protocol.FINISH_REASONS.get(finish_reason, finish_reason)
    if kind == protocol.CHAT:
        return {"index": index, "delta": {"content": text} if text or reason is None else {}, "logprobs": logprobs,
                "finish_reason": reason}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}


def event(kind: str, request_id: str, model: str, created: int, choices: list[dict], *, include_usage: bool,
          usage: dict | None = None) -> str:
    """A `data: {...}` event of one chunk; with `include_usage` every chunk has `usage` (null until the last)."""
    body = {"id": request_id, "object": "chat.completion.chunk" if kind == protocol.CHAT else "text_completion",
            "created": created, "model": model, "choices": choices}
    if include_usage:
        body["usage"] = usage
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
