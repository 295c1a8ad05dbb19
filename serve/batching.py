"""The batching rules that the engine and the simulator share: what a request looks like to the
scheduler, what a policy's plan says, which rows run in each mode, and how waiting requests fill
free decode slots. Plain Python, no JAX: `serve/policy.py` decides, this module defines what a
decision means and checks it.

One engine step, in this order (the simulator's cost model times exactly these three parts):

1. Weight switch: when `plan.merged` differs from the adapter folded into the weights now, the
   pool merges the new one, unmerges the current one, or replaces one by the other in a single pass
   over the weights (`AdapterPool.switch`): `switch_ops`.
2. Prefill: the admitted requests (`plan.admit`) are prefilled in one call, each takes a free
   decode slot and gets its first output token from the prefill.
3. Decode: every request that was running before the step generates one token.

A request leaves its slot as soon as it has generated `max_new_tokens` tokens (or stops early in
the engine). Running requests are never preempted or held: every running row runs in every step,
so a plan's mode must admit all of them (`check_plan`).

Modes and the rows they run (METHODS.md 1c), with `m` the adapter folded into the weights:

- `unmerged`: nothing is merged (`merged is None`); a row of adapter i computes its delta
  s_i A_i B_i with the batched kernels; a base-model row (adapter None) computes no delta.
- `merged`: `m` is merged and only rows of `m` run, with no LoRA term at all. A row of another
  adapter or of the base model cannot run in this mode (the plan must be `mixture` then).
- `mixture`: `m` stays merged and every row runs: rows of `m` with no LoRA term, a row of adapter
  i != m with the correction x (s_i A_i B_i - s_m A_m B_m) (two LoRA terms), a base-model row with
  -x s_m A_m B_m (one term).

`lora_terms` gives those term counts; `mode_for` picks `merged` or `mixture` from the rows.

Admission (`fill`): a policy orders the waiting requests it is willing to start this step; `fill`
takes them in that order while a decode slot, the per-step prefill token budget and the KV token
budget (prompt plus max new tokens reserved per request) all allow, and stops at the first one
that does not fit, so a large request is never overtaken by smaller ones behind it in the same order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Literal

Mode = Literal["unmerged", "merged", "mixture"]
MODES: tuple[Mode, ...] = ("unmerged", "merged", "mixture")


@dataclasses.dataclass(eq=False)
class Request:
    """A request as the scheduler sees it. The engine keeps one per request beside its own state;
    `generated` is the only field that changes (one per step while the request runs). Identity,
    not value, tells two requests apart (`eq=False`), so equal-looking requests stay distinct.

    `prompt_tokens` counts every position the prefill computes, image tokens included; `images` is
    the number of images the prefill encodes (the cost model charges them); `generated` counts output
    tokens so far (the first comes from the prefill).
    """
    id: str
    adapter: str | None
    arrival: float
    prompt_tokens: int
    max_new_tokens: int
    images: int = 0
    generated: int = 0

    def __post_init__(self):
        if self.prompt_tokens < 1:
            raise ValueError(f"request {self.id!r}: prompt_tokens must be >= 1, got {self.prompt_tokens}")
        if self.max_new_tokens < 1:
            raise ValueError(f"request {self.id!r}: max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def kv_tokens(self) -> int:
        """KV cache positions the request reserves for its whole life."""
        return self.prompt_tokens + self.max_new_tokens

    @property
    def done(self) -> bool:
        return self.generated >= self.max_new_tokens


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one engine can hold: decode slots, prompt tokens prefilled per step (None: no limit) and
    KV token positions over all slots (None: only the slots limit)."""
    max_batch: int
    max_prefill_tokens: int | None = None
    kv_tokens: int | None = None

    def __post_init__(self):
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")

    def fits_alone(self, request: Request) -> bool:
        """Whether the request could ever be admitted (into an empty engine); an engine refuses one
        that cannot at arrival."""
        return ((self.max_prefill_tokens is None or request.prompt_tokens <= self.max_prefill_tokens)
                and (self.kv_tokens is None or request.kv_tokens <= self.kv_tokens))


