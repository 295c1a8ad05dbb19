"""scripts/bench_gpu.sh (`make bench-gpu`) on CPU: its plumbing with trivial steps (STEPS), and its default
GPU steps as --dry-run lists them (their flags exist, their timeouts fit the budget). The GPU steps
themselves run on a GPU machine only."""
import contextlib
import importlib
import io
import os
import pathlib
import re
import shlex
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_gpu.sh"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"


def bench_gpu(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("OUT", "STEPS", "BUDGET_S", "MIN_STEP_S")}
    return subprocess.run(["bash", str(SCRIPT), *args], env={**environment, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def summary_rows(directory: pathlib.Path) -> list[list[str]]:
    lines = (directory / "summary.md").read_text().splitlines()
    assert lines[0].startswith("bench-gpu at commit ") and lines[2] == "| step | status | seconds |"
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[4:]]


def test_steps_run_in_order_and_failures_are_recorded_not_fatal(tmp_path):
    """A failing and a timed-out step are recorded and the later steps still run, in the repository root,
    with $PY and $DIR set; each step's output goes to its log, and the summary is printed and written."""
    steps = "\n".join([
        "# a comment, then a blank line",
        "",
        'first|20|echo "$PY" > "$DIR/python.txt"; pwd; echo to-stderr >&2',
        "failing|20|echo about to fail; exit 3",
        "hanging|1|sleep 30",
        'last|20|echo a | tr a b > "$DIR/last.txt"',  # a pipe in the command: only the first two | split
    ])
    out = tmp_path / "results"
    done = bench_gpu(str(out), STEPS=steps)
    assert done.returncode == 1, done.stderr
    rows = summary_rows(out)
    assert [(name, status) for name, status, _ in rows] == [
        ("first", "ok"), ("failing", "failed (exit 3)"), ("hanging", "timed out after 1 s"), ("last", "ok")]
    assert 1.0 <= float(rows[2][2]) < 10 and all(float(seconds) < 10 for _, _, seconds in rows)
    expected_python = str(VENV_PYTHON) if os.access(VENV_PYTHON, os.X_OK) else "python"
    assert (out / "python.txt").read_text().strip() == expected_python
    assert (out / "first.log").read_text().splitlines() == [str(ROOT), "to-stderr"]
    assert (out / "last.txt").read_text() == "b\n"
    assert "about to fail" in done.stdout  # a failed step's log tail is printed
    assert (out / "summary.md").read_text() in done.stdout


def test_out_from_the_environment_and_the_budget_skips_what_does_not_fit(tmp_path):
    """Without a directory argument $OUT is used; a step gets what is left of BUDGET_S, and a step with
    less than MIN_STEP_S left is skipped, recorded, and fails the run."""
    out = tmp_path / "from-env"
    done = bench_gpu(OUT=str(out), BUDGET_S="2", MIN_STEP_S="1", STEPS="slow|60|sleep 30\nnext|60|true")
    assert done.returncode == 1
    rows = summary_rows(out)
    assert rows[0][:2] == ["slow", "timed out after 2 s"]
    assert rows[1][0] == "next" and rows[1][1].startswith("skipped (")


@pytest.mark.parametrize("steps, message", [
    ("no-timeout|echo hi", "a step must be 'name|timeout seconds|command'"),
    ("bad name|5|echo hi", "a step must be"),
    ("zero|0|echo hi", "a step must be"),
    ("empty|5| ", "a step must be"),
    ("# only a comment", "no steps"),
])
def test_malformed_steps_are_refused_before_anything_runs(tmp_path, steps, message):
    done = bench_gpu(str(tmp_path / "never"), STEPS=steps)
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "never").exists()


def test_default_steps_cover_every_benchmark_within_the_budget_with_flags_that_exist(tmp_path):
    """--dry-run lists the GPU tests and each benchmark at its GPU preset, runs nothing, and their
    timeouts sum to at most the 480 s budget. Every --flag a benchmark step passes is one its module's
    --help lists (a wrong flag would waste a GPU run)."""
    done = bench_gpu("--dry-run", str(tmp_path / "dry"))
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "dry").exists()
    steps = re.findall(r"^\d+\. (\S+) \(timeout (\d+) s\): (.+)$", done.stdout, re.MULTILINE)
    assert [name for name, _, _ in steps] == [
        "gpu-tests", "pallas-kernels-bench", "model-bench", "qwen-model-bench", "adapters-bench", "train-bench",
        "train-memory-bench", "engine-bench"]
    assert sum(int(seconds) for _, seconds, _ in steps) <= 480
    commands = {name: command for name, _, command in steps}
    assert commands["gpu-tests"].startswith("$PY -m pytest -m gpu tests/pallas_kernels")
    assert "--preset llava-1.5-7b --dtype bfloat16" in commands["model-bench"]
    assert "--preset qwen2.5-vl-7b --dtype bfloat16" in commands["qwen-model-bench"]
    assert "--preset llava-1.5-7b --dtype bfloat16 --rank 16 --adapters 1 4 16" in commands["adapters-bench"]
    for name, _, command in steps[1:]:
        words = shlex.split(command)
        assert words[:2] == ["$PY", "-m"], name
        module = importlib.import_module(words[2])
        help_text = io.StringIO()
        with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit):
            module.main(["--help"])
        for flag in (word for word in words[3:] if word.startswith("--")):
            assert re.search(rf"{re.escape(flag)}\b", help_text.getvalue()), (name, flag)
