"""The simulator against the live engine on the same trace (the honesty check of `python -m serve.bench_serving`),
and the benchmark's own plumbing.

The honesty check replays one Poisson trace (8 requests/s for 3 s, 4 adapters at skew 0.8, the tiny model on
CPU) live under valora and unmerged with step timings on, and simulates the same trace on two profiles:

- fitted to the steps of that very run ("in-sample": prefill and decode from the policy's own run, switches
  from valora's): the step costs are those the engine paid, whatever the machine's load, so what is left is
  whether the simulator schedules, batches and times requests as the engine does.
- measured beforehand on another trace (seed 1) with `serve.profile`'s code ("out of sample"), as
  `bench_serving` uses a committed profile; between the two the machine's speed changes.

The bounds come from 14 such runs per policy on this 2-core machine shared with other work, at load
averages from 2 to 11: in-sample, simulated over live average token latency 0.82-1.18 (0.98-1.08 when the
machine was quiet), per-request |sim - live| / live 13-60% on average, rank correlation of per-request
latencies 0.53-0.87; out of sample, 0.46-1.63. Replaying one trace twice live gave average latencies up
to 1.40x apart and per-request differences of 17-60%: the simulator is as close to the engine as the
engine is to itself. The test holds: in-sample ratio within 1.4x, mean per-request error under 90%, rank
correlation over 0.3 (a simulator that batched or ordered requests differently would lose it); out of
sample within 2.5x.
"""

import dataclasses
import json
import math

import numpy as np
import pytest

from serve.bench_engine import requests_of, workload
from serve.bench_serving import goal, main, parse_args, simulated, tracking
from serve.cost_profile import LinearCost, fit_profile
from serve.profile import profile_engine, running_engine, timed_replay
from serve.summary import RequestResult

pytestmark = pytest.mark.slow

ARGS = parse_args(["--adapters", "4", "--max-loras", "4", "--prompt-max", "8", "--output-max", "12",
                   "--max-model-len", "64", "--duration", "3", "--policies", "valora", "unmerged"])
RATE = 8.0


@pytest.fixture(scope="module")
def runs():
    """The live results of the trace per policy, the profile fitted to their steps, the profile measured before."""
    with running_engine(ARGS, workload(ARGS, RATE, ARGS.seed + 1)) as engine:
        before, _ = profile_engine(engine, ARGS, [RATE], name="measured-before")
        requests = requests_of(workload(ARGS, RATE, ARGS.seed), engine.config, ARGS.seed)
        timed = {policy: timed_replay(engine, requests, policy) for policy in ARGS.policies}
    switches = fit_profile(timed["valora"][1], name="in-sample", image_tokens=before.image_tokens)
    in_sample = {policy: dataclasses.replace(
        switches, prefill=LinearCost.fit([(t.prefill, t.prefill_s) for t in timings if t.prefill]),
        decode=LinearCost.fit([(t.decode, t.decode_s) for t in timings if t.decode]))
        for policy, (_, timings) in timed.items()}
    return {policy: results for policy, (results, _) in timed.items()}, in_sample, before


@pytest.mark.parametrize("policy", ARGS.policies)
def test_the_simulator_tracks_the_engine_on_the_same_trace(runs, policy):
    results, in_sample, before = runs
    live = results[policy]
    specs = workload(ARGS, RATE, ARGS.seed)
    same = tracking(live, simulated(specs, policy, in_sample[policy], ARGS.slots, ARGS.slo_ttft)[1])
    assert abs(math.log(same["sim_over_live_latency"])) <= math.log(1.4), same
    assert same["latency_mean_rel_error"] <= 0.9, same
    assert same["latency_rank_correlation"] >= 0.3, same
    other = tracking(live, simulated(specs, policy, before, ARGS.slots, ARGS.slo_ttft)[1])
    assert abs(math.log(other["sim_over_live_latency"])) <= math.log(2.5), other


def result(rid, arrival, first, finish):
    return RequestResult(rid, "a", arrival, first, finish, prompt_tokens=10, output_tokens=5)