@dataclasses.dataclass(frozen=True)
class StepState:
    """What a policy sees before a step: the time, the waiting requests in arrival order, the running
    requests (one per occupied slot), the adapter folded into the weights now (None: unmerged) and
    the engine's limits."""
    now: float
    waiting: Sequence[Request]
    running: Sequence[Request]
    merged: str | None
    limits: Limits

    @property
    def free_slots(self) -> int:
        return self.limits.max_batch - len(self.running)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A policy's decision for one step: the mode, the adapter folded into the weights during it
    (None exactly when the mode is `unmerged`) and the waiting requests that join, in prefill order."""
    mode: Mode
    merged: str | None
    admit: tuple[Request, ...] = ()


def lora_terms(mode: Mode, merged: str | None, adapter: str | None) -> int:
    """LoRA terms a row of `adapter` computes in `mode` with `merged` folded in (see the module
    docstring); raises when the row cannot run in that mode."""
    if mode == "unmerged":
        return 0 if adapter is None else 1
    if adapter == merged:
        return 0
    if mode == "merged":
        raise ValueError(f"a row of {_name(adapter)} cannot run in merged mode with {merged!r} merged")
    return 1 if adapter is None else 2


def mode_for(merged: str | None, adapters: Iterable[str | None]) -> Mode:
    """The cheapest mode that runs rows of `adapters` with `merged` folded in: `unmerged` when
    nothing is merged, `merged` when every row is of the merged adapter, else `mixture`."""
    if merged is None:
        return "unmerged"
    return "merged" if all(a == merged for a in adapters) else "mixture"


def switch_ops(current: str | None, target: str | None) -> tuple[tuple[str, str | None], ...]:
    """The weight change that takes the weights from `current` merged to `target` merged: ("merge",
    target) from unmerged, ("unmerge", current) to unmerged, ("switch", target) from one adapter to
    another (one pass); empty when nothing changes."""
    if current == target:
        return ()
    if current is None:
        return (("merge", target),)
    return (("unmerge", current),) if target is None else (("switch", target),)


def fill(candidates: Iterable[Request], state: StepState) -> tuple[Request, ...]:
    """The longest prefix of `candidates` (in their order) that fits the free slots, the per-step
    prefill token budget and the KV token budget left by the running requests."""
    limits = state.limits
    slots = state.free_slots
    prefill_left = limits.max_prefill_tokens
    kv_left = None if limits.kv_tokens is None else limits.kv_tokens - sum(r.kv_tokens for r in state.running)
    admitted = []
    for request in candidates:
        if slots == 0:
            break
        if prefill_left is not None:
            if request.prompt_tokens > prefill_left:
                break
            prefill_left -= request.prompt_tokens
        if kv_left is not None:
            if request.kv_tokens > kv_left:
                break
            kv_left -= request.kv_tokens
        admitted.append(request)
        slots -= 1
    return tuple(admitted)


def check_plan(plan: Plan, state: StepState) -> None:
    """Raises ValueError when `plan` breaks a batching rule: an unknown mode, `merged` set in
    unmerged mode or missing otherwise, a running or admitted row the mode cannot run, an admitted
    request that is not waiting (or twice), or more than the limits hold."""
    if plan.mode not in MODES:
        raise ValueError(f"unknown mode {plan.mode!r}; expected one of {', '.join(MODES)}")
    if (plan.mode == "unmerged") != (plan.merged is None):
        raise ValueError(f"mode {plan.mode!r} with merged={plan.merged!r}: the merged adapter is set "
                         "exactly in merged and mixture mode")
    waiting = {id(r) for r in state.waiting}
    seen = set()
    for request in plan.admit:
        if id(request) not in waiting or id(request) in seen:
            raise ValueError(f"request {request.id!r} is admitted but is not waiting (or is admitted twice)")
        seen.add(id(request))
    for request in (*state.running, *plan.admit):
        lora_terms(plan.mode, plan.merged, request.adapter)
    if fill(plan.admit, state) != plan.admit:
        raise ValueError(f"the plan admits {len(plan.admit)} requests, more than the free slots "
                         f"({state.free_slots}) or the prefill / KV token budgets hold")


def _name(adapter: str | None) -> str:
    return "the base model" if adapter is None else f"adapter {adapter!r}"
