"""The serving simulator (serve.simulator) and its metrics (serve.summary): hand-computed timelines
with a trivially computable profile, invariants on random workloads under every policy, replicas
behind each router, rejection and stall detection."""

import json
import math

import pytest

from serve.batching import Limits, Plan
from serve.cost_profile import CostProfile, LinearCost, load_profile
from serve.policy import POLICIES, Policy
from serve.simulator import simulate, to_request
from serve.summary import RequestResult, markdown_table, summarize
from serve.workload import RequestSpec, WorkloadSpec, generate

# Prefill: 1 s + 10 ms per prompt token; decode: 0.1 s + 0.1 s per row; a merge or unmerge 0.5 s.
HAND = CostProfile("hand", prefill=LinearCost(fixed_s=1.0, per_token_s=0.01),
                   decode=LinearCost(fixed_s=0.1, per_token_s=0.1), merge_s=0.5, unmerge_s=0.5)
THREE = [RequestSpec("r0", 0.0, "A", 100, 3), RequestSpec("r1", 0.5, "B", 50, 2), RequestSpec("r2", 0.6, "A", 10, 1)]


def times(result):
    """(first token, finish) of each request, flattened by id for pytest.approx."""
    return {f"{r.id}.{k}": t for r in result.results for k, t in (("first", r.first_token), ("finish", r.finish))}


def flat(expected):
    return {f"{i}.{k}": t for i, (first, finish) in expected.items() for k, t in (("first", first), ("finish", finish))}


def test_unmerged_timeline_by_hand():
    # t=0: prefill r0 (1 + 1.0) -> first token 2.0. t=2.0: prefill r1 (1 + 0.5) -> 3.5, then decode r0
    # (0.1 + 0.1) -> 3.7. t=3.7: both slots full, decode r0, r1 (0.1 + 0.2) -> 4.0: both finish.
    # t=4.0: prefill r2 (1 + 0.1) -> 5.1, its only token.
    result = simulate(THREE, policy="unmerged", profile=HAND, limits=Limits(max_batch=2))
    expected = {"r0": (2.0, 4.0), "r1": (3.5, 4.0), "r2": (5.1, 5.1)}
    assert times(result) == pytest.approx(flat(expected))
    assert (result.switches, result.steps) == (0, 4)


def test_merged_fcfs_timeline_by_hand_with_switches():
    # t=0: merge A (0.5), prefill r0 (2.0) -> 2.5. r1 (B) heads the queue: r0 decodes alone, 2.7 and
    # 2.9 (done). t=2.9: switch from A to B (the profile has no switch_s: unmerge + merge, 1.0), prefill r1
    # (1.5) -> 5.4; r2 (A) now heads the queue: r1 decodes alone -> 5.6 (done). t=5.6: switch back to A
    # (1.0), prefill r2 (1.1) -> 7.7.
    result = simulate(THREE, policy="merged-fcfs", profile=HAND, limits=Limits(max_batch=2))
    expected = {"r0": (2.5, 2.9), "r1": (5.4, 5.6), "r2": (7.7, 7.7)}
    assert times(result) == pytest.approx(flat(expected))
    assert result.switches == 3  # merge A, switch to B, switch to A
    assert result.switch_seconds == pytest.approx(0.5 + 1.0 + 1.0)
    assert result.mode_seconds == pytest.approx({"merged": 7.7})


def test_summary_of_the_hand_timeline():
    result = simulate(THREE, policy="unmerged", profile=HAND, limits=Limits(max_batch=2))
    s = summarize(result.results, slo_ttft=2.0)
    latencies = [4.0, 3.5, 4.5]
    lengths = [103, 52, 11]
    assert s["avg_token_latency_s"] == pytest.approx(sum(latencies) / sum(lengths))
    assert s["ttft_p50_s"] == pytest.approx(3.0)  # TTFTs 2.0, 3.0, 4.5
    assert s["tpot_mean_s"] == pytest.approx((1.0 + 0.5) / 2)  # r0: (4 - 2) / 2, r1: (4 - 3.5) / 1
    assert s["throughput_rps"] == pytest.approx(3 / 5.1)
    assert s["output_tokens_per_s"] == pytest.approx(6 / 5.1)
    assert s["slo_attainment"] == pytest.approx(1 / 3)
    table = markdown_table([{**s, "policy": "unmerged"}])
    assert table.splitlines()[2].startswith("| unmerged | ")


@pytest.fixture(scope="module")
def mixed_workload():
    spec = WorkloadSpec(rate=12, duration=30, adapters=6, skew=0.7, base_share=0.1, prompt_max=96,
                        images=(0, 1), output_cap=40, seed=5)
    return generate(spec)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_invariants_under_every_policy(policy, mixed_workload):
    profile = load_profile("cpu-tiny")
    limits = Limits(max_batch=8, max_prefill_tokens=512, kv_tokens=2000)
    result = simulate(mixed_workload, policy=policy, profile=profile, limits=limits)
    assert not result.rejected
    by_id = {r.id: r for r in result.results}
    assert sorted(by_id) == sorted(s.id for s in mixed_workload)  # every request finishes, once
    for spec in mixed_workload:
        r = by_id[spec.id]
        assert r.output_tokens == spec.output_tokens  # tokens conserved
        assert r.prompt_tokens == spec.prompt_tokens + spec.images * profile.image_tokens
        # Service time alone: its prefill in the cheaper mode (its adapter merged, or unmerged: a merged step
        # may cost more) and its decode steps with no LoRA term.
        alone = to_request(spec, profile)
        prefill = min(profile.prefill_s([alone], mode, merged)
                      for mode, merged in (("merged", spec.adapter), ("unmerged", None)))
        decode_step = profile.decode.fixed_s + profile.decode.per_token_s
        assert r.first_token - r.arrival >= prefill - 1e-9
        assert r.finish - r.first_token >= (spec.output_tokens - 1) * decode_step - 1e-9
    summary = result.summary()
    assert summary["requests"] == len(mixed_workload) and summary["steps"] == result.steps
    if policy == "unmerged":
        assert result.switches == 0
    assert sum(result.mode_seconds.values()) <= summary["duration_s"] * (1 + 1e-9)


