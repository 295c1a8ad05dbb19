"""Profile candidate tiles per shape class on this device and write the winners as a tile table.

    python -m pallas_kernels.tune [--out configs/tiles/<device>.json] [--update] [--minutes M]
                                  [--confirm-rounds N]
                                  [--shape T,RANK,ADAPTERS[,REQUESTS] ...] [--backend B] [--quick --interpret]

For each workload of the grid (the anchor shapes of BENCHMARKS.md, prefill also packed as whole
requests, and decode from a small pool; or --shape) and each operation (the delta, batched_lora, and the
fused projection, lora_projection: separate keys, since a GEMM wants other tiles), tiles are timed as
the benchmark times them, inside one jitted loop each, captured as a CUDA graph (`timing.py`): first
half of --max-candidates as seeds (the heuristic's tiles, the one-kernel delta's on GPU, and their
one-step neighbours: each knob doubled or halved, each switch flipped; fitted and deduplicated), then a
hill climb from the fastest through its one-step neighbours, for the rest of the timings or until none
is faster (`climb`), or until the key's share of --minutes is spent. The key's FINALISTS fastest
tiles are then timed again, in turn, for --confirm-rounds rounds (`alternate`), and the fastest median
wins. Entries are keyed as calls look them up (`tiles.call_key`: adapters = min(pool, T)), so
workloads that differ only in their distinct adapters share a key, and its winner is the fastest
summed over them. Candidates that fail to compile or launch (shared memory, registers), or whose
output differs from the reference backend's by more than MAX_RELATIVE_ERROR, are skipped. With
--update the table at --out keeps its other entries and each tuned key's current entry is timed too.
The table records the device kind and jax version. `--quick --interpret` runs a tiny grid in Pallas
interpret mode so the tool itself can be exercised on CPU; its timings there mean nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from tqdm import tqdm

from pallas_kernels import api, timing
from pallas_kernels.tiles import ShapeKey, Tiles, TileTable, fit, heuristic, table_path
from pallas_kernels.workload import Workload, operation

GRID = [Workload(tokens, 4096, 4096, rank, adapters, **kw) for tokens, rank, adapters, kw in [
    (32, 16, 4, {}), (32, 16, 32, {}), (256, 16, 32, {}), (256, 64, 32, {}), (4096, 64, 4, {}),  # the anchors
    # Serving packs a prefill batch as whole requests, each of one adapter; its tiles must suit both.
    (4096, 64, 4, {"requests": 8}),
    # Calls from a pool of a few slots would otherwise find the T = 32 entry of a 64-slot pool.
    (32, 16, 4, {"pool": 8}),
]]
# The first two share a key (pool of 8), and so do the last two.
QUICK_GRID = [Workload(tokens, 128, 128, 16, adapters, pool=8, requests=requests)
              for tokens, adapters, requests in [(16, 2, None), (16, 8, None), (64, 2, None), (64, 2, 4)]]
SWITCHES = {"pallas_gpu": ("sort", "expand_rows", "xla_base", "fuse_shrink"),
            "pallas_tpu": ("fuse_shrink",)}
FINALISTS = 3  # a key's fastest tiles in its climb, timed again in turn before one is written
MAX_RELATIVE_ERROR = 2e-2  # of a candidate's output against the reference backend's (bf16 workloads)
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
            found.append(_flipped(first, switch, key, backend))
    if backend == "pallas_gpu":
        found += [one_kernel(first, key, backend, **variant) for variant in ONE_KERNEL_VARIANTS]
    found += knob_neighbours(first, key, backend)
    return list(dict.fromkeys(found))[:limit]


def knob_neighbours(tiles: Tiles, key: ShapeKey, backend: str) -> list[Tiles]:
    """`tiles` with one knob doubled or halved (num_stages: one more or fewer), fitted."""
    found = []
    for knob in KNOBS[backend]:
        value = getattr(tiles, knob)
        for other in (value * 2, value // 2) if knob != "num_stages" else (value + 1, value - 1):
            found.append(fit(dataclasses.replace(tiles, **{knob: max(1, other)}), key, backend))
    return [t for t in dict.fromkeys(found) if t != tiles]


def _flipped(tiles: Tiles, switch: str, key: ShapeKey, backend: str) -> Tiles:
    return fit(dataclasses.replace(tiles, **{switch: not getattr(tiles, switch)}), key, backend)


def neighbours(tiles: Tiles, key: ShapeKey, backend: str) -> list[Tiles]:
    """What `climb` steps to: one knob changed (`knob_neighbours`) or one switch flipped."""
    flipped = [_flipped(tiles, switch, key, backend) for switch in SWITCHES[backend]]
    return [t for t in dict.fromkeys(knob_neighbours(tiles, key, backend) + flipped) if t != tiles]


def climb(measure: Callable[[Tiles], float], seeds: list[Tiles], neighbours_of: Callable[[Tiles], list[Tiles]],
          limit: int, out_of_time: Callable[[], bool] = lambda: False) -> tuple[float, Tiles]:
    """The fastest tiles found within `limit` timings: the seeds, then a first-improvement hill climb
    from the fastest so far through its untimed neighbours, until a whole neighbourhood is slower.
    Once `out_of_time()` says so, no further tiles are timed (the first always is).

    Winners can lie several knobs away from every seed (H100, PERF.md round 5: the T = 32 delta's
    best tiles were three knobs from the heuristic's), which a list of one-knob neighbours misses.
    """
    timed: dict[Tiles, float] = {}
    for tiles in seeds[:limit]:
        if timed and out_of_time():
            break
        timed.setdefault(tiles, measure(tiles))
    best = min(timed, key=timed.__getitem__)
    while len(timed) < limit and not out_of_time():
        for tiles in neighbours_of(best):
            if tiles in timed:
                continue
            if len(timed) == limit or out_of_time():
                break
            timed[tiles] = measure(tiles)
            if timed[tiles] < timed[best]:
                best = tiles
                break
        else:
            break  # every neighbour of the best has been timed, and none was faster
    return timed[best], best


def alternate(timers: dict[Tiles, Callable[[], float]], rounds: int) -> dict[Tiles, float]:
    """Each finalist's median time over `rounds` rounds, each round timing every finalist once and
    starting one further along, so that drift during the run (clocks, temperature, other work on the
    machine) falls on all of them alike. The climb times each tiles once, at different moments: at
    the H100's T = 32 delta key, its order of two entries and the bench's differed by up to 0.5 us
    (PERF.md round 7)."""
    order = list(timers)
    seconds: dict[Tiles, list[float]] = {tiles: [] for tiles in order}
    for start in range(rounds):
        start %= len(order)
        for tiles in order[start:] + order[:start]:
            seconds[tiles].append(timers[tiles]())
    return {tiles: statistics.median(each) for tiles, each in seconds.items()}


def shape_grid(quick: bool, specs: list[str] = ()) -> list[Workload]:
    """--shape's workloads ("T,RANK,ADAPTERS[,REQUESTS]", hidden and pool as the grid's), else the grid."""
    hidden, pool = (128, 8) if quick else (4096, 64)
    return [Workload.parse(spec, hidden, pool) for spec in specs] or (QUICK_GRID if quick else GRID)


def _result(arrays: dict, key: ShapeKey, backend: str, tiles: Tiles | None, interpret: bool) -> jax.Array:
    fn, names = operation(key.fused, backend, tiles, interpret)
    return fn(*(arrays[name] for name in names))


def _relative_error(actual: jax.Array, expected: jax.Array) -> float:
    """max |actual - expected| / max |expected|, in float32 (NaN where either holds a NaN)."""
    actual, expected = actual.astype(jnp.float32), expected.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(expected)), 1e-30)
    return float(jnp.max(jnp.abs(actual - expected)) / scale)


def _tile_timer(data: list[dict], key: ShapeKey, tiles: Tiles, backend: str, args) -> Callable[[int], float]:
    """`tiles`' loop over `data`, compiled once (`timing.timed_loop`): call it for best-of-n seconds per call."""
    fn, names = operation(key.fused, backend, tiles, args.interpret)
    return timing.timed_loop(fn, [tuple(d[name] for name in names) for d in data], calls=args.calls,
                             per_iteration=args.per_iteration)


