"""Batching rules (serve.batching) and the cost model's step features (serve.cost_profile), against
hand-derived values."""

import dataclasses
import json

import pytest

from serve.batching import Limits, Plan, Request, StepState, check_plan, fill, lora_terms, mode_for, switch_ops
from serve.cost_profile import (
    CostProfile,
    LinearCost,
    StepFeatures,
    StepTiming,
    fit_profile,
    load_profile,
    save_profile,
    step_features,
)


def req(adapter, prompt=10, out=5, generated=0, images=0, name="r"):
    return Request(name, adapter, 0.0, prompt, out, images=images, generated=generated)


def test_lora_terms_per_mode():
    assert [lora_terms("unmerged", None, a) for a in ("A", None)] == [1, 0]
    assert lora_terms("merged", "A", "A") == 0
    assert [lora_terms("mixture", "A", a) for a in ("A", "B", None)] == [0, 2, 1]
    for other in ("B", None):
        with pytest.raises(ValueError, match="cannot run in merged mode"):
            lora_terms("merged", "A", other)


def test_mode_for_and_switch_ops():
    assert mode_for(None, ["A", None]) == "unmerged"
    assert mode_for("A", ["A", "A"]) == "merged"
    assert mode_for("A", []) == "merged"
    assert mode_for("A", ["A", None]) == "mixture"
    assert switch_ops("A", "A") == ()
    assert switch_ops(None, "A") == (("merge", "A"),)
    assert switch_ops("A", None) == (("unmerge", "A"),)
    assert switch_ops("A", "B") == (("switch", "B"),)


def test_fill_respects_slots_and_the_kv_budget_left_by_running_requests():
    running = [req("A", prompt=30, out=10)]  # 40 KV positions
    waiting = [req("B", prompt=20, out=10), req("C", prompt=5, out=5), req("D", prompt=1, out=1)]
    s = StepState(0.0, waiting, running, None, Limits(max_batch=3, kv_tokens=79))
    assert fill(waiting, s) == (waiting[0],)  # 40 + 30 = 70: C's 10 do not fit the 9 left, D waits behind it
    s = StepState(0.0, waiting, running, None, Limits(max_batch=3, kv_tokens=80))
    assert fill(waiting, s) == tuple(waiting[:2])  # exactly fits; D finds no free slot


def test_limits_fits_alone():
    limits = Limits(max_batch=2, max_prefill_tokens=100, kv_tokens=150)
    assert limits.fits_alone(req("A", prompt=100, out=50))
    assert not limits.fits_alone(req("A", prompt=101, out=1))
    assert not limits.fits_alone(req("A", prompt=100, out=51))


def test_check_plan_rejects_what_the_rules_forbid():
    a, b = req("A", name="a"), req("B", name="b")
    s = StepState(0.0, [a, b], [req("C", generated=1, name="c")], None, Limits(max_batch=2))
    check_plan(Plan("mixture", "A", (a,)), s)
    cases = [
        (Plan("fused", "A", ()), "unknown mode 'fused'"),
        (Plan("unmerged", "A", ()), "the merged adapter is set exactly"),
        (Plan("mixture", None, ()), "the merged adapter is set exactly"),
        (Plan("merged", "A", (a,)), "adapter 'C' cannot run in merged mode"),
        (Plan("unmerged", None, (a, a)), "'a' is admitted but is not waiting"),
        (Plan("unmerged", None, (req("A", name="x"),)), "'x' is admitted but is not waiting"),
        (Plan("unmerged", None, (a, b)), "more than the free slots"),
    ]
    for plan, message in cases:
        with pytest.raises(ValueError, match=message):
            check_plan(plan, s)


def test_request_rejects_empty_prompts_and_outputs():
    with pytest.raises(ValueError, match="prompt_tokens must be >= 1"):
        Request("x", None, 0.0, 0, 5)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        Request("x", None, 0.0, 5, 0)


def test_step_features_by_hand():
    rows = [req("A", prompt=10, generated=3, images=1), req("B", prompt=20, generated=1, images=2),
            req(None, prompt=5, generated=0)]
    assert step_features(rows, "mixture", "A", prefill=False) == StepFeatures(
        tokens=3, lora_tokens=0 + 2 + 1, adapters=2, context_tokens=13 + 21 + 5, images=0, merged=1)
    assert step_features(rows, "mixture", "A", prefill=True) == StepFeatures(
        tokens=35, lora_tokens=0 + 2 * 20 + 5, adapters=2, context_tokens=0, images=3, merged=1)
    assert step_features(rows, "unmerged", None, prefill=False) == StepFeatures(3, 2, 2, 39, 0)
    assert step_features(rows[:1], "merged", "A", prefill=True) == StepFeatures(10, 0, 0, 0, 1, 1)
    # In mixture, the merged adapter's term is computed only when some row carries a correction.
    assert step_features(rows[:1], "mixture", "A", prefill=False).adapters == 0


