"""The JSON shapes of answers: chat completions and text completions, whole and as stream chunks.

Both formats build the same things from the same inputs (a choice's text, its tokens' logprobs, its
finish reason), so the endpoint logic in `serve.http.app` is written once for both.
"""

from __future__ import annotations

import time

LogprobEntries = list[tuple[str, float | None]]

# The engine's "cancelled" is vLLM's "abort"; stop and length are OpenAI's own.
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort"}


class ChatFormat:
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    @staticmethod
    def logprobs(entries: LogprobEntries | None) -> dict | None:
        if entries is None:
            return None
        return {"content": [{"token": token, "logprob": logprob, "bytes": list(token.encode()),
                             "top_logprobs": []} for token, logprob in entries]}

    def choice(self, index: int, text: str, entries: LogprobEntries | None, finish_reason: str) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": self.logprobs(entries), "finish_reason": finish_reason}

    def opening(self, index: int) -> dict | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def delta(self, index: int, text: str, entries: LogprobEntries | None, finish_reason: str | None,
              offset: int = 0) -> dict:
        return {"index": index, "delta": {"content": text} if text or finish_reason is None else {},
                "logprobs": self.logprobs(entries), "finish_reason": finish_reason}


class CompletionFormat:
    object = "text_completion"
    chunk_object = "text_completion"

    @staticmethod
    def logprobs(entries: LogprobEntries | None, offset: int = 0) -> dict | None:
        if entries is None:
            return None
        offsets, position = [], offset
        for token, _ in entries:
            offsets.append(position)
            position += len(token)
        return {"tokens": [token for token, _ in entries], "token_logprobs": [lp for _, lp in entries],
                "top_logprobs": None, "text_offset": offsets}

    def choice(self, index: int, text: str, entries: LogprobEntries | None, finish_reason: str) -> dict:
        return {"index": index, "text": text, "logprobs": self.logprobs(entries), "finish_reason": finish_reason}

    def opening(self, index: int) -> dict | None:
        return None

    def delta(self, index: int, text: str, entries: LogprobEntries | None, finish_reason: str | None,
              offset: int = 0) -> dict:
        return {"index": index, "text": text, "logprobs": self.logprobs(entries, offset),
                "finish_reason": finish_reason}


def envelope(fmt, request_id: str, model: str, created: int, *, chunk: bool, choices: list[dict],
             usage: dict | None = None, include_usage: bool = False) -> dict:
    body = {"id": request_id, "object": fmt.chunk_object if chunk else fmt.object, "created": created,
            "model": model, "choices": choices}
    if not chunk or include_usage:
        body["usage"] = usage
    return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def now() -> int:
    return int(time.time())
