"""Tile tables round-trip, every lookup returns tiles the backend can lower, lookups keep the delta's
and the fused projection's entries apart, tune keys entries as calls look them up, and the
size-dependent switches are picked by token bucket and tuned both ways."""
import dataclasses
import json
import logging
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from pallas_kernels import api, tune
from pallas_kernels import tiles as tiles_module
from pallas_kernels.tiles import ShapeKey, Tiles, TileTable, fit, heuristic, tiles_for

shape_keys = st.builds(
    ShapeKey.of, tokens=st.integers(1, 8192), d_in=st.sampled_from([64, 96, 128, 384, 4096, 11008]),
    d_out=st.sampled_from([64, 128, 200, 4096, 11008]), rank=st.sampled_from([4, 8, 16, 64, 256, 4096]),
    adapters=st.integers(1, 64))


def assert_valid(tiles: Tiles, key: ShapeKey, backend: str) -> None:
    if backend == "pallas_gpu":
        for block in (tiles.block_t, tiles.block_k, tiles.block_r, tiles.block_n):
            assert block >= 16 and block & (block - 1) == 0
        assert 1 <= tiles.split_k <= math.ceil(key.d_in / tiles.block_k)
        assert tiles.num_warps & (tiles.num_warps - 1) == 0 and tiles.num_stages >= 1
        assert 1 <= tiles.split_runs <= tiles.block_t
        assert key.fused or not tiles.xla_base
        if tiles.fuse_shrink:  # the one-kernel delta: one run per program, no split-K, not in the Pallas GEMM
            assert tiles.split_runs == min(tiles.block_t, key.adapters + 1) and tiles.split_k == 1
            assert not tiles.expand_rows and (tiles.xla_base or not key.fused)
    else:
        assert not (tiles.sort or tiles.expand_rows or tiles.xla_base)
        assert tiles.block_t % 8 == 0
        for block, dim in ((tiles.block_k, key.d_in), (tiles.block_r, key.rank), (tiles.block_n, key.d_out)):
            assert dim % block == 0 and (block % 128 == 0 or block == dim)


def test_table_round_trips_through_json(tmp_path):
    table = TileTable("TPU v5 lite", "pallas_tpu", "0.11.2", {
        ShapeKey.of(32, 4096, 4096, 16, 4): Tiles(16, 512, 16, 512),
        ShapeKey.of(4096, 4096, 11008, 64, 4, fused=True): Tiles(128, 1024, 64, 256, 1, 4, 3, fuse_shrink=True),
    })
    path = tmp_path / "tiles" / "tpu.json"
    table.save(path)
    assert TileTable.load(path) == table



def test_table_with_fields_tiles_lack_is_refused_by_name(tmp_path):
    """An entry with a field Tiles or ShapeKey does not have (a table of another version), or without a
    required one, fails to load with the table's path, the entry and the fields, not a bare TypeError."""
    table = TileTable("dev", "pallas_gpu", "0.11.2", {ShapeKey.of(32, 4096, 4096, 16, 4): Tiles(16, 128, 16, 128)})
    raw = json.loads(table.to_json())
    raw["entries"][0]["tiles"]["retired_switch"] = False
    path = tmp_path / "old.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=rf"tile table {re.escape(str(path))}: entry 0's tiles: "
                                         r"unknown fields \['retired_switch'\]; Tiles has \['block_t'"):
        TileTable.load(path)
    del raw["entries"][0]["tiles"]["retired_switch"], raw["entries"][0]["key"]["d_in"]
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"entry 0's key: missing fields \['d_in'\]; ShapeKey has"):
        TileTable.load(path)


def test_committed_tables_load():
    """Every table under configs/tiles loads, and each entry is one its backend can lower."""
    paths = sorted(tiles_module.TABLE_DIR.glob("*.json"))
    assert paths
    for path in paths:
        table = TileTable.load(path)
        assert table.entries and table.backend in tiles_module.BACKENDS
        for key, tiles in table.entries.items():
            assert_valid(fit(tiles, key, table.backend), key, table.backend)


@settings(max_examples=60, deadline=None)
@given(key=shape_keys, backend=st.sampled_from(["pallas_gpu", "pallas_tpu"]))
def test_heuristic_and_unseen_lookups_are_valid(key, backend):
    assert_valid(heuristic(key, backend), key, backend)
    table = TileTable("dev", backend, "0.11.2", {
        ShapeKey.of(16, 4096, 4096, 16, 4): Tiles(16, 128, 16, 128, 8, 4, 3),
        ShapeKey.of(4096, 4096, 4096, 64, 4): Tiles(128, 64, 64, 256, 1, 8, 3),
    })
    assert_valid(table.lookup(key), key, backend)
    for fuse_shrink in (False, True):  # a stored entry with every switch on is fitted to what applies
        every_switch = Tiles(32, 128, 16, 128, 4, 4, 3, fuse_shrink=fuse_shrink, sort=True, split_runs=8,
                             expand_rows=True, xla_base=True)
        assert_valid(fit(every_switch, key, backend), key, backend)


