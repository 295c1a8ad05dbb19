"""Serving metrics of a run, computed the same way for the live engine and the simulator from each
request's timestamps.

- Average token latency (VaLoRA's metric): mean request latency (arrival to last token) divided by
  the mean request length, prompt (image tokens included) plus output tokens.
- Time to first token (arrival to first output token): mean, p50, p99.
- Per-output-token latency (after the first): (last - first token time) / (output tokens - 1),
  over requests with at least two output tokens: mean, p50, p99.
- Throughput: finished requests and output tokens per second of the run (first arrival to last
  finish).
- SLO attainment: the share of requests whose first token came within `slo_ttft` seconds (S-LoRA's
  definition; 6 s there).
- Switches: weight changes, each merge or unmerge counted once (a switch from one merged adapter to
  another is two); passed in by the caller, which counts them.
Percentiles are numpy's linear interpolation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class RequestResult:
    id: str
    adapter: str | None
    arrival: float
    first_token: float
    finish: float
    prompt_tokens: int
    output_tokens: int
    replica: int = 0

    @property
    def latency(self) -> float:
        return self.finish - self.arrival

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival


def summarize(results: Sequence[RequestResult], *, slo_ttft: float = 6.0, switches: int = 0) -> dict:
    """The metrics above as a flat dict (seconds, requests/s, tokens/s, shares in [0, 1])."""
    if not results:
        raise ValueError("no finished requests to summarize")
    latency = np.array([r.latency for r in results])
    ttft = np.array([r.ttft for r in results])
    length = np.array([r.prompt_tokens + r.output_tokens for r in results])
    out = np.array([r.output_tokens for r in results])
    multi = out > 1
    tpot = np.array([(r.finish - r.first_token) / (r.output_tokens - 1) for r in results if r.output_tokens > 1])
    span = max(r.finish for r in results) - min(r.arrival for r in results)
    return {
        "requests": len(results),
        "duration_s": span,
        "avg_token_latency_s": float(latency.mean() / length.mean()),
        "avg_latency_s": float(latency.mean()),
        "ttft_mean_s": float(ttft.mean()),
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "tpot_mean_s": float(tpot.mean()) if multi.any() else float("nan"),
        "tpot_p50_s": float(np.percentile(tpot, 50)) if multi.any() else float("nan"),
        "tpot_p99_s": float(np.percentile(tpot, 99)) if multi.any() else float("nan"),
        "throughput_rps": len(results) / span if span > 0 else float("inf"),
        "output_tokens_per_s": float(out.sum()) / span if span > 0 else float("inf"),
        "slo_attainment": float((ttft <= slo_ttft).mean()),
        "switches": switches,
    }


COLUMNS = (("policy", "policy", "{}"), ("avg_token_latency_s", "avg token latency (ms)", "{:.2f}", 1e3),
           ("avg_latency_s", "avg latency (s)", "{:.2f}"), ("ttft_p50_s", "TTFT p50 (s)", "{:.3f}"),
           ("ttft_p99_s", "TTFT p99 (s)", "{:.3f}"), ("tpot_mean_s", "per-token (ms)", "{:.2f}", 1e3),
           ("throughput_rps", "req/s", "{:.2f}"), ("output_tokens_per_s", "out tok/s", "{:.1f}"),
           ("slo_attainment", "SLO", "{:.1%}"), ("switches", "switches", "{}"))


def markdown_table(rows: Sequence[dict], lead: Sequence[tuple] = ()) -> str:
    """A Markdown table of summaries (each with a "policy" key added), one row per summary; `lead` puts
    more columns (key, header, format) before the policy's."""
    columns = (*lead, *COLUMNS)
    header = "| " + " | ".join(c[1] for c in columns) + " |"
    lines = [header, "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _, fmt, *scale in columns:
            value = row[key]
            cells.append(fmt.format(value * scale[0] if scale else value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
