"""Orchestration policies (serve.policy) on hand-built queues: each decision derived by hand from the
rules in the module docstring (METHODS.md 1c and the released VaLoRA code's `ours_schedule` and dLoRA
baseline), including the thresholds' exact boundaries."""

import pytest

from serve.batching import Limits, Plan, Request, StepState, check_plan
from serve.policy import POLICIES, DLoraPolicy, MergedFcfsPolicy, ValoraPolicy, make_policy, most_frequent

_ids = iter(range(10**9))


def req(adapter, arrival=0.0, prompt=10, out=5, generated=0):
    return Request(f"r{next(_ids)}", adapter, arrival, prompt, out, generated=generated)


def state(waiting=(), running=(), merged=None, max_batch=4, now=0.0, **limits):
    return StepState(now, list(waiting), list(running), merged, Limits(max_batch, **limits))


def decide(policy, s):
    plan = policy.plan(s)
    check_plan(plan, s)  # every decision obeys the batching rules
    return plan


def adapters(plan):
    return [r.adapter for r in plan.admit]


# --- valora ---

def test_valora_merges_the_most_frequent_adapter_above_half_and_holds_back_the_others():
    waiting = [req("A"), req("B"), req("A"), req("A")]
    plan = decide(ValoraPolicy(starve_after=2.0), state(waiting, now=1.0))
    assert (plan.mode, plan.merged) == ("merged", "A")
    assert plan.admit == (waiting[0], waiting[2], waiting[3])


def test_valora_exactly_half_of_the_batch_for_one_adapter_does_not_merge():
    waiting = [req("A"), req("B"), req("A"), req("C")]  # 2 / min(4, 4) = 0.5, not > 0.5
    plan = decide(ValoraPolicy(), state(waiting, now=1.0))
    assert plan == Plan("unmerged", None, tuple(waiting))


def test_valora_max_bs_is_the_outstanding_count_when_below_the_batch_limit():
    waiting = [req("A"), req("A"), req("B")]  # 2 / min(32, 3) > 0.5
    plan = decide(ValoraPolicy(), state(waiting, max_batch=32, now=1.0))
    assert (plan.mode, plan.merged, adapters(plan)) == ("merged", "A", ["A", "A"])


def test_valora_starving_requests_of_other_adapters_join_through_mixture_in_arrival_order():
    old_b = req("B", arrival=0.0)
    waiting = [old_b, req("A", 2.5), req("A", 2.6), req("A", 2.7), req("C", 2.8)]
    plan = decide(ValoraPolicy(starve_after=2.0), state(waiting, max_batch=8, now=3.0))
    assert (plan.mode, plan.merged) == ("mixture", "A")
    assert plan.admit == tuple(waiting[:4])  # C is not starving (credit 0.2 s): it waits


def test_valora_starvation_is_strictly_past_the_threshold():
    waiting = [req("B", arrival=1.0), req("A", 3.0), req("A", 3.0)]
    at_threshold = decide(ValoraPolicy(starve_after=2.0), state(waiting, max_batch=8, now=3.0))
    assert adapters(at_threshold) == ["A", "A"]
    past = decide(ValoraPolicy(starve_after=2.0), state(waiting, max_batch=8, now=3.001))
    assert adapters(past) == ["B", "A", "A"]


def test_valora_starving_requests_up_to_exactly_half_the_max_batch_still_merge():
    # B = 4, 7 outstanding: max_bs = 4; A has 3 of them (> 2); other adapters' starving requests: 2 = half.
    starving = [req("B", 0.0), req("C", 0.0)]
    fresh = [req("D", 9.5), req("E", 9.5), req("A", 9.6), req("A", 9.7), req("A", 9.8)]
    s = state([*starving, *fresh], now=10.0)
    plan = decide(ValoraPolicy(starve_after=2.0), s)
    assert (plan.mode, plan.merged) == ("mixture", "A")
    assert adapters(plan) == ["B", "C", "A", "A"]  # arrival order, cut at the 4 free slots
    # A third starving request of another adapter (3 / 4 > 0.5): unmerged, first come first served.
    s = state([*starving, req("F", 0.0), *fresh], now=10.0)
    plan = decide(ValoraPolicy(starve_after=2.0), s)
    assert (plan.mode, plan.merged, adapters(plan)) == ("unmerged", None, ["B", "C", "F", "D"])


