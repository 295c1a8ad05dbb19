"""`python -m train` over 2 processes of 4 CPU devices each (jax.distributed on 127.0.0.1, gloo collectives)
against 1 process of 8 devices: the same loss curve, scores and adapter; the run folder written once; and a
multi-process run resumed from its checkpoint ends with the adapter of the uninterrupted run.

Each job runs in its own processes (the device count is fixed when JAX starts); a process that fails or
outlives the deadline gets every process of the test killed and its log printed.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

import train.distributed
from train.cli import main
from train.run_folder import RECORD_FILE

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEADLINE_S = 240  # per job; the jobs take about 30 s on 2 idle cores
TASKS = """
tasks:
  - source: embedded/colour
    requirement: 0.0
    n_train: 16
    n_val: 4
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


Job = list[tuple[subprocess.Popen, pathlib.Path]]  # the processes of one job and their log files


def start(out: pathlib.Path, processes: int, devices: int, flags: list[str]) -> Job:
    """Start `python -m train --out out *flags` as `processes` processes of `devices` CPU devices each."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    for name in (*train.distributed.PROCESS_COUNT_VARIABLES, train.distributed.TPU_HOSTS_VARIABLE):
        env.pop(name, None)  # under a launcher (CI in a SLURM job, say) the jobs still run as the flags say
    port = free_port()
    started = []
    for index in range(processes):
        hosts = (["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(processes),
                  "--process-id", str(index)] if processes > 1 else [])
        log = out.with_name(f"{out.name}.{index}.log")
        with log.open("w") as file:
            command = [sys.executable, "-m", "train", "--out", str(out), *flags, *hosts]
            started.append((subprocess.Popen(command, cwd=ROOT, env=env, stdout=file, stderr=subprocess.STDOUT), log))
    return started


def finish(jobs: list[Job]) -> list[list[str]]:
    """Wait for every process of `jobs`; returns each one's log. On a failure or at the deadline every
    process still running is killed and the test fails with the logs' ends."""
    processes = [p for job in jobs for p, _ in job]
    deadline = time.monotonic() + DEADLINE_S
    try:
        while any(p.poll() is None for p in processes):
            if time.monotonic() > deadline or any(p.returncode not in (None, 0) for p in processes):
                break
            time.sleep(0.2)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = [[log.read_text() for _, log in job] for job in jobs]
    if any(p.returncode != 0 for p in processes):
        ends = "\n".join(f"--- {log} (exit {p.returncode})\n{log.read_text()[-3000:]}"
                         for job in jobs for p, log in job)
        pytest.fail(f"a training process failed or ran past {DEADLINE_S} s:\n{ends}")
    return logs


def adapter(out: pathlib.Path) -> dict[str, np.ndarray]:
    saved = out / "adapters" / "adapter_0"
    return {**load_file(saved / "adapter_model.safetensors"), **load_file(saved / "head.safetensors")}


def metrics(out: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_adapter(got: dict, expected: dict, atol: float) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=atol, err_msg=name)


@pytest.mark.slow
def test_two_processes_train_as_one_of_eight_devices_write_once_and_resume(tmp_path, golden_dir):
    """One test, so its three jobs run once whatever the test workers are (they take about 30 s on 2 idle
    cores): the 1 x 8 and 2 x 4 jobs side by side, then the 2 x 4 job resumed after losing its last step."""
    (tmp_path / "tasks.yaml").write_text(TASKS)
    flags = ["--model", str(golden_dir / "llava_mha"), "--tasks", str(tmp_path / "tasks.yaml"), "--steps", "3",
             "--batch-size", "8", "--data-parallel", "8", "--rank", "2", "--towers", "language_model",
             "--eval-batch-size", "4", "--checkpoint-every", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    _, (first, second) = finish([start(one, 1, 8, flags), start(two, 2, 4, flags)])

    # the same loss curve, scores and adapter
    expected, got = metrics(one), metrics(two)
    assert [(m["step"], m["adapter"]) for m in got] == [(1, "colour"), (2, "colour"), (3, "colour"), (3, "colour")]
    assert [(m["step"], m["adapter"]) for m in got] == [(m["step"], m["adapter"]) for m in expected]
    np.testing.assert_allclose([m["loss"] for m in got], [m["loss"] for m in expected], rtol=1e-5)
    assert len({m["loss"] for m in got[:3]}) == 3  # the adapter moves: a step that changed nothing would repeat
    assert got[-1]["eval"] == expected[-1]["eval"]
    finished = adapter(two)
    assert_same_adapter(finished, adapter(one), atol=1e-6)
    assert json.loads((one / RECORD_FILE).read_text())["flags"]["processes"] == 1
    assert json.loads((two / RECORD_FILE).read_text())["flags"]["processes"] == 2

    # process 0 alone logs and reports (metrics.jsonl above has no line twice); each saves its data position
    assert "Adapter report" in first and "INFO train.run: colour: colour" in first
    assert "Adapter report" not in second and "INFO train" not in second
    training = two / "trainings" / "colour"
    data = training / "checkpoints" / "2" / "data"
    assert sorted(p.name for p in data.glob("*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]

    # a kill after step 2's checkpoint: step 3's checkpoint and everything written after it are gone
    for lost in (training / "checkpoints" / "3", training / "adapter", two / "adapters"):
        shutil.rmtree(lost)
    for lost in (training / "result.json", two / "report.json", two / "report.md", two / "accuracy.png"):
        lost.unlink()
    ((first, _),) = finish([start(two, 2, 4, ["--resume"])])
    assert "colour: resuming from step 2 of 3" in first and "reusing the base model's scores" in first
    assert_same_adapter(adapter(two), finished, atol=1e-7)
    resumed = metrics(two)[len(got):]
    assert [m["step"] for m in resumed] == [3, 3]
    assert resumed[0]["loss"] == pytest.approx(got[2]["loss"], abs=1e-6)


@pytest.mark.parametrize("environ, processes", [
    ({}, 1),
    ({"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "4"}, 1),  # a batch script, not an srun step
    ({"SLURM_STEP_NUM_TASKS": "4"}, 4),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, 2),
    ({"TPU_WORKER_HOSTNAMES": "t1k-0,t1k-1,t1k-2,t1k-3"}, 4),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, 1),
])
def test_the_launchers_process_count_is_read_from_the_environment(environ, processes):
    assert train.distributed.cluster_processes(environ) == processes


@pytest.mark.parametrize("flags, environ, expected", [
    ([], {}, []),  # one process: jax.distributed is left alone
    (["--coordinator-address", "10.0.0.1:1234", "--num-processes", "4", "--process-id", "3"], {},
     [("10.0.0.1:1234", 4, 3)]),
    (["--num-processes", "4"], {}, [(None, 4, None)]),  # JAX finds the rest in the environment
    ([], {"SLURM_STEP_NUM_TASKS": "4"}, [(None, None, None)]),  # JAX's own cluster detection
])
def test_the_job_joins_jax_distributed_as_its_flags_or_environment_say(flags, environ, expected, monkeypatch,
                                                                      root_logging):
    calls = []
    monkeypatch.setattr(train.distributed.jax.distributed, "initialize", lambda *args: calls.append(args))
    for name in (*train.distributed.PROCESS_COUNT_VARIABLES, train.distributed.TPU_HOSTS_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("train.run.run", lambda config: None)
    main(flags)
    assert calls == expected
