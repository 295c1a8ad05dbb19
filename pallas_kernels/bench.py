"""Benchmark ATMM against its byte floor, stock JAX, and the base projection it rides on.

    python -m pallas_kernels.bench [--out DIR] [--case NAME ...] [--shape T,RANK,ADAPTERS[,REQUESTS] ...]
                                   [--quick --interpret]

Per anchor shape of BENCHMARKS.md (and prefill packed as whole requests, as serving packs it): the byte
floor from a copy bandwidth measured in the same run, the kernel's time and its multiple of the floor,
the stock-JAX formulations as multiples of the floor, and fused (base + delta) / base; also the time
of a one-kernel call, the floor of any timed call. Every time, every column alike, comes from many
calls inside one jitted loop captured as a CUDA graph (`timing.py`; --no-graphs launches each kernel
from the host instead). Where the delta's tiles sort tokens by slot (GPU), the sort alone is timed too
("sort us"; "-" elsewhere): it is part of the kernel's time, while serving can make it once per batch,
as vLLM makes the sorted metadata its kernels take. Prints a Markdown table
and writes bench.md and bench.json to --out. Rows of the anchor shapes themselves are also compared
with vLLM's kernels, and each of BENCHMARKS.md's targets is printed as met or not.
`--quick --interpret` shrinks every shape so the script runs on CPU; its times there mean nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import jax
from tqdm import tqdm

from pallas_kernels import api, baselines, gpu, timing
from pallas_kernels.tiles import tiles_for
from pallas_kernels.workload import Workload, operation

ANCHORS = {  # name: (tokens, rank, adapters); d_in = d_out = 4096, pool of 64
    "decode-few": (32, 16, 4),
    "decode-many": (32, 16, 32),
    "decode-large": (256, 16, 32),
    "decode-large-r64": (256, 64, 32),
    "prefill": (4096, 64, 4),
}
QUICK = {"decode-few": (8, 8, 2), "decode-many": (8, 8, 8), "decode-large": (32, 8, 8),
         "decode-large-r64": (32, 16, 8), "prefill": (64, 16, 2)}
# Not anchors (no vLLM figure, no target): an anchor with its tokens packed as contiguous requests, each
# of one adapter, where the anchors draw every token's adapter on its own (`Workload.requests`).
PACKED = {"prefill-8-requests": ("prefill", 8)}  # name: (anchor, requests)
COLUMNS = ["case", "T", "rank", "distinct", "floor us", "kernel us", "kernel / floor",
           *(f"{name} / floor" for name in baselines.FORMULATIONS), "base us", "fused us", "fused / base"]
# vLLM 0.33's Triton LoRA kernels (lora_shrink + lora_expand) at the anchor shapes on an H100, us, by
# CUDA-graph replay (BENCHMARKS.md); a row is compared with them only where it is that very shape.
VLLM_US = {"decode-few": 8.6, "decode-many": 14.8, "decode-large": 23.6, "decode-large-r64": 35.6, "prefill": 297.0}
TABLE_COLUMNS = [*COLUMNS, "sort us", "vLLM / kernel"]
# BENCHMARKS.md's targets for this project's kernels, by anchor.
FLOOR_MULTIPLE = {"decode-large": 1.5, "decode-large-r64": 1.5, "prefill": 1.5}  # kernel / floor at most
LAUNCH_BOUND_US = {"decode-few": 3.0, "decode-many": 3.0}  # kernel us at most (floors under 2 us)
VLLM_SPEEDUP = dict.fromkeys(ANCHORS, 1.5)  # vLLM / kernel at least
FUSED_OVER_BASE = {"decode-few": 1.10, "prefill": 1.05}  # fused / base at most


def _workloads(args) -> dict[str, Workload]:
    hidden, pool = (128, 8) if args.quick else (4096, 64)
    shapes = QUICK if args.quick else ANCHORS
    found = {name: Workload(t, hidden, hidden, r, a, pool=pool) for name, (t, r, a) in shapes.items()}
    found |= {name: dataclasses.replace(found[anchor], requests=requests)
              for name, (anchor, requests) in PACKED.items()}
    for spec in args.shape:
        try:
            workload = Workload.parse(spec, hidden, pool)
        except ValueError as error:
            raise SystemExit(f"--shape: {error}") from None
        packed = "" if workload.requests is None else f"-{workload.requests}requests"
        found[f"T{workload.tokens}-r{workload.rank}-a{workload.adapters}{packed}"] = workload
    unknown = set(args.case) - set(found)
    if unknown:
        raise SystemExit(f"--case: no case {sorted(unknown)}; the cases are {list(found)}")
    return {name: workload for name, workload in found.items() if not args.case or name in args.case}


def _measure(name: str, workload: Workload, bandwidth: float, args) -> dict:
    copies = timing.copies_past_cache(workload.copy_bytes(), max_copies=1 if args.quick else 8)
    data = [workload.arrays(seed) for seed in range(copies)]
    time = lambda fn, keys: 1e6 * timing.seconds_per_call(  # noqa: E731
        fn, [tuple(d[k] for k in keys) for d in data], calls=args.calls, repeats=args.repeats,
        per_iteration=args.per_iteration)
    distinct = workload.distinct_adapters(data[0])
    floor_us = 1e6 * workload.floor_bytes(distinct) / bandwidth
    kernel_us = time(*operation(False, args.backend, interpret=args.interpret))
    row = {"case": name, "T": workload.tokens, "rank": workload.rank, "distinct": distinct,
           "floor us": floor_us, "kernel us": kernel_us, "kernel / floor": kernel_us / floor_us}
    backend = api.resolve_backend(args.backend)
    sorts = backend == "pallas_gpu" and tiles_for(workload.key(), backend).sort
    row["sort us"] = time(lambda s: gpu.slot_order(s, workload.pool, args.interpret), ("slot_ids",)) if sorts else None
    for label, formulation in baselines.FORMULATIONS.items():
        stock_us = time(formulation, ("x", "a_pool", "b_pool", "slot_ids", "scales"))
        row[f"{label} / floor"] = stock_us / floor_us
    row["base us"] = time(lambda x, w: x @ w, ("x", "w"))
    row["fused us"] = time(*operation(True, args.backend, interpret=args.interpret))
    row["fused / base"] = row["fused us"] / row["base us"]
    vllm = vllm_us(name, workload)
    row["vLLM / kernel"] = None if vllm is None else vllm / kernel_us
    return row


def vllm_us(name: str, workload: Workload) -> float | None:
    """vLLM's time for this case, or None unless it is the anchor shape of that name (d 4096, pool 64)."""
    anchor = name in ANCHORS and (workload.tokens, workload.rank, workload.adapters) == ANCHORS[name] and (
        workload.d_in, workload.d_out, workload.pool) == (4096, 4096, 64)
    return VLLM_US[name] if anchor else None


