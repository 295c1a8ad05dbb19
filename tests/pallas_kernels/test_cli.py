"""The tune and bench tools run end to end on CPU (interpret mode, tiny grids); no timing is checked."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import api, bench, tune
from pallas_kernels import tiles as tiles_module
from pallas_kernels.tiles import ShapeKey, TileTable
from pallas_kernels.workload import Workload
from tests.pallas_kernels.numpy_reference import lora_delta_f64, relative_error

LORA_ARGS = ("x", "a_pool", "b_pool", "slot_ids", "ranks", "scales")


def test_tune_writes_a_table_whose_lookups_run_correctly(tmp_path, monkeypatch):
    out = tmp_path / "cpu.json"
    tune.main(["--quick", "--interpret", "--backend", "pallas_gpu", "--out", str(out)])
    table = TileTable.load(out)
    assert table.backend == "pallas_gpu" and table.device_kind and table.jax_version
    grid = tune.shape_grid(quick=True)
    keys = {ShapeKey.of(w.tokens, w.d_in, w.d_out, w.rank, w.pool, fused) for w in grid for fused in (False, True)}
    assert set(table.entries) == keys and len(keys) < 2 * len(grid)  # two workloads share a key
    # every workload's calls, through the public API, run with the entry tuned for their key
    monkeypatch.setattr(tiles_module, "table_path", lambda kind=None: out)
    monkeypatch.setattr(tiles_module, "_loaded", {})
    used = []
    monkeypatch.setattr(api, "_batched_lora", lambda *args, tiles, **kw: used.append(tiles))
    monkeypatch.setattr(api, "_lora_projection", lambda *args, tiles, **kw: used.append(tiles))
    for w in grid:
        data = w.arrays()
        pk.batched_lora(*(data[k] for k in LORA_ARGS), backend="pallas_gpu")
        pk.lora_projection(data["x"], data["w"], *(data[k] for k in LORA_ARGS[1:]), backend="pallas_gpu")
        assert used[-2:] == [table.entries[w.key(False)], table.entries[w.key(True)]]
    monkeypatch.undo()
    # an unseen shape: the nearest entry, fitted, must drive a correct kernel
    rng = np.random.default_rng(3)
    T, d_in, d_out, N, R = 27, 64, 96, 3, 8
    x = jnp.asarray(rng.standard_normal((T, d_in)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((N, d_in, R)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((N, R, d_out)), jnp.float32)
    slots = jnp.asarray(rng.integers(-1, N, T), jnp.int32)
    ranks, scales = jnp.asarray([8, 5, 2], jnp.int32), jnp.asarray([1.0, 0.5, 2.0], jnp.float32)
    tiles = table.lookup(ShapeKey.of(T, d_in, d_out, R, N))
    out = pk.batched_lora(x, a, b, slots, ranks, scales, backend="pallas_gpu", interpret=True, tiles=tiles)
    assert relative_error(out, lora_delta_f64(x, a, b, slots, ranks, scales)) <= 1e-5


def test_tune_out_of_minutes_keeps_each_keys_first_tiles(tmp_path, capsys):
    """A budget spent at once: every key times only its first seed (the heuristic's tiles) and keeps it."""
    out = tmp_path / "cpu.json"
    tune.main(["--quick", "--interpret", "--backend", "pallas_gpu", "--out", str(out), "--shape", "16,8,2",
               "--minutes", "1e-9"])
    table = TileTable.load(out)
    [workload] = tune.shape_grid(True, ["16,8,2"])
    assert set(table.entries) == {workload.key(False), workload.key(True)}
    for key, tiles in table.entries.items():
        assert tiles == tune.candidates(key, "pallas_gpu", limit=1)[0]
    assert capsys.readouterr().out.count(" us\n") == 2  # one timing line per key
    with pytest.raises(SystemExit):
        tune.main(["--quick", "--interpret", "--backend", "pallas_gpu", "--minutes", "0"])


def test_tune_never_picks_tiles_that_compute_wrongly(tmp_path, monkeypatch, capsys):
    """Slot-sorted tiles made the fastest and wrong (their output off by 10%): tune skips them, so the
    heuristic's natural-order tiles win; made fastest and right, they win (so the check is what
    decided)."""
    def fake_timer(data, key, tiles, backend, args):
        return lambda repeats=3: 1.0 if tiles.sort else 2.0

    def fake_batched_lora(*args, tiles=None, **kw):
        out = real_batched_lora(*args, tiles=tiles, **kw)
        return out * 1.1 if tiles is not None and tiles.sort and wrong else out

    real_batched_lora = api.batched_lora
    monkeypatch.setattr(tune, "_tile_timer", fake_timer)
    monkeypatch.setattr(api, "batched_lora", fake_batched_lora)
    args = ["--quick", "--interpret", "--backend", "pallas_gpu", "--shape", "16,8,2", "--max-candidates", "2"]
    [workload] = tune.shape_grid(True, ["16,8,2"])
    for wrong in (True, False):
        table = tune.main([*args, "--out", str(tmp_path / f"{wrong}.json")])
        assert table.entries[workload.key(False)].sort is not wrong
        printed = capsys.readouterr().out
        assert ("wrong result" in printed) is wrong
        # the delta's one right finalist has nothing to be confirmed against
        assert (f"{workload.key(False)} finalists" in printed) is not wrong


def test_tune_writes_the_finalist_fastest_when_timed_again_in_turn(tmp_path, monkeypatch, capsys):
    """The climb's first timings make slot-sorted tiles fastest, every later timing the others:
    the entry written follows the finalists' alternating re-timing, or with --confirm-rounds 0 the
    climb's first timings."""
    def fake_timer(data, key, tiles, backend, args):
        timings = []

        def seconds(repeats=3):
            timings.append(repeats)
            return 2.0 if not tiles.sort else 1.0 if len(timings) == 1 else 3.0
        return seconds

    monkeypatch.setattr(tune, "_tile_timer", fake_timer)
    args = ["--quick", "--interpret", "--backend", "pallas_gpu", "--shape", "16,8,2", "--max-candidates", "2"]
    [workload] = tune.shape_grid(True, ["16,8,2"])
    for rounds, sort_wins in (("2", False), ("0", True)):
        table = tune.main([*args, "--confirm-rounds", rounds, "--out", str(tmp_path / f"{rounds}.json")])
        assert table.entries[workload.key(False)].sort is sort_wins
        assert ("median of 2 alternating rounds" in capsys.readouterr().out) is not sort_wins
    with pytest.raises(SystemExit):
        tune.main([*args, "--confirm-rounds", "-1"])


def test_alternate_times_finalists_in_turn_and_keeps_their_medians():
    """Each round times every finalist once, starting one further along; one spike leaves a median."""
    seconds = {"a": iter([1.0, 9.0, 1.0]), "b": iter([1.5] * 3), "c": iter([2.0] * 3)}
    order = []
    timers = {name: lambda name=name: order.append(name) or next(seconds[name]) for name in seconds}
    assert tune.alternate(timers, rounds=3) == {"a": 1.0, "b": 1.5, "c": 2.0}
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_bench_prints_every_row_and_writes_json(tmp_path, capsys):
    result = bench.main(["--quick", "--interpret", "--backend", "pallas_gpu", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written == json.loads(json.dumps(result))
    cases = [*bench.QUICK, *bench.PACKED]
    assert [row["case"] for row in written["rows"]] == cases
    markdown = (tmp_path / "bench.md").read_text()
    for case in cases:
        assert f"| {case} |" in markdown and f"| {case} |" in printed
    for row in written["rows"]:
        assert set(bench.COLUMNS) <= set(row)
        assert all(np.isfinite(row[c]) and row[c] > 0 for c in bench.COLUMNS[4:])
        assert row["vLLM / kernel"] is None  # tiny shapes: no vLLM figure applies, so no target either
        assert row["sort us"] is None  # T <= 64: the heuristic sorts from SORT_MIN_TOKENS on
    assert written["targets"] == [] and "Targets" not in printed


def test_packed_workloads_hold_whole_requests_of_one_adapter():
    """requests=n: the tokens are n contiguous runs, every chosen adapter owning one when n allows;
    requests=None keeps the anchors' per-token draw (the same arrays as before the option existed)."""
    for tokens, adapters, requests in [(64, 2, 4), (4096, 4, 8), (33, 4, 3), (5, 1, 5), (16, 3, 1)]:
        w = Workload(tokens, 8, 8, 4, adapters, pool=8, requests=requests)
        slots = np.asarray(w.arrays(seed=tokens)["slot_ids"])
        changes = int(np.count_nonzero(np.diff(slots)))
        assert slots.shape == (tokens,) and changes <= requests - 1
        assert np.unique(slots).size == min(adapters, requests)
    drawn = Workload(64, 8, 8, 4, 2, pool=8).arrays(seed=1)
    rng = np.random.default_rng(1)
    chosen = rng.choice(8, size=2, replace=False)
    for shape in [(64, 8), (8, 8), (8, 8, 4), (8, 4, 8)]:
        rng.standard_normal(shape, np.float32)
    np.testing.assert_array_equal(drawn["slot_ids"], rng.choice(chosen, size=64))


def test_shape_specs_parse_with_optional_requests_and_fail_clearly():
    assert Workload.parse("4096,64,4,8", 4096, 64) == Workload(4096, 4096, 4096, 64, 4, pool=64, requests=8)
    assert Workload.parse("32,16,4", 128, 8) == Workload(32, 128, 128, 16, 4, pool=8)
    for bad in ["32,16", "32,16,4,8,1", "32,x,4", "8,16,2,9", "8,16,2,0"]:
        with pytest.raises(ValueError, match="requests|T,RANK,ADAPTERS"):
            Workload.parse(bad, 128, 8)
    assert [w.label for w in tune.shape_grid(True, ["16,8,2", "64,8,2,4"])] == ["a2", "a2 in 4 requests"]
    with pytest.raises(SystemExit):
        tune.main(["--quick", "--interpret", "--backend", "pallas_gpu", "--shape", "16,8"])


def test_bench_runs_only_the_cases_asked_for(tmp_path):
    """Also: a row whose delta sorts (T >= SORT_MIN_TOKENS) times the sort alone."""
    args = ["--quick", "--interpret", "--backend", "pallas_gpu", "--out", str(tmp_path), "--calls", "1"]
    sorting_tokens = tiles_module.SORT_MIN_TOKENS
    result = bench.main([*args, "--case", "prefill-8-requests", "--shape", "8,4,2,2", "--case", "T8-r4-a2-2requests",
                         "--shape", f"{sorting_tokens},4,2", "--case", f"T{sorting_tokens}-r4-a2"])
    assert [row["case"] for row in result["rows"]] == [
        "prefill-8-requests", "T8-r4-a2-2requests", f"T{sorting_tokens}-r4-a2"]
    assert [row["sort us"] is None for row in result["rows"]] == [True, True, False]
    assert result["rows"][2]["sort us"] > 0
    with pytest.raises(SystemExit, match="no case \\['decode'\\]"):
        bench.main([*args, "--case", "decode"])


def test_bench_compares_only_the_anchor_shapes_with_vllm():
    assert bench.vllm_us("decode-few", Workload(32, 4096, 4096, 16, 4)) == 8.6
    assert bench.vllm_us("prefill", Workload(4096, 4096, 4096, 64, 4)) == 297.0
    assert bench.vllm_us("decode-few", Workload(32, 4096, 4096, 16, 4, pool=8)) is None
    assert bench.vllm_us("decode-few", Workload(8, 128, 128, 8, 2, pool=8)) is None  # --quick's decode-few
    assert bench.vllm_us("T32-r16-a4", Workload(32, 4096, 4096, 16, 4)) is None


def test_bench_targets_are_those_of_benchmarks_md():
    """Rows as the H100 measured them (PERF.md round 5, rounded): what each target reads and asks."""
    def row(case, floor, kernel, fused_over_base):
        return {"case": case, "floor us": floor, "kernel us": kernel, "kernel / floor": kernel / floor,
                "fused / base": fused_over_base, "vLLM / kernel": bench.VLLM_US[case] / kernel}

    rows = [row("decode-few", 0.53, 8.84, 1.47), row("decode-many", 1.75, 10.4, 1.63),
            row("decode-large", 4.21, 21.5, 1.93), row("prefill", 23.9, 90.6, 1.58),
            {**row("decode-large-r64", 12.6, 33.2, 2.4), "vLLM / kernel": None}]  # not the anchor shape
    found = {(t["case"], t["target"]): t["met"] for t in bench.targets(rows)}
    assert found == {
        ("decode-few", "kernel us <= 3.0"): False, ("decode-few", "vLLM / kernel >= 1.5"): False,
        ("decode-few", "fused / base <= 1.1"): False,
        ("decode-many", "kernel us <= 3.0"): False, ("decode-many", "vLLM / kernel >= 1.5"): False,
        ("decode-large", "kernel / floor <= 1.5"): False, ("decode-large", "vLLM / kernel >= 1.5"): False,
        ("prefill", "kernel / floor <= 1.5"): False, ("prefill", "vLLM / kernel >= 1.5"): True,
        ("prefill", "fused / base <= 1.05"): False,
    }
    fast = row("decode-few", 0.53, 2.5, 1.05)
    assert all(t["met"] for t in bench.targets([fast])) and len(bench.targets([fast])) == 3
    assert "Targets (BENCHMARKS.md): 1 of 10 met" in bench.markdown([], bench.targets(rows))