def test_tracking_by_hand():
    live = [result("x", 0.0, 1.0, 2.0), result("y", 1.0, 1.5, 3.5)]
    sim = [result("y", 1.0, 2.0, 4.0), result("x", 0.0, 0.5, 2.0)]
    t = tracking(live, sim)
    assert t["sim_over_live_latency"] == pytest.approx((2 + 3) / (2 + 2.5))
    assert t["sim_over_live_ttft"] == pytest.approx((0.5 + 1) / (1 + 0.5))
    assert t["latency_mean_rel_error"] == pytest.approx((0 + 0.5 / 2.5) / 2)
    assert t["latency_rank_correlation"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no simulated twin"):
        tracking(live, sim[:1])


def test_goal_by_hand():
    row = lambda policy, skew, rate, latency: {"policy": policy, "skew": skew, "rate": rate,
                                               "avg_token_latency_s": latency}
    met = [row("valora", 0.8, 2, 0.7), row("unmerged", 0.8, 2, 1.0), row("dlora", 0.8, 2, 0.9),
           row("valora", 0.2, 2, 1.0), row("unmerged", 0.2, 2, 1.0)]
    verdict = goal(met)
    assert verdict["met"] and [c["best_baseline"] for c in verdict["checks"]] == ["unmerged", "dlora"]
    assert verdict["checks"][1]["reduction"] == pytest.approx(1 - 0.7 / 0.9)
    assert not goal(met[:3] + [row("valora", 0.2, 2, 1.01), met[4]])["met"]  # worse at low skew
    assert not goal([row("valora", 0.8, 2, 0.75), row("unmerged", 0.8, 2, 0.9)])["met"]  # 17% is short of 20%


def test_cli_simulated_only(tmp_path, capsys):
    main(["--no-live", "--policies", "valora", "unmerged", "--sim-rates", "2", "8", "--sim-skews", "0.8", "0.2",
          "--sim-duration", "5", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench_serving.json").read_text())
    assert data["live"] == [] and len(data["simulated"]) == 2 * 2 * 2
    assert {r["profile"] for r in data["simulated"]} == {"cpu-tiny"}
    assert len(data["goal"]["checks"]) == 4 and isinstance(data["goal"]["met"], bool)
    text = (tmp_path / "bench_serving.md").read_text()
    assert "Simulated on profile `cpu-tiny`" in text and "| 8 | valora |" in text
    assert (tmp_path / "bench_serving.png").read_bytes()[:4] == b"\x89PNG"
    assert ("goal met" in capsys.readouterr().err) == data["goal"]["met"]
    with pytest.raises(SystemExit, match="--live-rates"):
        main(["--no-live", "--profile", "measure", "--out", str(tmp_path)])


def test_tune_ranks_valoras_threshold_settings(tmp_path):
    """--tune: every setting of TUNE_GRID, ranked by its worst reduction at skew 0.8, the defaults' row shown;
    a setting's reductions recomputed from its own simulation agree."""
    from serve import bench_serving
    from serve.cost_profile import load_profile
    from serve.simulator import simulate

    result = main(["--no-live", "--tune", "--sim-rates", "8", "--sim-skews", "0.8", "0.2", "--sim-duration", "5",
                   "--out", str(tmp_path)])
    tuning = result["tuning"]
    assert len(tuning) == np.prod([len(v) for v in bench_serving.TUNE_GRID.values()])
    worst = [t["high_skew_reduction"] for t in tuning]
    assert worst == sorted(worst, reverse=True)
    text = (tmp_path / "bench_serving.md").read_text()
    assert "valora's thresholds tuned on profile `cpu-tiny`" in text and "(defaults) |" in text
    top = tuning[0]
    params = {k: top[k] for k in bench_serving.TUNE_GRID}
    args = bench_serving.parse_args(["--no-live", "--sim-duration", "5"])
    spec = bench_serving.sweep_spec(args, 8.0, 0.8)
    base = min(r["avg_token_latency_s"] for r in result["simulated"] if r["skew"] == 0.8 and r["policy"] != "valora")
    mine = simulate(spec, policy="valora", profile=load_profile("cpu-tiny"), policy_params=params,
                    limits=bench_serving.Limits(max_batch=args.slots)).summary()["avg_token_latency_s"]
    assert top["high_skew_reduction"] == pytest.approx(1 - mine / base)