def test_valora_starving_requests_of_the_merge_candidate_do_not_force_unmerged():
    # The released code would count all three starving A requests (3/4 > 0.5) and unmerge; merged mode
    # serves them at no LoRA cost, so here they do not count.
    waiting = [req("A", 0.0), req("A", 0.0), req("A", 0.0), req("B", 9.9)]
    plan = decide(ValoraPolicy(starve_after=2.0), state(waiting, now=10.0))
    assert (plan.mode, plan.merged, adapters(plan)) == ("merged", "A", ["A", "A", "A"])


def test_valora_counts_running_requests_and_runs_other_running_rows_in_mixture():
    running = [req("B", generated=3)]
    waiting = [req("A"), req("A"), req("A")]
    plan = decide(ValoraPolicy(), state(waiting, running, now=0.5))
    assert (plan.mode, plan.merged) == ("mixture", "A")
    assert plan.admit == tuple(waiting)


def test_valora_stays_merged_while_only_the_merged_adapter_runs():
    running = [req("A", generated=1), req("A", generated=2), req("A", generated=1)]
    plan = decide(ValoraPolicy(), state([req("B", 0.1)], running, merged="A", now=0.1))
    assert plan == Plan("merged", "A", ())


def test_valora_unmerges_when_the_merged_adapter_loses_its_majority():
    running = [req("A", generated=1)]
    waiting = [req("B"), req("C")]
    plan = decide(ValoraPolicy(), state(waiting, running, merged="A", now=0.1))
    assert plan == Plan("unmerged", None, tuple(waiting))


def test_valora_keeps_the_weights_when_idle_and_never_merges_the_base_model():
    assert decide(ValoraPolicy(), state(merged="A")) == Plan("merged", "A", ())
    assert decide(ValoraPolicy(), state()) == Plan("unmerged", None, ())
    base = [req(None), req(None), req(None)]
    assert decide(ValoraPolicy(), state(base)) == Plan("unmerged", None, tuple(base))


def test_valora_base_rows_run_in_mixture_when_they_starve():
    waiting = [req(None, 0.0), req("A", 4.0), req("A", 4.0)]
    plan = decide(ValoraPolicy(starve_after=2.0), state(waiting, max_batch=8, now=4.0))
    assert (plan.mode, plan.merged, adapters(plan)) == ("mixture", "A", [None, "A", "A"])


def test_most_frequent_breaks_ties_towards_the_merged_adapter_then_the_first_seen():
    rows = [req("A"), req("B"), req("B"), req("A"), req(None), req(None), req(None)]
    assert most_frequent(rows, merged=None) == ("A", 2)
    assert most_frequent(rows, merged="B") == ("B", 2)
    assert most_frequent([req(None)], merged="A") == (None, 0)


# --- unmerged ---

def test_unmerged_is_first_come_first_served_into_the_free_slots():
    waiting = [req("A"), req(None), req("B"), req("A")]
    plan = decide(make_policy("unmerged"), state(waiting, [req("C")], merged="C"))
    assert plan == Plan("unmerged", None, tuple(waiting[:3]))


def test_admission_stops_at_the_first_request_over_the_prefill_budget():
    waiting = [req("A", prompt=60), req("A", prompt=50), req("A", prompt=10)]
    plan = decide(make_policy("unmerged"), state(waiting, max_prefill_tokens=100))
    assert plan.admit == (waiting[0],)  # the 10-token request does not overtake the 50-token one


# --- dlora ---

def test_dlora_merges_only_past_alpha_one_full_batch():
    at_alpha = [req("A"), req("A"), req("B")]  # 2 / 2 = alpha: not past it
    plan = decide(DLoraPolicy(), state(at_alpha, max_batch=2))
    assert plan == Plan("unmerged", None, tuple(at_alpha[:2]))
    past = [req("A"), req("B"), req("A"), req("A")]
    plan = decide(DLoraPolicy(), state(past, max_batch=2))
    assert (plan.mode, plan.merged, plan.admit) == ("merged", "A", (past[0], past[2]))


