"""Serving workloads: who asks for which adapter, when, with how many tokens and images.

    spec = WorkloadSpec(arrival="poisson", rate=4, duration=600, adapters=16, skew=0.8, seed=0)
    requests = generate(spec)              # list[RequestSpec], sorted by arrival
    write_jsonl(requests, "w.jsonl"); assert read_jsonl("w.jsonl") == requests

Arrivals (`arrival`):
- "poisson": exponential gaps at `rate` requests/s over `duration` seconds.
- "gamma": Gamma gaps with mean 1/`rate` and coefficient of variation `cv` (shape 1/cv^2, scale
  cv^2/rate), as S-LoRA's `benchmarks/trace.py`; cv = 1 is Poisson, cv > 1 burstier.
- "trace": replayed from a CSV in the Azure LLM inference trace format (`read_azure_trace`):
  arrivals are the timestamps minus the first one; when `rate` is given the times are scaled so
  the trace's mean rate becomes `rate` (VaLoRA's published runs replay the Azure trace at 2-16
  requests/s); requests after `duration` seconds (when given) are dropped. Prompt and output
  lengths come from the trace's ContextTokens and GeneratedTokens.

Adapters (`popularity`): `adapters` names "adapter-0" .. "adapter-{N-1}".
- "skewed" (VaLoRA's definition): a share `skew` of the requests goes to the hot adapter
  "adapter-0", the rest uniformly to the other N-1 (each request drawn independently; the released
  code assigns the first skew * n requests of the trace to the hot one instead, which puts all hot
  traffic at the start). With N = 1 every request goes to it.
- "power" (S-LoRA's): adapter floor(N * x) with x drawn from a power distribution with exponent
  `power_alpha` (P(x <= u) = u^alpha), so low indices are the popular ones for alpha < 1.
- `base_share`: a share of requests for the base model (adapter None), drawn before the adapter.
- Ranks: each adapter's rank is drawn once from `ranks` (uniformly); every request carries its
  adapter's rank (None for the base model).

Lengths: prompts uniform in [`prompt_min`, `prompt_max`] text tokens and outputs uniform in
[`output_min`, `output_max`], unless the trace gives them; outputs are capped at `output_cap`
(120, as published), prompts at `prompt_cap` when set. Images per request are drawn uniformly from
`images` (e.g. (1,) for one image each, (0, 1, 2) for a mix).

Every draw comes from one `numpy.random.default_rng(seed)`, in a fixed order, so a spec and a seed
give the same requests on every machine.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import pathlib
import re
from collections.abc import Sequence

import numpy as np

TRACE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_TIMESTAMP = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2}:\d{2})(?:\.(\d+))?\s*(Z|[+-]\d{2}:?\d{2})?$")


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    """One request of a workload: arrival in seconds from the start, adapter (None: base model) and
    its rank, text prompt tokens, images, and the output tokens it generates (the engine's
    max_new_tokens)."""
    id: str
    arrival: float
    adapter: str | None
    prompt_tokens: int
    output_tokens: int
    images: int = 0
    rank: int | None = None


@dataclasses.dataclass(frozen=True)
class TraceRow:
    time: float
    context_tokens: int
    generated_tokens: int


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    arrival: str = "poisson"
    rate: float | None = 4.0
    duration: float | None = 600.0
    cv: float = 1.0
    trace: str | None = None
    adapters: int = 16
    popularity: str = "skewed"
    skew: float = 0.8
    power_alpha: float = 0.3
    base_share: float = 0.0
    ranks: tuple[int, ...] = (8, 16, 32, 64)
    images: tuple[int, ...] = (1,)
    prompt_min: int = 8
    prompt_max: int = 512
    output_min: int = 8
    output_max: int = 512
    output_cap: int = 120
    prompt_cap: int | None = None
    seed: int = 0


def parse_timestamp(text: str) -> float:
    """Seconds since the epoch of a trace timestamp such as "2023-11-16 18:15:46.6805900" (any number
    of fractional digits, optional "Z" or "+hh:mm"; no zone is read as UTC)."""
    match = _TIMESTAMP.match(text.strip())
    if match is None:
        raise ValueError(f"not a timestamp: {text!r} (expected e.g. '2023-11-16 18:15:46.6805900')")
    date, clock, fraction, zone = match.groups()
    zone = "+00:00" if zone in (None, "Z") else zone
    whole = datetime.datetime.fromisoformat(f"{date}T{clock}{zone}")
    return whole.timestamp() + (float(f"0.{fraction}") if fraction else 0.0)


def read_azure_trace(path: str | pathlib.Path) -> list[TraceRow]:
    """Rows of an Azure LLM inference trace CSV (header `TIMESTAMP,ContextTokens,GeneratedTokens`),
    sorted by time, with times in seconds from the first row."""
    path = pathlib.Path(path)
    rows = []
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in TRACE_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: not an Azure LLM inference trace: missing column(s) {', '.join(missing)} "
                             f"(header {header}; expected {','.join(TRACE_COLUMNS)})")
        cols = [header.index(c) for c in TRACE_COLUMNS]
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                stamp, context, generated = (row[c] for c in cols)
                rows.append(TraceRow(parse_timestamp(stamp), int(context), int(generated)))
            except (IndexError, ValueError) as e:
                raise ValueError(f"{path}:{line}: bad trace row {row}: {e}") from None
            if rows[-1].context_tokens < 0 or rows[-1].generated_tokens < 0:
                raise ValueError(f"{path}:{line}: negative token count in {row}")
    if not rows:
        raise ValueError(f"{path}: the trace has no rows")
    rows.sort(key=lambda r: r.time)
    start = rows[0].time
    return [dataclasses.replace(r, time=r.time - start) for r in rows]


def _arrivals(spec: WorkloadSpec, rng: np.random.Generator) -> tuple[np.ndarray, list[TraceRow] | None]:
    if spec.arrival == "trace":
        if spec.trace is None:
            raise ValueError("arrival='trace' needs a trace file (WorkloadSpec.trace)")
        rows = read_azure_trace(spec.trace)
        times = np.array([r.time for r in rows])
        if spec.rate is not None and len(rows) > 1 and times[-1] > 0:
            times = times * ((len(rows) - 1) / times[-1] / spec.rate)
        keep = len(rows) if spec.duration is None else int(np.searchsorted(times, spec.duration, side="right"))
        return times[:keep], rows[:keep]
    if spec.arrival not in ("poisson", "gamma"):
        raise ValueError(f"unknown arrival process {spec.arrival!r}; choose poisson, gamma or trace")
    if spec.rate is None or spec.rate <= 0 or spec.duration is None or spec.duration <= 0:
        raise ValueError(f"{spec.arrival} arrivals need rate > 0 and duration > 0, got {spec.rate}, {spec.duration}")
    cv = 1.0 if spec.arrival == "poisson" else spec.cv
    if cv <= 0:
        raise ValueError(f"cv must be > 0, got {cv}")
    # Draw gaps in chunks until the duration is covered: the count is random.
    gaps = []
    total = 0.0
    chunk = max(16, int(spec.rate * spec.duration * 1.2))
    while total <= spec.duration:
        if spec.arrival == "poisson":
            g = rng.exponential(1.0 / spec.rate, chunk)
        else:
            g = rng.gamma(1.0 / cv ** 2, cv ** 2 / spec.rate, chunk)
        gaps.append(g)
        total += g.sum()
    times = np.cumsum(np.concatenate(gaps))
    return times[times <= spec.duration], None


def adapter_probabilities(spec: WorkloadSpec) -> np.ndarray:
    """Probability of each adapter index under the spec's popularity."""
    n = spec.adapters
    if n < 1:
        raise ValueError(f"adapters must be >= 1, got {n}")
    if spec.popularity == "skewed":
        if not 0 <= spec.skew <= 1:
            raise ValueError(f"skew must be in [0, 1], got {spec.skew}")
        if n == 1:
            return np.ones(1)
        return np.array([spec.skew] + [(1 - spec.skew) / (n - 1)] * (n - 1))
    if spec.popularity == "power":
        if spec.power_alpha <= 0:
            raise ValueError(f"power_alpha must be > 0, got {spec.power_alpha}")
        edges = (np.arange(n + 1) / n) ** spec.power_alpha
        return np.diff(edges)
    raise ValueError(f"unknown popularity {spec.popularity!r}; choose skewed or power")


