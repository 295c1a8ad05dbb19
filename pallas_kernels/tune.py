"""Profile candidate tiles per shape class on this device and write the winners as a tile table.

    python -m pallas_kernels.tune [--out configs/tiles/<device>.json] [--backend B] [--quick --interpret]

For each workload of the grid (the anchor shapes of BENCHMARKS.md) and each operation (the delta,
batched_lora, and the fused projection, lora_projection: separate keys, since a GEMM wants other
tiles), the heuristic's tiles and their one-step neighbours (each knob doubled or halved, each switch
flipped; fitted and deduplicated) are timed as the benchmark times them, inside one jitted loop each,
captured as a CUDA graph (`timing.py`); the fastest wins. Candidates that fail to compile or launch
(shared memory, registers) are skipped. The table
records the device kind and jax version. `--quick --interpret` runs a tiny grid in Pallas interpret
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
QUICK_GRID = [(16, 16, 2), (64, 16, 2)]
SWITCHES = {"pallas_gpu": ("sort", "expand_rows", "xla_base", "fuse_shrink"), "pallas_tpu": ("fuse_shrink",)}
KNOBS = {"pallas_gpu": ("block_n", "split_k", "block_t", "split_runs", "num_warps", "num_stages", "block_k"),
         "pallas_tpu": ("block_t", "block_k", "block_n")}


def candidates(key: ShapeKey, backend: str, limit: int) -> list[Tiles]:
    """Up to `limit` distinct fitted tiles: the heuristic's, its twins with each switch flipped (so
    that even a short list measures where the heuristic's thresholds lie), then one-knob neighbours."""
    first = heuristic(key, backend)
    found = [first] + [fit(dataclasses.replace(first, **{switch: not getattr(first, switch)}), key, backend)
                       for switch in SWITCHES[backend]]
    for knob in KNOBS[backend]:
        value = getattr(first, knob)
        for other in (value * 2, value // 2) if knob != "num_stages" else (value + 1, value - 1):
            found.append(fit(dataclasses.replace(first, **{knob: max(1, other)}), key, backend))
    return list(dict.fromkeys(found))[:limit]


def shape_grid(quick: bool) -> list[Workload]:
    hidden, pool = (128, 8) if quick else (4096, 64)
    return [Workload(t, hidden, hidden, r, a, pool=pool) for t, r, a in (QUICK_GRID if quick else GRID)]


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
    limit = args.max_candidates or (2 if args.quick else 8)

    table = TileTable(jax.devices()[0].device_kind, backend, jax.__version__)
    out = args.out or table_path(table.device_kind)
    jobs = []
    for workload in shape_grid(args.quick):
        for fused in (False, True):
            key = ShapeKey.of(workload.tokens, workload.d_in, workload.d_out, workload.rank, workload.adapters,
                              fused)
            jobs += [(workload, key, tiles) for tiles in candidates(key, backend, limit)]
    best: dict[ShapeKey, tuple[float, Tiles]] = {}
    data_for, data = None, []  # one workload's inputs live at a time
    for workload, key, tiles in tqdm(jobs, desc=f"tune {backend}", unit="tile"):
        if data_for != workload:
            copies = timing.copies_past_cache(workload.copy_bytes(), max_copies=1 if args.quick else 4)
            data_for, data = workload, [workload.arrays(seed) for seed in range(copies)]
        try:
            seconds = _time_tiles(data, key, tiles, backend, args)
        except Exception as error:  # noqa: BLE001 - a tile the device cannot run is just a loser
            print(f"{key} {tiles}: skipped, {type(error).__name__}: {str(error)[:200]}")
            continue
        tqdm.write(f"{key} {tiles}: {seconds * 1e6:.1f} us")
        if key not in best or seconds < best[key][0]:
            best[key] = (seconds, tiles)
            table.entries = {key: tiles for key, (_, tiles) in best.items()}
            table.save(out)  # as it goes, so that a run cut short keeps its winners
    for key, (seconds, tiles) in best.items():
        print(f"{key} -> {tiles} ({seconds * 1e6:.1f} us)")
    print(f"wrote {len(table.entries)} entries to {out}")
    return table


if __name__ == "__main__":
    main()
