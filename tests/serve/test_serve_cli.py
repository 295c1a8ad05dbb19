"""`python -m serve` and `python -m serve.loadtest`: vLLM's flags reach the engine, the process serves on
127.0.0.1 and shuts down cleanly on SIGTERM (in-flight requests finish, or are cancelled after the
shutdown timeout), and the load test reports every request. The engine here is the fake one
(tests/serve/fake_engine.py), put in place of `serve.engine.Engine` in the child process."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

import serve.batch
from serve.__main__ import main as serve_main
from serve.__main__ import parser
from serve.http import create_app
from serve.loadtest import is_loopback
from serve.loadtest import main as loadtest_main
from tests.serve.fake_engine import FakeEngine
from tests.serve.live_server import LiveServer

ROOT = pathlib.Path(__file__).resolve().parents[2]

RUNNER = """
import os
import sys
import serve.batch
from tests.serve.fake_engine import FakeEngine

def from_pretrained(model, **kwargs):
    engine = FakeEngine.from_pretrained(model, **kwargs)
    engine.step_s = float(os.environ["FAKE_STEP_S"])
    return engine

serve.batch.Engine = type("Engine", (), {"from_pretrained": staticmethod(from_pretrained)})
from serve.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


class _Built(Exception):
    """Raised by the stand-in engine constructor once it has seen its arguments."""


@pytest.fixture
def engine_arguments(monkeypatch) -> dict:
    seen = {}

    def from_pretrained(model, **kwargs):
        seen.update(model=model, **kwargs)
        raise _Built

    monkeypatch.setattr(serve.batch, "Engine", type("Engine", (), {"from_pretrained": staticmethod(from_pretrained)}))
    return seen


def test_vllm_flags_reach_the_engine(tmp_path, engine_arguments):
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    with pytest.raises(_Built):
        serve_main([
            "--model", "tiny", "--served-model-name", "base", "--lora-modules", "a=/adapters/a",
            '{"name": "b", "path": "/adapters/b", "base_model_name": "base"}', "--max-loras", "4",
            "--max-lora-rank", "16", "--policy", "dlora", "--chat-template", str(template),
            "--max-model-len", "512", "--max-num-seqs", "3", "--max-waiting", "9", "--enable-lora",
            "--max-cpu-loras", "6"])
    assert engine_arguments == {
        "model": "tiny", "lora_modules": {"a": "/adapters/a", "b": "/adapters/b"}, "served_model_name": "base",
        "max_loras": 4, "max_lora_rank": 16, "max_cpu_loras": 6, "policy": "dlora", "chat_template": "{{ messages }}",
        "max_model_len": 512, "max_num_seqs": 3, "max_waiting": 9, "dtype": "float32", "backend": "auto"}
    args = parser().parse_args([])
    assert args.host == "127.0.0.1" and args.port == 8000 and not args.allow_runtime_lora_updating


@pytest.mark.parametrize("flags, message", [
    (["--max-cpu-loras", "2", "--max-loras", "4"], "at least --max-loras"),
    (["--chat-template", "/no/such/template"], "not a file"),
    (["--lora-modules", "a=/x", "a=/y"], "twice"), (["--lora-modules", "noequals"], "NAME=DIR"),
    (["--lora-modules", '{"name": "x"}'], "path"), (["--allowed-local-media-path", "/no/such/dir"], "directory")])
def test_bad_flags_are_refused_before_the_engine_is_built(flags, message, engine_arguments, capsys):
    with pytest.raises(SystemExit):
        serve_main(flags)
    assert message in capsys.readouterr().err and not engine_arguments


def test_runtime_lora_updating_follows_vllms_environment_variable(monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    monkeypatch.setenv("VLLM_API_KEY", "secret")
    args = parser().parse_args([])
    assert args.allow_runtime_lora_updating and args.api_key == "secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(*flags: str, step_s: float = 0.05) -> tuple[subprocess.Popen, str]:
    """`python -m serve` with the fake engine, decoding a token every `step_s` seconds."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FAKE_STEP_S": str(step_s)}
    process = subprocess.Popen([sys.executable, "-c", RUNNER, "--model", "fake", "--port", str(port),
                                "--lora-modules", "a=/adapters/a", *flags],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError(f"the server did not start: {process.communicate()[0]}")


def stream_lines(url: str, max_tokens: int):
    body = {"model": "a", "prompt": "shutdown", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    return httpx.stream("POST", url + "/v1/completions", json=body, timeout=30)


def test_sigterm_lets_in_flight_requests_finish_then_exits_cleanly():
    process, url = start_server()
    try:
        with stream_lines(url, max_tokens=12) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            first = next(lines)
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert first.startswith("data: {") and rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] in ("stop", "length")
        output, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0 and "Traceback" not in output, output
    assert "serving fake with adapters [a] on http://127.0.0.1" in output and "stopped" in output


def test_sigterm_cancels_what_outlives_the_shutdown_timeout():
    process, url = start_server("--shutdown-timeout", "1", step_s=0.4)
    try:
        started = time.monotonic()
        with stream_lines(url, max_tokens=12) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(lines).startswith("data: {")
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        output, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "abort"
    assert process.returncode == 0 and "Traceback" not in output, output
    assert time.monotonic() - started < 15


def test_loadtest_reports_every_request(tmp_path, capsys):
    with FakeEngine() as engine, LiveServer(create_app(engine)) as server:
        out = tmp_path / "load.json"
        assert loadtest_main(["--url", server.url, "--requests", "24", "--concurrency", "6", "--image-size", "8",
                              "--max-tokens", "5", "--out", str(out)]) == 0
        assert len(engine.finished) == 24
    summary = json.loads(out.read_text())
    assert summary["requests"] == summary["succeeded"] == 24 and summary["errors"] == {}
    assert summary["ttft_s"]["p50"] > 0 and summary["latency_s"]["p99"] >= summary["latency_s"]["p50"]
    printed = capsys.readouterr().out
    assert "24/24 succeeded" in printed and "| time to first token |" in printed and "errors: none" in printed


def test_loadtest_talks_to_loopback_only():
    assert is_loopback("http://127.0.0.1:8000") and is_loopback("http://localhost:1") and is_loopback("http://[::1]:8")
    assert not is_loopback("http://10.0.0.2:8000") and not is_loopback("http://example.com")
    with pytest.raises(SystemExit, match="loopback"):
        loadtest_main(["--url", "http://192.168.1.9:8000"])