def main(argv: list[str] | None = None) -> TileTable:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="default configs/tiles/<device>.json")
    parser.add_argument("--backend", choices=("pallas_gpu", "pallas_tpu"), default=None,
                        help="default: the backend of this device")
    parser.add_argument("--interpret", action="store_true", help="run Pallas kernels in interpret mode")
    parser.add_argument("--quick", action="store_true", help="tiny grid (CPU smoke run)")
    parser.add_argument("--shape", action="append", default=[], metavar="T,RANK,ADAPTERS[,REQUESTS]",
                        help="tune these workloads instead of the grid (repeatable); REQUESTS packs the "
                             "tokens as that many requests")
    parser.add_argument("--update", action="store_true",
                        help="keep --out's other entries, and time each tuned key's current entry too")
    parser.add_argument("--max-candidates", type=int, default=None,
                        help="timings per key (half of them seeds, the rest a hill climb); default 24")
    parser.add_argument("--minutes", type=float, default=None,
                        help="time budget of the whole run, shared among the keys (what one leaves rolls "
                             "over to the next); a key out of time keeps its fastest tiles so far")
    parser.add_argument("--confirm-rounds", type=int, default=None,
                        help=f"time each key's {FINALISTS} fastest tiles again in this many alternating rounds "
                             "and keep the fastest median; 0 keeps the climb's fastest (default 5; 2 with --quick)")
    timing.add_loop_arguments(parser)
    args = parser.parse_args(argv)
    if args.minutes is not None and args.minutes <= 0:
        parser.error("--minutes must be positive")
    if args.confirm_rounds is not None and args.confirm_rounds < 0:
        parser.error("--confirm-rounds must be 0 or more")
    confirm_rounds = (2 if args.quick else 5) if args.confirm_rounds is None else args.confirm_rounds
    timing.apply_loop_arguments(args, calls=25, quick_calls=1)
    backend = args.backend or api.resolve_backend("auto")
    if backend == "reference":
        parser.error("no GPU or TPU here: pass --backend pallas_gpu/pallas_tpu with --interpret")
    limit = args.max_candidates or (2 if args.quick else 24)

    table = TileTable(jax.devices()[0].device_kind, backend, jax.__version__)
    out = args.out or table_path(table.device_kind)
    if args.update and out.exists():
        stored = TileTable.load(out)
        if stored.backend == backend:
            table.entries = dict(stored.entries)
    kept = dict(table.entries)
    # Workloads whose calls look up the same key (T = 32 with 4 or 32 adapters of a 64-slot pool: the
    # key holds min(N, T); prefill with its tokens drawn at random or packed as requests) share one
    # entry: its winner is the fastest over all of them (summed time).
    try:
        workloads = shape_grid(args.quick, args.shape)
    except ValueError as error:
        parser.error(f"--shape: {error}")
    served: dict[ShapeKey, list[Workload]] = {}
    for workload in workloads:
        for fused in (False, True):
            served.setdefault(workload.key(fused), []).append(workload)
    times: dict[ShapeKey, dict[Tiles, dict[Workload, float]]] = {key: {} for key in served}
    best: dict[ShapeKey, Tiles] = {}
    confirmed: dict[ShapeKey, float] = {}
    progress = tqdm(total=limit * len(served), desc=f"tune {backend}", unit="tile")
    end = None if args.minutes is None else time.monotonic() + 60 * args.minutes
    for done, (key, users) in enumerate(served.items()):
        key_end = None if end is None else time.monotonic() + (end - time.monotonic()) / (len(served) - done)
        # This key's workloads' inputs live while it is tuned.
        data = {w: [w.arrays(seed) for seed in range(timing.copies_past_cache(
            w.copy_bytes(), max_copies=1 if args.quick else 4))] for w in users}

        # What every candidate must compute: the reference backend's result on the first copy.
        expected = {w: _result(data[w][0], key, "reference", None, False) for w in users}
        timers: dict[Tiles, dict[Workload, Callable[[int], float]]] = {}  # this key's compiled loops

        def measure(tiles: Tiles, key=key, users=users, data=data, expected=expected, timers=timers) -> float:
            each, timers[tiles] = {}, {}
            for workload in users:
                each[workload] = float("inf")
                try:
                    error = _relative_error(_result(data[workload][0], key, backend, tiles, args.interpret),
                                            expected[workload])
                    if error <= MAX_RELATIVE_ERROR:
                        timers[tiles][workload] = _tile_timer(data[workload], key, tiles, backend, args)
                        each[workload] = timers[tiles][workload]()
                    else:  # a kernel variant this device computes wrongly must never win
                        tqdm.write(f"{workload} {tiles}: skipped, wrong result (relative error {error:.3g})")
                except Exception as error:  # noqa: BLE001 - a tile the device cannot run is just a loser
                    tqdm.write(f"{workload} {tiles}: skipped, {type(error).__name__}: {str(error)[:200]}")
            times[key][tiles] = each
            progress.update()
            tqdm.write(f"{key} {tiles}: " + ", ".join(f"{w.label} {t * 1e6:.1f}" for w, t in each.items()) + " us")
            return sum(each.values())

        seeds = candidates(key, backend, max(2, limit // 2), kept.get(key) if args.update else None)
        out_of_time = lambda key_end=key_end: key_end is not None and time.monotonic() > key_end
        seconds, tiles = climb(measure, seeds, lambda t, key=key: neighbours(t, key, backend), limit, out_of_time)
        progress.update(limit - len(times[key]))  # the climb may stop short of its budget
        total = {t: sum(each.values()) for t, each in times[key].items()}
        finalists = sorted((t for t in total if total[t] < float("inf")), key=total.__getitem__)[:FINALISTS]
        if confirm_rounds and len(finalists) > 1 and not out_of_time():
            medians = alternate({t: lambda t=t, timers=timers: sum(run(1) for run in timers[t].values())
                                 for t in finalists}, confirm_rounds)
            tiles = min(medians, key=medians.__getitem__)
            seconds = medians[tiles]
            confirmed[key] = seconds
            tqdm.write(f"{key} finalists, median of {confirm_rounds} alternating rounds: "
                       + ", ".join(f"{t} {s * 1e6:.1f}" for t, s in medians.items()) + " us")
        timers.clear()
        if seconds < float("inf"):
            best[key] = table.entries[key] = tiles
            table.save(out)  # key by key, so that a run cut short keeps its winners
    progress.close()
    for key, tiles in best.items():
        each = ", ".join(f"{w.label} {times[key][tiles][w] * 1e6:.1f}" for w in served[key])
        again = f"; again in turn: {confirmed[key] * 1e6:.1f}" if key in confirmed else ""
        print(f"{key} -> {tiles} ({each}{again} us){'' if kept.get(key) != tiles else ' (kept)'}")
    print(f"wrote {len(table.entries)} entries to {out} ({len(best)} tuned)")
    return table


if __name__ == "__main__":
    main()
