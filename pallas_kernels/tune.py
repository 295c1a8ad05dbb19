"""Profile candidate tiles per shape class on this device and write the winners as a tile table.

    python -m pallas_kernels.tune [--out configs/tiles/<device>.json] [--backend B] [--quick --interpret]

For each (T bucket, d_in, d_out, R, active adapters) of the grid, every candidate tile (fitted to the
shape and deduplicated; the heuristic's pick and its fuse_shrink twin always compete) is timed on the
delta (batched_lora) plus the fused projection, inside one jitted loop each (`timing.py`); the fastest
total wins. The table records the device kind and jax version. `--quick --interpret` runs a tiny grid
in Pallas interpret mode so the tool itself can be exercised on CPU; its timings there mean nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import pathlib
import random

import jax
from tqdm import tqdm

from pallas_kernels import api, timing
from pallas_kernels.tiles import ShapeKey, Tiles, TileTable, fit, heuristic, table_path
from pallas_kernels.workload import Workload

GRID = dict(tokens=(16, 64, 256, 1024, 4096), dims=((4096, 4096), (4096, 11008), (11008, 4096)),
            ranks=(16, 64), adapters=(1, 4, 32))
QUICK_GRID = dict(tokens=(16, 64), dims=((128, 256),), ranks=(16,), adapters=(2,))

GPU_SPACE = dict(block_t=(16, 32, 64, 128), block_k=(32, 64, 128), block_n=(64, 128, 256),
                 split_k=(1, 4, 8), pipeline=((4, 2), (4, 3), (8, 3), (8, 4)),
                 fuse_shrink=(False, True))
TPU_SPACE = dict(block_t=(16, 32, 64, 128, 256), block_k=(256, 512, 1024), block_n=(256, 512, 1024),
                 split_k=(1,), pipeline=((4, 3),), fuse_shrink=(False, True))


def candidates(key: ShapeKey, backend: str, limit: int, seed: int = 0) -> list[Tiles]:
    """Up to `limit` distinct fitted tiles from the backend's space, both fuse_shrink settings.

    The heuristic's pick comes first and its twin with fuse_shrink flipped second, so that even a
    short candidate list measures where the T threshold for fusing the shrink really lies.
    """
    space = GPU_SPACE if backend == "pallas_gpu" else TPU_SPACE
    pool = {fit(Tiles(bt, bk, key.rank, bn, sk, warps, stages, fuse), key, backend)
            for bt, bk, bn, sk, (warps, stages), fuse in itertools.product(*space.values())}
    first = heuristic(key, backend)
    twin = dataclasses.replace(first, fuse_shrink=not first.fuse_shrink)
    rest = sorted(pool - {first, twin}, key=repr)
    random.Random(seed).shuffle(rest)
    return [first, twin, *rest][:limit]


def shape_grid(quick: bool) -> list[Workload]:
    grid = QUICK_GRID if quick else GRID
    pool = 8 if quick else 64
    return [Workload(t, d_in, d_out, r, a, pool=pool)
            for t, (d_in, d_out), r, a in itertools.product(
                grid["tokens"], grid["dims"], grid["ranks"], grid["adapters"])]


def _time_tiles(data: list[dict], tiles: Tiles, backend: str, args) -> float:
    lora_keys = ("x", "a_pool", "b_pool", "slot_ids", "ranks", "scales")
    kw = dict(backend=backend, interpret=args.interpret, tiles=tiles)
    delta = timing.seconds_per_call(lambda *a: api.batched_lora(*a, **kw),
                                    [tuple(d[k] for k in lora_keys) for d in data], calls=args.calls)
    fused = timing.seconds_per_call(lambda *a: api.lora_projection(*a, **kw),
                                    [tuple(d[k] for k in ("x", "w", *lora_keys[1:])) for d in data],
                                    calls=args.calls)
    return delta + fused


def main(argv: list[str] | None = None) -> TileTable:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="default configs/tiles/<device>.json")
    parser.add_argument("--backend", choices=("pallas_gpu", "pallas_tpu"), default=None,
                        help="default: the backend of this device")
    parser.add_argument("--interpret", action="store_true", help="run Pallas kernels in interpret mode")
    parser.add_argument("--quick", action="store_true", help="tiny grid (CPU smoke run)")
    parser.add_argument("--max-candidates", type=int, default=None)
    parser.add_argument("--calls", type=int, default=None, help="calls per timed loop")
    args = parser.parse_args(argv)
    backend = args.backend or api.resolve_backend("auto")
    if backend == "reference":
        parser.error("no GPU or TPU here: pass --backend pallas_gpu/pallas_tpu with --interpret")
    args.calls = args.calls or (1 if args.quick else 100)
    limit = args.max_candidates or (2 if args.quick else 24)

    table = TileTable(jax.devices()[0].device_kind, backend, jax.__version__)
    workloads = shape_grid(args.quick)
    jobs = []
    for workload in workloads:
        key = ShapeKey.of(workload.tokens, workload.d_in, workload.d_out, workload.rank, workload.adapters)
        jobs += [(workload, key, tiles) for tiles in candidates(key, backend, limit)]
    best: dict[ShapeKey, tuple[float, Tiles]] = {}
    data_for, data = None, []  # one workload's inputs live at a time
    for workload, key, tiles in tqdm(jobs, desc=f"tune {backend}", unit="tile"):
        if data_for != workload:
            copies = timing.copies_past_cache(workload.copy_bytes(), max_copies=1 if args.quick else 4)
            data_for, data = workload, [workload.arrays(seed) for seed in range(copies)]
        seconds = _time_tiles(data, tiles, backend, args)
        if key not in best or seconds < best[key][0]:
            best[key] = (seconds, tiles)
    table.entries = {key: tiles for key, (_, tiles) in best.items()}
    out = args.out or table_path(table.device_kind)
    table.save(out)
    for key, (seconds, tiles) in best.items():
        print(f"{key} -> {tiles} ({seconds * 1e6:.1f} us delta + fused)")
    print(f"wrote {len(table.entries)} entries to {out}")
    return table


if __name__ == "__main__":
    main()
