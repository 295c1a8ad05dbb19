"""Orchestration policies: before each engine step, a policy looks at the waiting and running
requests and returns a `Plan` (mode, merged adapter, requests to admit). The engine and the serving
simulator call the same objects; the batching rules they obey are in `serve/batching.py`.

    policy = make_policy("valora", starve_after=2.0)
    plan = policy.plan(StepState(now, waiting, running, merged, Limits(max_batch=32)))

Every policy re-plans every step and is a pure function of the `StepState` (no hidden state), so
one object can serve an engine for its whole life and a test can probe any situation directly.
Counting conventions shared by the policies below: "outstanding" requests are the running plus
the waiting ones; `B` is `limits.max_batch`; base-model requests (adapter None) count towards the
outstanding total but are never a merge candidate (merging nothing is the unmerged state); ties
between equally frequent adapters go to the adapter merged now (no switch), then to the adapter
of the oldest outstanding request.

`valora` (METHODS.md 1c; the released code's `ours_schedule`, with the differences listed)
  - Credit of a waiting request = now - arrival; it is starving when its credit exceeds
    `starve_after` seconds. Running requests are being served and never starve.
  - Let max_bs = min(B, outstanding), m = the most frequent adapter among the outstanding
    requests and S = the starving requests of adapters other than m (base-model ones included).
    If |S| / max_bs <= `starving_share` (0.5) and count(m) / max_bs > `merge_share` (0.5), m is
    merged; otherwise the plan is unmerged and admits the waiting requests first come first served.
    Exactly half the max batch of starving requests still merges; exactly half of it for m does not.
  - While m is merged, the waiting requests of m and the starving requests of others are
    admitted, in arrival order; non-starving requests of other adapters wait. The mode is `merged`
    when every running and admitted row is of m, else `mixture`: starving requests and requests of
    other adapters still running from before the switch run with the mixture correction, so
    nothing is preempted and nothing waits for a switch.
  - Differences from the released code, and why: it counts every starving request, here only those
    of adapters other than m (merged mode serves starving requests of m at no LoRA cost, so they
    give no reason to unmerge); it counts adapters over the waiting queue, here over running and
    waiting (it re-plans only when the running batch has drained, this policy every step, where
    the waiting queue alone would flip the mode whenever the last few waiting requests change);
    its threshold is 1000 s of wall time, which never fires in its runs, here `starve_after`
    defaults to 2 s; its mixture computation is switched off, here mixture runs for real.

`unmerged` (S-LoRA / Punica)
  - Always unmerged; admits the waiting requests first come first served.

`dlora` (dLoRA as the released VaLoRA code implements its baseline)
  - Unmerged: when the most frequent outstanding adapter m has count(m) / B > `alpha` (1: more than
    a full batch), the policy moves to merged m. dLoRA runs no mixture, so the switch waits until
    every running request is of m: meanwhile it stays unmerged and admits only m's requests (first
    come first served); when running requests are all of m (or none run), it merges m and admits
    m's requests. Below alpha it admits every waiting request first come first served.
  - Merged m: it admits only m's waiting requests while count(m) / B >= `beta` (0.5); below beta it
    unmerges (every running row is of m, so all keep running) and admits first come first served.
  - Counts are over outstanding requests (the released code counts the waiting queue and
    re-plans between batches; per step, m's count would drop below beta as soon as m's requests
    were admitted, unmerging a batch made only of m).

`merged-fcfs` (one adapter at a time)
  - The engine serves one adapter's requests at a time with that adapter merged (base-model
    requests run unmerged with no LoRA term). When the oldest waiting request (the head) is for the
    adapter being served, it admits that adapter's waiting requests in arrival order. When the head
    needs another adapter, it admits nothing more; once the running requests have finished, it
    switches to the head's adapter and admits that adapter's waiting requests. With nothing
    running, the head's adapter is taken at once; with nothing waiting either, the weights stay.
"""

from __future__ import annotations

import abc
from collections import Counter
from collections.abc import Sequence

from serve.batching import Plan, Request, StepState, fill, mode_for


class Policy(abc.ABC):
    """Decides each engine step: `plan(state) -> Plan`. Subclasses set `name` (the registry key)."""
    name: str

    @abc.abstractmethod
    def plan(self, state: StepState) -> Plan:
        ...

    def __repr__(self):
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