def generate(spec: WorkloadSpec) -> list[RequestSpec]:
    """The requests of `spec`, sorted by arrival (see the module docstring)."""
    if not spec.ranks or not spec.images:
        raise ValueError("ranks and images need at least one value each")
    if not 0 <= spec.base_share <= 1:
        raise ValueError(f"base_share must be in [0, 1], got {spec.base_share}")
    rng = np.random.default_rng(spec.seed)
    times, rows = _arrivals(spec, rng)
    n = len(times)
    probs = adapter_probabilities(spec)
    ranks = rng.choice(np.asarray(spec.ranks), size=spec.adapters)
    base = rng.random(n) < spec.base_share
    which = rng.choice(spec.adapters, size=n, p=probs)
    images = rng.choice(np.asarray(spec.images), size=n)
    if rows is None:
        if not 1 <= spec.prompt_min <= spec.prompt_max or not 1 <= spec.output_min <= spec.output_max:
            raise ValueError("lengths need 1 <= prompt_min <= prompt_max and 1 <= output_min <= output_max")
        prompts = rng.integers(spec.prompt_min, spec.prompt_max, size=n, endpoint=True)
        outputs = rng.integers(spec.output_min, spec.output_max, size=n, endpoint=True)
    else:
        prompts = np.array([max(1, r.context_tokens) for r in rows], dtype=np.int64)
        outputs = np.array([max(1, r.generated_tokens) for r in rows], dtype=np.int64)
    outputs = np.minimum(outputs, spec.output_cap)
    if spec.prompt_cap is not None:
        prompts = np.minimum(prompts, spec.prompt_cap)
    return [RequestSpec(id=f"req-{i}", arrival=float(times[i]),
                        adapter=None if base[i] else f"adapter-{which[i]}",
                        prompt_tokens=int(prompts[i]), output_tokens=int(outputs[i]), images=int(images[i]),
                        rank=None if base[i] else int(ranks[which[i]]))
            for i in range(n)]


def write_jsonl(requests: Sequence[RequestSpec], path: str | pathlib.Path) -> None:
    with pathlib.Path(path).open("w") as f:
        for r in requests:
            f.write(json.dumps(dataclasses.asdict(r)) + "\n")


def read_jsonl(path: str | pathlib.Path) -> list[RequestSpec]:
    fields = {f.name for f in dataclasses.fields(RequestSpec)}
    requests = []
    with pathlib.Path(path).open() as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                unknown = set(row) - fields
                if unknown:
                    raise ValueError(f"unknown field(s) {sorted(unknown)}")
                requests.append(RequestSpec(**row))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: not a request spec: {e}") from None
    return requests