def test_dlora_drains_other_adapters_before_it_merges():
    running = [req("B", generated=2)]
    waiting = [req("C"), req("A"), req("A"), req("A"), req("A")]
    plan = decide(DLoraPolicy(), state(waiting, running, max_batch=3))
    assert (plan.mode, plan.merged, plan.admit) == ("unmerged", None, (waiting[1], waiting[2]))
    drained = [req("A", generated=1), req("A", generated=1)]
    plan = decide(DLoraPolicy(), state([waiting[0], *waiting[3:]], drained, max_batch=3))
    assert (plan.mode, plan.merged, plan.admit) == ("merged", "A", (waiting[3],))


def test_dlora_hysteresis_between_beta_and_alpha_keeps_the_current_mode():
    # 3 outstanding A requests with B = 4: 0.75 is between beta = 0.5 and alpha = 1.
    running = [req("A", generated=1)]
    waiting = [req("C"), req("A"), req("A")]
    unmerged = decide(DLoraPolicy(), state(waiting, running, merged=None))
    assert unmerged == Plan("unmerged", None, tuple(waiting))
    merged = decide(DLoraPolicy(), state(waiting, running, merged="A"))
    assert merged == Plan("merged", "A", (waiting[1], waiting[2]))


def test_dlora_unmerges_only_below_beta():
    running = [req("A", generated=1)]
    at_beta = [req("C"), req("A")]  # 2 / 4 = beta: stays merged
    assert decide(DLoraPolicy(), state(at_beta, running, merged="A")) == Plan("merged", "A", (at_beta[1],))
    below = [req("C"), req("D")]  # 1 / 4 < beta
    assert decide(DLoraPolicy(), state(below, running, merged="A")) == Plan("unmerged", None, tuple(below))


def test_dlora_rejects_beta_above_alpha():
    with pytest.raises(ValueError, match="beta <= alpha"):
        DLoraPolicy(alpha=0.5, beta=1.0)


# --- merged-fcfs ---

def test_merged_fcfs_takes_the_head_adapter_and_all_its_waiting_requests():
    waiting = [req("A"), req("B"), req("A")]
    plan = decide(MergedFcfsPolicy(), state(waiting))
    assert plan == Plan("merged", "A", (waiting[0], waiting[2]))


def test_merged_fcfs_admits_nothing_while_the_head_needs_another_adapter():
    running = [req("A", generated=1)]
    waiting = [req("B"), req("A")]
    assert decide(MergedFcfsPolicy(), state(waiting, running, merged="A")) == Plan("merged", "A", ())
    waiting = [req("A"), req("B"), req("A")]
    plan = decide(MergedFcfsPolicy(), state(waiting, running, merged="A"))
    assert plan == Plan("merged", "A", (waiting[0], waiting[2]))


def test_merged_fcfs_switches_when_drained_and_serves_base_requests_unmerged():
    waiting = [req("B"), req("A")]
    assert decide(MergedFcfsPolicy(), state(waiting, merged="A")) == Plan("merged", "B", (waiting[0],))
    waiting = [req(None), req("A"), req(None)]
    plan = decide(MergedFcfsPolicy(), state(waiting, merged="A"))
    assert plan == Plan("unmerged", None, (waiting[0], waiting[2]))
    assert decide(MergedFcfsPolicy(), state(merged="A")) == Plan("merged", "A", ())


# --- registry ---

def test_registry_names_the_four_policies_and_rejects_unknown_names():
    assert sorted(POLICIES) == ["dlora", "merged-fcfs", "unmerged", "valora"]
    assert make_policy("valora", starve_after=0.5).starve_after == 0.5
    with pytest.raises(ValueError, match="unknown policy 'fifo'; choose one of valora, unmerged, dlora, merged-fcfs"):
        make_policy("fifo")
