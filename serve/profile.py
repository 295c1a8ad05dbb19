"""`python -m serve.profile`: measure the engine's cost profile on the current device and write it.

    python -m serve.profile --model tiny --out configs/profiles/cpu-tiny.json

The engine (`serve.engine.Engine`, the same one `serve.bench_engine` drives) replays mixed-adapter
workloads in real time under every policy at a few request rates, after a warm-up that compiles its
programs. With `Engine.step_timings` on, each step records the time of each weight switch, of the
prefill of the admitted requests and of the decode step, with their `StepFeatures` (tokens, LoRA
terms per mode, distinct adapters, attended context, images, merged or not); `serve.cost_profile.fit_profile` fits
the linear cost model to them and the result is written as a profile file the simulator reads
(`python -m serve.simulate --profile ...`). The runs cover every mode and a spread of batch sizes
because the policies and rates differ.

What the engine's steps cost, and how the linear model sees it: the engine prefills each admitted
request alone (its prompt bucketed to a power of two), so a request's fixed cost is spread over
`per_token_s` and `per_image_s` (with one image per request the fit cannot tell them apart); decode runs
every slot in one call of a fixed shape, so its device time barely depends on the running rows, and
per-row host work (sampling results, detokenising) lands on `per_token_s`; the merged / mixture
program's extra cost over the unmerged one lands on `per_merged_s`. Each measured run in which the
engine traced a new program runs again (`timed_replay`). The fit's residuals are printed (median and
90th percentile of |predicted - measured| / measured per part): on a shared CPU they are large, since
single steps vary with the machine's load; the fit is of the mean.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import tempfile
from collections.abc import Iterator

import jax
import numpy as np

from serve.bench_adapters import save_random_adapters
from serve.bench_engine import add_live_args, build, progress, replay, requests_of, serving_engine, warm_up, workload
from serve.cost_profile import CostProfile, StepTiming, fit_profile, save_profile
from serve.engine.engine import Engine
from serve.summary import RequestResult


def device_name() -> str:
    """The device the engine runs on, as profiles and benchmarks name it (a CPU with its core count)."""
    device = jax.devices()[0]
    return f"CPU ({os.cpu_count()} cores)" if device.platform == "cpu" else device.device_kind


RETRIES = 2


@contextlib.contextmanager
def running_engine(args, warm) -> Iterator[Engine]:
    """A started engine for `args` (the live benchmarks' flags) with `args.adapters` random adapters named as the
    workloads name them ("adapter-0", ...), warmed up on the workload `warm` (RequestSpecs); shut down on exit."""
    model, processor = build(args)
    warm = requests_of(warm, model.config, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        saved = save_random_adapters(model, args.adapters, args.rank, args.seed, pathlib.Path(tmp))
        paths = {f"adapter-{i}": path for i, path in enumerate(saved)}
        engine = serving_engine(model, processor, paths, args, max_waiting=100_000)
        with engine:
            warm_up(engine, warm, args.slots)
            yield engine


def timed_replay(engine: Engine, requests, policy: str) -> tuple[list[RequestResult], list[StepTiming]]:
    """`replay` with step timings on: each request's timestamps and each step's record. A run during which the
    engine's jitted functions met a new signature (a shape or argument kind the warm-up missed: a trace, maybe a
    compilation) runs again, up to `RETRIES` times, so that the timings are of steady-state steps."""
    for attempt in range(1 + RETRIES):
        programs, engine.step_timings = engine.compiled_programs(), []
        results, _ = replay(engine, requests, policy)
        timings, engine.step_timings = engine.step_timings, None
        if engine.compiled_programs() == programs:
            break
        progress(f"the engine traced new programs during the {policy} run"
                 + (": running it again" if attempt < RETRIES else "; keeping its timings"))
    return results, timings


def measure(engine: Engine, runs) -> list[StepTiming]:
    """Replay each (policy, requests) run with step timings on; every step's record."""
    timings: list[StepTiming] = []
    for policy, requests in runs:
        progress(f"measuring: {policy}, {len(requests)} requests")
        timings += timed_replay(engine, requests, policy)[1]
    return timings


def residuals(profile: CostProfile, timings) -> dict:
    """Median and 90th percentile of the relative error of the profile's prediction, per part."""
    parts = {"prefill": [(profile.prefill.seconds(t.prefill), t.prefill_s) for t in timings if t.prefill],
             "decode": [(profile.decode.seconds(t.decode), t.decode_s) for t in timings if t.decode],
             "switch": [(profile.op_s(op), s) for t in timings for op, s in t.switch]}
    out = {}
    for part, pairs in parts.items():
        error = np.array([abs(p - m) / m for p, m in pairs if m > 0])
        out[part] = {"samples": len(pairs), "median_rel_error": float(np.median(error)) if error.size else None,
                     "p90_rel_error": float(np.percentile(error, 90)) if error.size else None}
    return out


def profile_engine(engine: Engine, args, rates, *, name: str, note: str = "") -> tuple[CostProfile, dict]:
    """Measure and fit: every policy in `args.policies` at every rate in `rates` on workloads of seed
    `args.seed` + 1 + i (not the seed the benchmarks replay). The profile and its fit residuals."""
    cfg = engine.config
    runs = []
    for i, rate in enumerate(rates):
        requests = requests_of(workload(args, rate, args.seed + 1 + i), cfg, args.seed + 1 + i)
        runs += [(policy, requests) for policy in args.policies]
    load = os.getloadavg()[0]
    timings = measure(engine, runs)
    profile = fit_profile(timings, name=name, image_tokens=cfg.image_seq_length, device=device_name(),
                          note=note or f"measured by serve.profile on {args.preset} {args.dtype}: "
                                       f"{len(timings)} engine steps, policies {', '.join(args.policies)}, rates "
                                       f"{', '.join(map(str, rates))}/s, {args.slots} slots, {args.adapters} "
                                       f"adapters of rank {args.rank}; 1-minute load average "
                                       f"{load:.1f} before and {os.getloadavg()[0]:.1f} after on "
                                       f"{os.cpu_count()} cores")
    return profile, residuals(profile, timings)


def main(argv=None) -> CostProfile:
    p = argparse.ArgumentParser(prog="python -m serve.profile", description=__doc__.split("\n\n")[0])
    add_live_args(p, duration=5.0, adapters=16, max_loras=16)
    p.add_argument("--rates", type=float, nargs="+", default=[4.0, 12.0], help="requests/s of the measured runs")
    p.add_argument("--name", help="the profile's name (default: the output file's stem)")
    p.add_argument("--note", default="", help="the profile's note (default: how it was measured)")
    p.add_argument("--out", type=pathlib.Path, required=True, help="the profile JSON to write")
    args = p.parse_args(argv)
    with running_engine(args, workload(args, max(args.rates), args.seed + 1)) as engine:
        profile, fit = profile_engine(engine, args, args.rates, name=args.name or args.out.stem, note=args.note)
    save_profile(profile, args.out)
    for part, r in fit.items():
        print(f"{part}: {r['samples']} samples, |error| median {r['median_rel_error']:.1%}, "
              f"p90 {r['p90_rel_error']:.1%}", file=sys.stderr)
    print(f"wrote {args.out}")
    return profile


if __name__ == "__main__":
    main()