def most_frequent(requests: Sequence[Request], merged: str | None) -> tuple[str | None, int]:
    """The most frequent adapter among `requests` (base-model requests excluded) and its count, ties
    to `merged`, then to the adapter seen first; (None, 0) when no request has an adapter."""
    counts = Counter(r.adapter for r in requests if r.adapter is not None)
    if not counts:
        return None, 0
    top = max(counts.values())
    if counts.get(merged) == top:
        return merged, top
    return next(a for a, c in counts.items() if c == top), top


def unmerged_fcfs(state: StepState) -> Plan:
    """Unmerged, admitting the waiting requests in arrival order."""
    return Plan("unmerged", None, fill(state.waiting, state))


def serve_merged(state: StepState, adapter: str | None, candidates: Sequence[Request]) -> Plan:
    """`adapter` folded in (None: unmerged), admitting from `candidates`; mode from the rows."""
    admit = fill(candidates, state)
    rows = [r.adapter for r in (*state.running, *admit)]
    return Plan(mode_for(adapter, rows), adapter, admit)


class ValoraPolicy(Policy):
    name = "valora"

    def __init__(self, starve_after: float = 2.0, starving_share: float = 0.5, merge_share: float = 0.5):
        if starve_after < 0:
            raise ValueError(f"starve_after must be >= 0 seconds, got {starve_after}")
        self.starve_after = starve_after
        self.starving_share = starving_share
        self.merge_share = merge_share

    def plan(self, state: StepState) -> Plan:
        outstanding = (*state.running, *state.waiting)
        if not outstanding:
            return Plan(mode_for(state.merged, ()), state.merged)
        max_bs = min(state.limits.max_batch, len(outstanding))
        m, count = most_frequent(outstanding, state.merged)
        starving = [r for r in state.waiting if state.now - r.arrival > self.starve_after]
        others_starving = sum(1 for r in starving if r.adapter != m)
        if m is None or others_starving / max_bs > self.starving_share or count / max_bs <= self.merge_share:
            return unmerged_fcfs(state)
        starving_ids = {id(r) for r in starving}
        candidates = [r for r in state.waiting if r.adapter == m or id(r) in starving_ids]
        return serve_merged(state, m, candidates)


class UnmergedPolicy(Policy):
    name = "unmerged"

    def plan(self, state: StepState) -> Plan:
        return unmerged_fcfs(state)


class DLoraPolicy(Policy):
    name = "dlora"

    def __init__(self, alpha: float = 1.0, beta: float = 0.5):
        if not 0 <= beta <= alpha:
            raise ValueError(f"dlora needs 0 <= beta <= alpha, got alpha={alpha}, beta={beta}")
        self.alpha = alpha
        self.beta = beta

    def plan(self, state: StepState) -> Plan:
        batch = state.limits.max_batch
        outstanding = (*state.running, *state.waiting)
        if state.merged is not None:
            m = state.merged
            if sum(1 for r in outstanding if r.adapter == m) / batch < self.beta:
                return unmerged_fcfs(state)
            return serve_merged(state, m, [r for r in state.waiting if r.adapter == m])
        m, count = most_frequent(outstanding, None)
        if m is None or count / batch <= self.alpha:
            return unmerged_fcfs(state)
        own = [r for r in state.waiting if r.adapter == m]
        drained = all(r.adapter == m for r in state.running)
        return serve_merged(state, m if drained else None, own)


class MergedFcfsPolicy(Policy):
    name = "merged-fcfs"

    def plan(self, state: StepState) -> Plan:
        if state.running:
            serving = state.running[0].adapter
        elif state.waiting:
            serving = state.waiting[0].adapter
        else:
            serving = state.merged
        head_served = not state.waiting or state.waiting[0].adapter == serving
        own = [r for r in state.waiting if r.adapter == serving] if head_served else []
        return serve_merged(state, serving, own)


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (ValoraPolicy, UnmergedPolicy, DLoraPolicy, MergedFcfsPolicy)}


def make_policy(name: str, **params) -> Policy:
    """A fresh policy by registry name, with its parameters (e.g. `starve_after` for valora)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}") from None
    return cls(**params)
