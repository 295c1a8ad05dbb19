"""Profile candidate tiles per shape class on this device and write the winners as a tile table.

    python -m pallas_kernels.tune [--out configs/tiles/<device>.json] [--shape T,RANK,ADAPTERS ... --update]
                                  [--backend B] [--quick --interpret]

For each workload of the grid (the anchor shapes of BENCHMARKS.md, or --shape) and each operation (the
delta, batched_lora, and the fused projection, lora_projection: separate keys, since a GEMM wants
other tiles), the heuristic's tiles, the one-kernel delta's (GPU) and one-step neighbours (each knob
doubled or halved, each switch flipped; fitted and deduplicated) are timed as the benchmark times
them, inside one jitted loop each, captured as a CUDA graph (`timing.py`). Entries are keyed as calls
look them up (`tiles.call_key`: adapters = min(pool, T)), so workloads that differ only in their
distinct adapters share a key, and its winner is the fastest summed over them. Candidates that fail to
compile or launch (shared memory, registers) are skipped. With --update the table at --out keeps its
other entries and each tuned key's current entry is timed too. The table records the device kind and
jax version. `--quick --interpret` runs a tiny grid in Pallas interpret
mode so the tool itself can be exercised on CPU; its timings there mean nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib

import jax
from tqdm import tqdm

from pallas_kernels import api, timing
from pallas_kernels.tiles import ShapeKey, Tiles, TileTable, fit, heuristic, table_path
from pallas_kernels.workload import Workload

GRID = [(32, 16, 4), (32, 16, 32), (256, 16, 32), (256, 64, 32), (4096, 64, 4)]  # (T, rank, adapters)
QUICK_GRID = [(16, 16, 2), (16, 16, 8), (64, 16, 2)]  # the first two share a key (pool of 8)
SWITCHES = {"pallas_gpu": ("sort", "expand_rows", "xla_base", "fuse_shrink"), "pallas_tpu": ("fuse_shrink",)}
KNOBS = {"pallas_gpu": ("block_n", "split_k", "block_t", "split_runs", "num_warps", "num_stages", "block_k"),
         "pallas_tpu": ("block_t", "block_k", "block_n")}


# The one-kernel delta (GPU fuse_shrink) wants other tiles than the two-kernel heuristic it is flipped
# from: each program runs its adapter run's whole d_in loop and recomputes it per d_out tile, so d_out
# tiles are wide (H100, PERF.md round 3: block_t 16, block_k 256, block_n 1024; 512 was about 4 us
# slower, 2048 with 8 warps best at T = 256).
ONE_KERNEL = dict(block_t=16, block_k=256, block_n=1024, num_warps=4, num_stages=3)
ONE_KERNEL_VARIANTS = (dict(block_n=2048, num_warps=8), dict(block_n=512), dict(block_t=32))


def one_kernel(first: Tiles, key: ShapeKey, backend: str, **override) -> Tiles:
    """GPU: `first` as the one-kernel delta, with tiles that suit it (after XLA's base GEMM when fused)."""
    tiles = dataclasses.replace(first, fuse_shrink=True, xla_base=first.xla_base or key.fused,
                                **{**ONE_KERNEL, **override})
    return fit(tiles, key, backend)


def candidates(key: ShapeKey, backend: str, limit: int, incumbent: Tiles | None = None) -> list[Tiles]:
    """Up to `limit` distinct fitted tiles: `incumbent` (a table's current entry) when given, the
    heuristic's, its twins with each switch flipped (so that even a short list measures where the
    heuristic's thresholds lie; on GPU the fuse_shrink twin takes the one-kernel tiles), the other
    one-kernel tiles (GPU), then one-knob neighbours of the heuristic's."""
    first = heuristic(key, backend)
    found = [fit(incumbent, key, backend)] if incumbent is not None else []
    found.append(first)
    for switch in SWITCHES[backend]:
        if backend == "pallas_gpu" and switch == "fuse_shrink" and not first.fuse_shrink:
            found.append(one_kernel(first, key, backend))
        else:
            found.append(fit(dataclasses.replace(first, **{switch: not getattr(first, switch)}), key, backend))
    if backend == "pallas_gpu":
        found += [one_kernel(first, key, backend, **variant) for variant in ONE_KERNEL_VARIANTS]
    for knob in KNOBS[backend]:
        value = getattr(first, knob)
        for other in (value * 2, value // 2) if knob != "num_stages" else (value + 1, value - 1):
            found.append(fit(dataclasses.replace(first, **{knob: max(1, other)}), key, backend))
    return list(dict.fromkeys(found))[:limit]


def shape_grid(quick: bool, shapes: list[tuple[int, int, int]] | None = None) -> list[Workload]:
    hidden, pool = (128, 8) if quick else (4096, 64)
    return [Workload(t, hidden, hidden, r, a, pool=pool) for t, r, a in (shapes or (QUICK_GRID if quick else GRID))]


def _time_tiles(data: list[dict], key: ShapeKey, tiles: Tiles, backend: str, args) -> float:
    lora_keys = ("x", "a_pool", "b_pool", "slot_ids", "ranks", "scales")
    kw = dict(backend=backend, interpret=args.interpret, tiles=tiles)
    if key.fused:
        fn, keys = (lambda *a: api.lora_projection(*a, **kw)), ("x", "w", *lora_keys[1:])
    else:
        fn, keys = (lambda *a: api.batched_lora(*a, **kw)), lora_keys
    return timing.seconds_per_call(fn, [tuple(d[k] for k in keys) for d in data], calls=args.calls,
                                   per_iteration=args.per_iteration)


def main(argv: list[str] | None = None) -> TileTable:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="default configs/tiles/<device>.json")
    parser.add_argument("--backend", choices=("pallas_gpu", "pallas_tpu"), default=None,
                        help="default: the backend of this device")
    parser.add_argument("--interpret", action="store_true", help="run Pallas kernels in interpret mode")
    parser.add_argument("--quick", action="store_true", help="tiny grid (CPU smoke run)")
    parser.add_argument("--shape", action="append", default=[], metavar="T,RANK,ADAPTERS",
                        help="tune these workloads instead of the grid (repeatable)")
    parser.add_argument("--update", action="store_true",
                        help="keep --out's other entries, and time each tuned key's current entry too")
    parser.add_argument("--max-candidates", type=int, default=None)
    parser.add_argument("--calls", type=int, default=None, help="iterations per timed loop")
    parser.add_argument("--per-iteration", type=int, default=timing.PER_ITERATION, help="calls per iteration")
    parser.add_argument("--no-graphs", action="store_true", help="launch kernels from the host (no CUDA graph)")
    args = parser.parse_args(argv)
    if not args.no_graphs:
        timing.use_cuda_graphs()
    backend = args.backend or api.resolve_backend("auto")
    if backend == "reference":
        parser.error("no GPU or TPU here: pass --backend pallas_gpu/pallas_tpu with --interpret")
    args.calls = args.calls or (1 if args.quick else 25)
    limit = args.max_candidates or (2 if args.quick else 12)

    table = TileTable(jax.devices()[0].device_kind, backend, jax.__version__)
    out = args.out or table_path(table.device_kind)
    if args.update and out.exists():
        stored = TileTable.load(out)
        if stored.backend == backend:
            table.entries = dict(stored.entries)
    kept = dict(table.entries)
    # Workloads whose calls look up the same key (T = 32 with 4 or 32 adapters of a 64-slot pool: the
    # key holds min(N, T)) share one entry: its winner is the fastest over all of them (summed time).
    workloads = shape_grid(args.quick, [tuple(int(v) for v in spec.split(",")) for spec in args.shape])
    served: dict[ShapeKey, list[Workload]] = {}
    for workload in workloads:
        for fused in (False, True):
            served.setdefault(workload.key(fused), []).append(workload)
    tried = {key: candidates(key, backend, limit, kept.get(key) if args.update else None) for key in served}
    jobs = [(workload, key, tiles) for workload in workloads
            for key in dict.fromkeys(workload.key(fused) for fused in (False, True)) for tiles in tried[key]]
    times: dict[ShapeKey, dict[Tiles, dict[Workload, float]]] = {key: {} for key in served}
    best: dict[ShapeKey, tuple[float, Tiles]] = {}
    data_for, data = None, []  # one workload's inputs live at a time
    for workload, key, tiles in tqdm(jobs, desc=f"tune {backend}", unit="tile"):
        if data_for != workload:
            copies = timing.copies_past_cache(workload.copy_bytes(), max_copies=1 if args.quick else 4)
            data_for, data = workload, [workload.arrays(seed) for seed in range(copies)]
        try:
            seconds = _time_tiles(data, key, tiles, backend, args)
        except Exception as error:  # noqa: BLE001 - a tile the device cannot run is just a loser
            print(f"{workload} {key} {tiles}: skipped, {type(error).__name__}: {str(error)[:200]}")
            seconds = float("inf")
        tqdm.write(f"T{workload.tokens}-r{workload.rank}-a{workload.adapters} {key} {tiles}: {seconds * 1e6:.1f} us")
        timed = times[key].setdefault(tiles, {})
        timed[workload] = seconds
        total = sum(timed.values())
        if len(timed) == len(served[key]) and total < float("inf") and (key not in best or total < best[key][0]):
            best[key] = (total, tiles)
            table.entries[key] = tiles
            table.save(out)  # as it goes, so that a run cut short keeps its winners
    for key, (seconds, tiles) in best.items():
        each = ", ".join(f"a{w.adapters} {times[key][tiles][w] * 1e6:.1f}" for w in served[key])
        print(f"{key} -> {tiles} ({each} us){'' if kept.get(key) != tiles else ' (kept)'}")
    print(f"wrote {len(table.entries)} entries to {out} ({len(best)} tuned)")
    return table


if __name__ == "__main__":
    main()