def test_simulation_is_deterministic(mixed_workload):
    run = lambda: simulate(mixed_workload, policy="valora", profile=load_profile("cpu-tiny"),  # noqa: E731
                           limits=Limits(max_batch=8), replicas=3, router="affinity", seed=1).summary()
    assert run() == run()


@pytest.mark.parametrize("router", ["affinity", "round-robin", "least-loaded"])
def test_replicas_serve_every_request_once(router, mixed_workload):
    result = simulate(mixed_workload, policy="valora", profile=load_profile("cpu-tiny"), limits=Limits(max_batch=4),
                      replicas=3, router=router)
    assert sorted(r.id for r in result.results) == sorted(s.id for s in mixed_workload)
    used = {r.replica for r in result.results}
    assert used == {0, 1, 2}


# A fast engine's costs, fixed here (not the shipped, measured profile) so that a test's load is what it says.
FAST = CostProfile("fast", image_tokens=16,
                   prefill=LinearCost(fixed_s=0.01, per_token_s=5e-5, per_lora_token_s=2e-5, per_adapter_s=5e-4,
                                      per_image_s=0.005),
                   decode=LinearCost(fixed_s=0.004, per_token_s=2e-4, per_lora_token_s=5e-5, per_adapter_s=3e-4,
                                     per_context_token_s=1e-6),
                   merge_s=0.003, unmerge_s=0.003)


def test_affinity_routing_keeps_adapters_together():
    # 8 adapters, no hot one, enough load that every replica batches: affinity routing sends a request
    # where its adapter already runs or waits, so a step mixes fewer adapters (about 2 against 3.7).
    workload = generate(WorkloadSpec(rate=40, duration=20, adapters=8, skew=0.3, prompt_max=96, output_cap=40, seed=5))

    def adapters_per_step(router):
        return simulate(workload, policy="unmerged", profile=FAST,
                        limits=Limits(max_batch=8), replicas=3, router=router).summary()["adapters_per_step"]

    assert adapters_per_step("affinity") < 0.75 * adapters_per_step("round-robin")


def test_requests_that_cannot_fit_or_find_a_full_queue_are_rejected():
    specs = [RequestSpec("big", 0.0, "A", 100, 50), RequestSpec("ok", 0.0, "A", 10, 5),
             RequestSpec("ok2", 0.0, "A", 10, 5), RequestSpec("late", 0.0, "A", 10, 5)]
    result = simulate(specs, policy="unmerged", profile=HAND, limits=Limits(max_batch=1, kv_tokens=100),
                      max_queue=1)
    # "ok" starts a step at once (leaving the queue empty), "ok2" waits, "late" finds the queue full.
    assert result.rejected == ["big", "late"]
    assert [r.id for r in result.results] == ["ok", "ok2"]


def test_a_policy_that_never_admits_is_reported_not_looped():
    class Never(Policy):
        name = "never"

        def plan(self, state):
            return Plan("unmerged", None, ())

    with pytest.raises(RuntimeError, match="would stall forever"):
        simulate(THREE, policy=Never, profile=HAND, limits=Limits(max_batch=2))


def test_summarize_needs_results_and_handles_single_token_outputs():
    with pytest.raises(ValueError, match="no finished requests"):
        summarize([])
    s = summarize([RequestResult("a", None, 0.0, 1.0, 1.0, 5, 1)])
    assert math.isnan(s["tpot_mean_s"]) and s["ttft_p99_s"] == 1.0


def test_cli_prints_a_row_per_policy_and_writes_json(tmp_path, capsys):
    from serve.simulate import main

    out = tmp_path / "sim.json"
    saved = tmp_path / "w.jsonl"
    assert main(["--rate", "5", "--duration", "20", "--adapters", "4", "--policy", "valora", "--policy", "dlora",
                 "--max-batch", "8", "--starve-after", "0.5", "--save-workload", str(saved), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "profile `cpu-tiny`" in table
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:] == ["valora", "dlora"]
    data = json.loads(out.read_text())
    assert [r["policy"] for r in data["results"]] == ["valora", "dlora"]
    # The saved workload replays to the same summaries.
    assert main(["--workload", str(saved), "--policy", "valora", "--max-batch", "8", "--starve-after", "0.5",
                 "--json", str(out)]) == 0
    again = json.loads(out.read_text())["results"][0]
    assert again["avg_token_latency_s"] == data["results"][0]["avg_token_latency_s"]