def test_lookup_picks_the_nearest_stored_shape():
    decode, prefill = Tiles(16, 128, 16, 128, 8, 4, 3), Tiles(128, 64, 64, 256, 1, 8, 4)
    table = TileTable("dev", "pallas_gpu", "0.11.2", {
        ShapeKey.of(16, 4096, 4096, 16, 4): decode, ShapeKey.of(4096, 4096, 4096, 64, 4): prefill})
    near_decode = ShapeKey.of(24, 4096, 4096, 16, 8)
    near_prefill = ShapeKey.of(3000, 4096, 4096, 64, 2)
    assert table.lookup(near_decode) == fit(decode, near_decode, "pallas_gpu")
    assert table.lookup(near_prefill) == fit(prefill, near_prefill, "pallas_gpu")


def test_lookup_keeps_delta_and_fused_entries_apart():
    delta, fused = Tiles(16, 128, 16, 128, 8, 4, 3), Tiles(32, 128, 16, 32, 4, 4, 4)
    table = TileTable("dev", "pallas_gpu", "0.11.2", {ShapeKey.of(32, 4096, 4096, 16, 4): delta})
    fused_key = ShapeKey.of(32, 4096, 4096, 16, 4, fused=True)
    assert table.lookup(fused_key) == heuristic(fused_key, "pallas_gpu")  # no fused entry yet
    table.entries[ShapeKey.of(4096, 4096, 4096, 64, 4, fused=True)] = fused
    assert table.lookup(fused_key) == fit(fused, fused_key, "pallas_gpu")
    assert table.lookup(ShapeKey.of(4096, 4096, 4096, 64, 4)) == fit(delta, ShapeKey.of(4096, 4096, 4096, 64, 4),
                                                                     "pallas_gpu")


def test_missing_table_or_other_backend_falls_back_to_heuristic(tmp_path, caplog):
    """...and says so once per table and backend, naming the table's path and the tune command."""
    key, other_key = ShapeKey.of(64, 4096, 4096, 16, 8), ShapeKey.of(32, 4096, 4096, 16, 8)
    absent = tmp_path / "absent.json"
    with caplog.at_level(logging.WARNING, logger="pallas_kernels.tiles"):
        assert tiles_for(key, "pallas_gpu", absent) == heuristic(key, "pallas_gpu")
        assert tiles_for(other_key, "pallas_gpu", absent) == heuristic(other_key, "pallas_gpu")
        path = tmp_path / "tpu_table.json"
        TileTable("dev", "pallas_tpu", "0.11.2", {key: Tiles(16, 512, 16, 512)}).save(path)
        assert tiles_for(key, "pallas_gpu", path) == heuristic(key, "pallas_gpu")
        assert tiles_for(key, "pallas_tpu", path) == Tiles(16, 512, 16, 512)
    first, second = [record.getMessage() for record in caplog.records]
    assert first.startswith(f"no tile table at {absent}: pallas_gpu uses the heuristic's tiles")
    assert second.startswith(f"a pallas_tpu tile table at {path}: pallas_gpu uses the heuristic's tiles")
    assert all("python -m pallas_kernels.tune --backend pallas_gpu" in m for m in (first, second))


@settings(max_examples=60, deadline=None)
@given(key=shape_keys, backend=st.sampled_from(["pallas_gpu", "pallas_tpu"]))
def test_heuristic_switches_by_token_bucket(key, backend):
    """GPU sorts tokens by slot from 128 tokens on, and the fused projection's epilogue gathers B per
    row at decode (up to 256 tokens); TPU fuses the shrink up to 256 tokens."""
    tiles = heuristic(key, backend)
    if backend == "pallas_gpu":
        assert tiles.sort == (key.tokens >= 128) and not tiles.fuse_shrink  # one kernel only where tuned
        assert tiles.expand_rows == (key.fused and key.tokens <= 256)
    else:
        assert tiles.fuse_shrink == (key.tokens <= 256) and tiles.split_runs == 1
        assert not (tiles.sort or tiles.expand_rows or tiles.xla_base)


@given(key=shape_keys, backend=st.sampled_from(["pallas_gpu", "pallas_tpu"]))
def test_tune_candidates_flip_the_size_dependent_switch(key, backend):
    switch = tune.SWITCHES[backend][0]
    pair = tune.candidates(key, backend, limit=2)
    assert pair[0] == heuristic(key, backend)
    assert pair[1] == dataclasses.replace(pair[0], **{switch: not getattr(pair[0], switch)})


@given(key=shape_keys, backend=st.sampled_from(["pallas_gpu", "pallas_tpu"]))
def test_tune_candidates_are_distinct_and_valid(key, backend):
    found = tune.candidates(key, backend, limit=100)
    assert len(found) == len(set(found)) >= 2
    for tiles in found:
        assert_valid(tiles, key, backend)