def targets(rows: list[dict]) -> list[dict]:
    """Each BENCHMARKS.md target that the anchor rows (those with a vLLM figure) bear on: what it
    asks, the measured value, and whether it is met."""
    found = []

    def check(case, target, value, met):
        found.append({"case": case, "target": target, "value": value, "met": bool(met)})

    for row in rows:
        case = row["case"]
        if row.get("vLLM / kernel") is None:
            continue
        if case in FLOOR_MULTIPLE:
            check(case, f"kernel / floor <= {FLOOR_MULTIPLE[case]}", row["kernel / floor"],
                  row["kernel / floor"] <= FLOOR_MULTIPLE[case])
        if case in LAUNCH_BOUND_US:
            check(case, f"kernel us <= {LAUNCH_BOUND_US[case]}", row["kernel us"],
                  row["kernel us"] <= LAUNCH_BOUND_US[case])
        check(case, f"vLLM / kernel >= {VLLM_SPEEDUP[case]}", row["vLLM / kernel"],
              row["vLLM / kernel"] >= VLLM_SPEEDUP[case])
        if case in FUSED_OVER_BASE:
            check(case, f"fused / base <= {FUSED_OVER_BASE[case]}", row["fused / base"],
                  row["fused / base"] <= FUSED_OVER_BASE[case])
    return found


def markdown(rows: list[dict], met: list[dict]) -> str:
    """The table (vLLM / kernel is '-' where a row is no anchor shape), then the targets' lines."""
    def cell(value) -> str:
        return "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "| " + " | ".join("---" for _ in TABLE_COLUMNS) + " |"]
    lines += ["| " + " | ".join(cell(row[c]) for c in TABLE_COLUMNS) + " |" for row in rows]
    if met:
        lines += ["", f"Targets (BENCHMARKS.md): {sum(t['met'] for t in met)} of {len(met)} met"]
        lines += [f"- {t['case']}: {t['target']}: {cell(t['value'])}, {'met' if t['met'] else 'NOT met'}" for t in met]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/pallas_kernels"))
    parser.add_argument("--shape", action="append", default=[], metavar="T,RANK,ADAPTERS[,REQUESTS]",
                        help="an extra case (repeatable); REQUESTS packs the tokens as that many requests")
    parser.add_argument("--case", action="append", default=[], metavar="NAME",
                        help="run only these cases (repeatable; an anchor, a packed case or a --shape's name)")
    parser.add_argument("--backend", default="auto", choices=api.BACKENDS)
    parser.add_argument("--interpret", action="store_true", help="run Pallas kernels in interpret mode")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    timing.add_loop_arguments(parser)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    timing.apply_loop_arguments(args, calls=50, quick_calls=2)
    args.repeats = args.repeats or (1 if args.quick else 5)
    timed = dict(calls=args.calls, repeats=args.repeats, per_iteration=args.per_iteration)

    copy_bytes = 2**23 if args.quick else 2**30
    bandwidth = timing.copy_bandwidth(copy_bytes, **timed)
    call_us = 1e6 * timing.one_kernel_seconds(**timed)
    workloads = _workloads(args)
    rows = [_measure(name, w, bandwidth, args)
            for name, w in tqdm(workloads.items(), desc="bench", unit="shape")]
    result = {"device_kind": jax.devices()[0].device_kind, "jax_version": jax.__version__,
              "backend": api.resolve_backend(args.backend), "interpret": args.interpret,
              "copy_bandwidth_GBps": bandwidth / 1e9, "tiny_call_us": call_us, "cuda_graphs": not args.no_graphs,
              "calls_per_iteration": args.per_iteration, "rows": rows, "targets": targets(rows)}
    table = markdown(rows, result["targets"])
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s on {result['device_kind']} ({result['backend']}); "
          f"a one-kernel call times {call_us:.2f} us here (the timing floor; "
          f"{'no ' if args.no_graphs else ''}CUDA graphs, {args.per_iteration} calls per iteration)")
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.md").write_text(table + "\n")
    (args.out / "bench.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
