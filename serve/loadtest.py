"""`python -m serve.loadtest`: a bounded load test of a running `python -m serve` on this machine.

    python -m serve.loadtest --url http://127.0.0.1:8000 --requests 200 --concurrency 32

Sends streaming chat completions (an image and a short prompt each, round-robin over the served models)
from `--concurrency` clients until `--requests` have been sent or `--time-limit` seconds have passed, and
prints requests/s, output tokens/s, time to first token, per-token latency and end-to-end latency
percentiles, and the errors by status, as a Markdown table (and JSON with `--out`). It talks to loopback
addresses only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import io
import ipaddress
import json
import pathlib
import sys
import time
import urllib.parse
from collections import Counter

import httpx
import numpy as np
from PIL import Image

LOOPBACK_NAMES = ("localhost",)


@dataclasses.dataclass
class Outcome:
    model: str
    status: int
    start: float
    first_token: float | None = None
    end: float | None = None
    completion_tokens: int = 0
    error: str | None = None


def is_loopback(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or ""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def image_data_url(index: int, size: int) -> str:
    rng = np.random.default_rng(index)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_body(index: int, model: str, args: argparse.Namespace, images: list[str]) -> dict:
    content: list[dict] = [{"type": "text", "text": f"Describe the picture in a few words. (request {index})"}]
    if images:
        content.insert(0, {"type": "image_url", "image_url": {"url": images[index % len(images)]}})
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": args.max_tokens,
            "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True}}


async def one_request(http: httpx.AsyncClient, body: dict) -> Outcome:
    outcome = Outcome(body["model"], 0, time.perf_counter())
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            outcome.status = response.status_code
            if response.status_code != 200:
                outcome.error = (await response.aread()).decode(errors="replace")[:200]
                return outcome
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    outcome.error = chunk["error"].get("message", "error")
                elif chunk.get("usage"):
                    outcome.completion_tokens = chunk["usage"]["completion_tokens"]
                elif outcome.first_token is None and any(c["delta"].get("content") for c in chunk["choices"]):
                    outcome.first_token = time.perf_counter()
        outcome.end = time.perf_counter()
    except httpx.HTTPError as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    return outcome


async def run(args: argparse.Namespace) -> tuple[list[Outcome], float]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.request_timeout,
                                 limits=limits) as http:
        models = args.models
        if not models:
            listing = await http.get("/v1/models")
            listing.raise_for_status()
            models = [card["id"] for card in listing.json()["data"]]
        images = [image_data_url(i, args.image_size) for i in range(8)] if args.image_size else []
        bodies = [request_body(i, models[i % len(models)], args, images) for i in range(args.requests)]
        queue: asyncio.Queue = asyncio.Queue()
        for body in bodies:
            queue.put_nowait(body)
        outcomes: list[Outcome] = []
        start = time.perf_counter()
        deadline = start + args.time_limit

        async def client():
            while not queue.empty() and time.perf_counter() < deadline:
                outcomes.append(await one_request(http, queue.get_nowait()))

        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        return outcomes, time.perf_counter() - start


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}


def summarise(outcomes: list[Outcome], wall: float) -> dict:
    ok = [o for o in outcomes if o.status == 200 and o.error is None and o.end is not None]
    ttft = [o.first_token - o.start for o in ok if o.first_token is not None]
    tpot = [(o.end - o.first_token) / (o.completion_tokens - 1) for o in ok
            if o.first_token is not None and o.completion_tokens > 1]
    errors = Counter(str(o.status) if o.status != 200 else (o.error or "incomplete")[:60]
                     for o in outcomes if o not in ok)
    return {"requests": len(outcomes), "succeeded": len(ok), "wall_s": wall,
            "requests_per_s": len(ok) / wall if wall else 0.0,
            "output_tokens_per_s": sum(o.completion_tokens for o in ok) / wall if wall else 0.0,
            "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot),
            "latency_s": percentiles([o.end - o.start for o in ok]), "errors": dict(errors)}


def table(summary: dict) -> str:
    def ms(value):
        return "-" if value is None else f"{1000 * value:.1f}"

    rows = [f"requests: {summary['succeeded']}/{summary['requests']} succeeded in {summary['wall_s']:.1f} s; "
            f"{summary['requests_per_s']:.2f} requests/s, {summary['output_tokens_per_s']:.1f} output tokens/s",
            "", "| ms | p50 | p90 | p99 |", "| --- | --- | --- | --- |"]
    for key, label in (("ttft_s", "time to first token"), ("tpot_s", "per output token"),
                       ("latency_s", "end to end")):
        p = summary[key]
        rows.append(f"| {label} | {ms(p['p50'])} | {ms(p['p90'])} | {ms(p['p99'])} |")
    rows.append("")
    rows.append("errors: " + (", ".join(f"{k}: {v}" for k, v in summary["errors"].items()) or "none"))
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve.loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback addresses only)")
    p.add_argument("--models", nargs="+", help="models to send to, round-robin (default: all of /v1/models)")
    p.add_argument("--requests", type=int, default=100, help="requests to send (1..10000, default 100)")
    p.add_argument("--concurrency", type=int, default=16, help="clients sending at once (1..512, default 16)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--image-size", type=int, default=64, help="side of each request's image in pixels (0: none)")
    p.add_argument("--time-limit", type=float, default=120.0, help="stop sending after this many seconds")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--out", type=pathlib.Path, help="write the summary as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not is_loopback(args.url):
        raise SystemExit(f"--url {args.url}: the load test talks to loopback addresses only (127.0.0.1, ::1, "
                         "localhost)")
    if not (1 <= args.requests <= 10_000 and 1 <= args.concurrency <= 512 and args.time_limit > 0):
        raise SystemExit("--requests must be in 1..10000, --concurrency in 1..512, --time-limit positive")
    summary = summarise(*asyncio.run(run(args)))
    print(table(summary))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))
    return 0 if summary["succeeded"] else 1


if __name__ == "__main__":
    sys.exit(main())