def test_tuned_entries_are_what_calls_of_their_shape_look_up(tmp_path, monkeypatch):
    """tune stores each entry under the key that calls of its workload look up (adapters = the static
    min(pool, T), not the batch's distinct adapters): decode-few (4 adapters of a 64-slot pool) and
    decode-many share the T = 32 entry (a small pool's T = 32 calls get their own), prefill drawn at
    random and packed as requests share one, and every workload's call gets exactly its key's entry."""
    grid = tune.shape_grid(quick=False)
    keys = list(dict.fromkeys(w.key(fused) for w in grid for fused in (False, True)))
    entries = {key: fit(Tiles(16, 128, 16, 32 << (i % 6), split_k=1 + i // 6), key, "pallas_gpu")
               for i, key in enumerate(keys)}
    assert len(set(entries.values())) == len(entries)
    path = tmp_path / "gpu.json"
    TileTable("dev", "pallas_gpu", "0.11.2", entries).save(path)
    monkeypatch.setattr(tiles_module, "table_path", lambda kind=None: path)
    monkeypatch.setattr(tiles_module, "_loaded", {})
    used = []
    monkeypatch.setattr(api, "_batched_lora", lambda *args, tiles, **kw: used.append(tiles))
    monkeypatch.setattr(api, "_lora_projection", lambda *args, tiles, **kw: used.append(tiles))
    spec = jax.ShapeDtypeStruct
    for w in grid:
        x, weight = spec((w.tokens, w.d_in), jnp.bfloat16), spec((w.d_in, w.d_out), jnp.bfloat16)
        lora = (spec((w.pool, w.d_in, w.rank), jnp.bfloat16), spec((w.pool, w.rank, w.d_out), jnp.bfloat16),
                spec((w.tokens,), jnp.int32), spec((w.pool,), jnp.int32), spec((w.pool,), jnp.float32))
        pk.batched_lora(x, *lora, backend="pallas_gpu")
        pk.lora_projection(x, weight, *lora, backend="pallas_gpu")
        assert used[-2:] == [entries[w.key(False)], entries[w.key(True)]], w
    few, many, small_pool = (w for w in grid if w.tokens == 32)
    assert few.adapters != many.adapters and few.key() == many.key() != small_pool.key()
    random, packed = (w for w in grid if w.tokens == 4096)
    assert packed.requests and random.key() == packed.key()


@given(key=shape_keys)
def test_tune_tries_wide_d_out_tiles_for_the_one_kernel_delta(key):
    """GPU: the one-kernel candidates (fuse_shrink; after XLA's base GEMM when fused) take d_out tiles of
    1024 (and 512, 2048), not the two-kernel heuristic's 128, wherever d_out allows them."""
    found = [t for t in tune.candidates(key, "pallas_gpu", limit=100) if t.fuse_shrink]
    widths = {t.block_n for t in found}
    assert min(1024, max(16, 1 << (key.d_out - 1).bit_length())) in widths
    assert all(t.xla_base == key.fused for t in found)
    short = tune.candidates(key, "pallas_gpu", limit=5)  # the flipped twins alone include the one kernel
    assert any(t.fuse_shrink and t.block_n == min(1024, max(16, 1 << (key.d_out - 1).bit_length())) for t in short)


def test_tune_climbs_to_tiles_several_knobs_from_every_seed():
    """`climb` reaches the fastest tiles of a cost with one minimum three knobs away from the
    heuristic's tiles (as the H100's T = 32 delta entry was, PERF.md round 5), which no seed is,
    within its budget of timings, and never times more than that budget or the same tiles twice."""
    key = ShapeKey.of(32, 4096, 4096, 16, 64)
    start = heuristic(key, "pallas_gpu")
    target = fit(dataclasses.replace(start, split_k=start.split_k // 2, block_k=start.block_k * 2,
                                     block_n=start.block_n * 2), key, "pallas_gpu")
    knobs = ("split_k", "block_k", "block_n", "block_t", "split_runs", "num_warps", "num_stages")
    switches = ("sort", "expand_rows", "xla_base", "fuse_shrink")

    def cost(tiles):  # log2 distance to the target, switches weighing most
        timed.append(tiles)
        distance = sum(abs(math.log2(getattr(tiles, k)) - math.log2(getattr(target, k))) for k in knobs)
        return distance + 10 * sum(getattr(tiles, s) != getattr(target, s) for s in switches)

    seeds = tune.candidates(key, "pallas_gpu", limit=12)
    assert target not in seeds
    timed = []
    seconds, found = tune.climb(cost, seeds, lambda t: tune.neighbours(t, key, "pallas_gpu"), limit=40)
    assert found == target and seconds == 0
    assert len(timed) == len(set(timed)) <= 40
    timed = []
    tune.climb(cost, seeds, lambda t: tune.neighbours(t, key, "pallas_gpu"), limit=14)
    assert len(timed) == 14
    for allowed in (1, 5, 20):  # out of time after `allowed` timings: the best of those, nothing more
        timed = []
        seconds, found = tune.climb(cost, seeds, lambda t: tune.neighbours(t, key, "pallas_gpu"), limit=40,
                                    out_of_time=lambda allowed=allowed, timed=timed: len(timed) >= allowed)
        assert len(timed) == allowed and found in timed and seconds == min(cost(t) for t in timed[:allowed])
