"""serve.bench_adapters: a CPU run at the smallest settings has every row in its table and JSON; a failing
mixture is reported in its rows (and fails the run), never skipped; the switch's byte count by hand; the
targets' verdicts on a GPU."""

import json

import jax.numpy as jnp
import pytest
from serve import bench_adapters
from serve.bench_model import random_model
from valora_jax.adapters.pool import AdapterPool
from valora_jax.config import preset

SMALLEST = ["--text-layers", "1", "--batch", "16", "--prompt-len", "8", "--new-tokens", "2", "--prefill-len", "8",
            "--repeats", "1", "--copy-bytes", str(1 << 20)]
STEP_ROWS = [(phase, "base", 0) for phase in ("decode", "prefill")] + [
    (phase, mode, n) for mode in ("unmerged", "mixture") for n in (1, 4, 16) for phase in ("decode", "prefill")]
SWITCH_ROWS = ["merge", "unmerge", "merge + unmerge", "switch (one merged adapter to another)",
               "restore (every 32 unmerges)"]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_adapters")
    result = bench_adapters.main(SMALLEST + ["--out", str(out)])
    return out, result


def test_every_row_is_measured_and_written(cpu_run):
    out, result = cpu_run
    saved = json.loads((out / "bench_adapters.json").read_text())
    assert saved == json.loads(json.dumps(result))
    rows = saved["rows"]
    assert [(r["phase"], r["mode"], r["adapters"]) for r in rows[:len(STEP_ROWS)]] == STEP_ROWS
    assert [r["phase"] for r in rows[len(STEP_ROWS):]] == SWITCH_ROWS
    assert not any("error" in r for r in rows) and all(r["ms"] > 0 for r in rows)
    for r in rows[2:len(STEP_ROWS)]:
        base = rows[0 if r["phase"] == "decode" else 1]
        assert r["over_base"] == pytest.approx(r["ms"] / base["ms"])
    for r in rows[len(STEP_ROWS):-1]:
        assert r["over_floor"] == pytest.approx(r["ms"] / r["floor_ms"])
    assert saved["meta"]["slots"] == 16 and saved["meta"]["rank"] == saved["meta"]["max_rank"] == 16
    assert [(t["met"], t["status"]) for t in saved["targets"]] == [(None, "CPU: not a target")] * 2

    table = (out / "bench_adapters.md").read_text()
    assert table.startswith("tiny (1 language-model layers) float32 on cpu")
    lines = table.splitlines()
    for phase, mode, n in STEP_ROWS:
        assert sum(line.startswith(f"| {phase} | {mode} | {n or '-'} | ") for line in lines) == 1, (phase, mode, n)
    for name in SWITCH_ROWS:
        assert sum(line.startswith(f"| {name} | ") for line in lines) == 1, name
    assert "- decode step with 4 distinct rank-16 adapters (unmerged) <= 1.15x the base step: " in table
    assert "- switch (one merged adapter to another) <= 1.5x its byte floor: " in table
    assert "failed" not in table


def test_a_failing_mixture_is_reported_in_its_rows_and_fails_the_run(cpu_run, tmp_path, monkeypatch):
    def broken_merge(self, name):
        raise RuntimeError(f"cannot merge {name}")

    monkeypatch.setattr(AdapterPool, "merge", broken_merge)
    with pytest.raises(SystemExit, match="11 measurement"):
        bench_adapters.main(SMALLEST + ["--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_adapters.json").read_text())
    failed = [r for r in saved["rows"] if "error" in r]
    assert [r.get("mode", r["phase"]) for r in failed] == ["mixture"] * 6 + SWITCH_ROWS
    assert all(r["error"] == "RuntimeError: cannot merge adapter_0" and "ms" not in r for r in failed)
    assert all("ms" in r for r in saved["rows"] if r.get("mode") in ("base", "unmerged"))
    assert saved["targets"][1]["status"] == "not measured (RuntimeError: cannot merge adapter_0)"
    table = (tmp_path / "bench_adapters.md").read_text()
    assert table.count("| failed: RuntimeError: cannot merge adapter_0 |") == 11


def test_switch_bytes_count_the_seven_projections_by_hand():
    model = random_model("tiny", jnp.float32, seed=0, text_layers=2)
    text = preset("tiny").text
    h, inter, q, kv = (text.hidden_size, text.intermediate_size, text.num_attention_heads * text.head_dim,
                       text.num_key_value_heads * text.head_dim)
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]  # q k v o gate up down
    weights, adapter = bench_adapters.switch_bytes(model, rank=3)
    assert weights == 2 * 4 * sum(i * o for i, o in shapes)
    assert adapter == 2 * 4 * 3 * sum(i + o for i, o in shapes)


def test_targets_on_a_gpu_say_met_or_not():
    rows = [{"phase": "decode", "mode": "unmerged", "adapters": 4, "over_base": 1.1},
            {"phase": bench_adapters.SWITCH, "over_floor": 2.0}]
    meta = {"platform": "gpu", "rank": 16}
    assert [(t["met"], t["status"]) for t in bench_adapters.targets(rows, meta)] == [(True, "met"), (False, "NOT met")]
    rows[0]["over_base"], rows[1]["over_floor"] = 1.2, 1.4
    assert [t["met"] for t in bench_adapters.targets(rows, meta)] == [False, True]
    found = bench_adapters.targets(rows, dict(meta, rank=8))
    assert (found[0]["met"], found[0]["status"]) == (None, "not measured (the run's rank is 8)")
    found = bench_adapters.targets(rows[1:], meta)
    assert (found[0]["met"], found[0]["status"]) == (None, "not measured (--adapters has no 4)")