def test_linear_cost_fit_recovers_its_coefficients():
    truth = LinearCost(fixed_s=0.004, per_token_s=2e-4, per_lora_token_s=5e-5, per_adapter_s=3e-4,
                       per_context_token_s=1e-6)
    samples = [(f, truth.seconds(f)) for f in (
        StepFeatures(t, lt, ad, ctx) for t in (1, 8, 32) for lt in (0, t, 2 * t) for ad in (0, 1, 4)
        for ctx in (100, 5000))]
    fitted = LinearCost.fit(samples)
    for name, value in vars(truth).items():
        assert getattr(fitted, name) == pytest.approx(value, rel=1e-6, abs=1e-12), name


def test_linear_cost_fit_is_the_best_non_negative_fit():
    # The exact fit has per_adapter_s = -1 ms: the best non-negative one sets it to 0 and refits the rest,
    # which fits better than clipping the unconstrained solution (clipping leaves every prediction high).
    samples = [(StepFeatures(t, 0, ad), 0.005 + 0.002 * t - 0.001 * ad) for t in (1, 2, 4, 8) for ad in (0, 1, 2)]
    fitted = LinearCost.fit(samples)
    assert all(value >= 0 for value in vars(fitted).values()) and fitted.per_adapter_s == 0
    clipped = LinearCost(fixed_s=0.005, per_token_s=0.002)
    error = lambda cost: sum((cost.seconds(f) - s) ** 2 for f, s in samples)
    assert error(fitted) < 0.5 * error(clipped)
    assert sum(fitted.seconds(f) - s for f, s in samples) == pytest.approx(0, abs=1e-12)


def test_fit_profile_from_step_timings():
    truth = LinearCost(fixed_s=0.01, per_token_s=1e-3, per_merged_s=0.02)
    steps = [StepTiming(switch=(("unmerge", 0.004), ("merge", 0.006), ("switch", 0.007)) if i % 3 == 0 else (),
                        prefill=StepFeatures(tokens=8 * i + 4, merged=i % 2), prefill_s=truth.seconds(
                            StepFeatures(tokens=8 * i + 4, merged=i % 2)),
                        decode=StepFeatures(tokens=i + 1) if i else None, decode_s=0.005 + 1e-4 * (i + 1))
             for i in range(9)]
    profile = fit_profile(steps, name="p", image_tokens=16, device="d")
    assert (profile.merge_s, profile.unmerge_s, profile.direct_s) == (0.006, 0.004, 0.007)
    assert fit_profile([dataclasses.replace(t, switch=t.switch[:2]) for t in steps], name="p",
                       image_tokens=16).direct_s is None  # never measured: charged as unmerge + merge
    assert profile.prefill.per_merged_s == pytest.approx(0.02) and profile.prefill.per_token_s == pytest.approx(1e-3)
    assert profile.decode.fixed_s == pytest.approx(0.005) and profile.decode.per_token_s == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="no merge, unmerge"):
        fit_profile([dataclasses.replace(t, switch=()) for t in steps], name="p", image_tokens=16)


def test_profile_round_trip_and_the_shipped_cpu_profile(tmp_path):
    profile = load_profile("cpu-tiny")
    assert profile.image_tokens == 16 and "measured by serve.profile" in profile.note
    save_profile(profile, tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json") == profile
    (tmp_path / "bad.json").write_text(json.dumps({"prefill": {}, "decode": {}}))
    with pytest.raises(ValueError, match="not a cost profile"):
        load_profile(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="cpu-tiny"):
        load_profile("no-such-profile")


def test_profile_times_prefill_decode_and_switches():
    profile = CostProfile("t", prefill=LinearCost(fixed_s=1.0, per_lora_token_s=0.01),
                          decode=LinearCost(fixed_s=0.1, per_token_s=0.1, per_adapter_s=0.5),
                          merge_s=0.25, unmerge_s=0.5)
    rows = [req("A", prompt=10), req("B", prompt=20)]
    assert profile.prefill_s(rows, "unmerged", None) == pytest.approx(1.0 + 0.3)
    assert profile.prefill_s(rows, "mixture", "A") == pytest.approx(1.0 + 0.4)
    assert profile.decode_s(rows, "unmerged", None) == pytest.approx(0.1 + 0.2 + 1.0)
    assert profile.prefill_s([], "unmerged", None) == 0.0
    assert profile.switch_s(switch_ops("A", "B")) == pytest.approx(0.75)  # no switch_s: unmerge + merge
    assert dataclasses.replace(profile, direct_s=0.3).switch_s(switch_ops("A", "B")) == pytest.approx(0.3)
    assert profile.switch_s(switch_ops(None, "B") + switch_ops("B", None)) == pytest.approx(0.75)
