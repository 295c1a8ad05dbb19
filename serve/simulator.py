"""Discrete-event simulation of serving: N engine replicas behind a router, each running an
orchestration policy under the engine's batching rules (`serve/batching.py`), with a cost profile
(`serve/cost_profile.py`) as its clock instead of a device.

    result = simulate(generate(WorkloadSpec(...)), policy="valora", profile=load_profile("cpu-tiny"),
                      limits=Limits(max_batch=32), replicas=1)
    result.summary()        # serve.summary metrics, plus rejected requests and steps

Each simulated engine repeats the engine's step (see `serve.batching`): the policy plans on the
requests that arrived by the step's start; the step takes switch + prefill + decode time from the
profile; an admitted request's first token is at the end of the prefill, every running request's
next token at the end of the step, and a request leaves its slot at the end of the step that gives
its last token (`output_tokens` of its spec: the simulator generates exactly that many). An engine
with nothing to do waits for the next arrival routed to it. Arrivals at the same instant as a
step's end join before the next plan. A request that could never fit an empty engine (prompt over
the prefill budget, prompt plus output over the KV budget), or that arrives when the engine's
queue holds `max_queue` requests, is rejected, as the engine refuses it.

The simulator checks every plan against the batching rules (`check_plan`) and raises if a policy
leaves an idle engine with waiting requests and nothing to do, which would stall forever.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Callable, Sequence

from serve.batching import Limits, Request, StepState, check_plan, switch_ops
from serve.cost_profile import CostProfile
from serve.policy import Policy, make_policy
from serve.routing import ReplicaStatus, make_router
from serve.summary import RequestResult, summarize
from serve.workload import RequestSpec


@dataclasses.dataclass(eq=False)
class SimRequest(Request):
    """A request in the simulator: the scheduler's view plus the times the summary needs."""
    first_token: float = math.nan
    finish: float = math.nan
    replica: int = 0

    def result(self) -> RequestResult:
        return RequestResult(self.id, self.adapter, self.arrival, self.first_token, self.finish,
                             self.prompt_tokens, self.generated, self.replica)


class SimEngine:
    """One simulated engine: waiting and running requests, the merged adapter, a policy."""

    def __init__(self, policy: Policy, limits: Limits, profile: CostProfile, *, index: int = 0,
                 max_queue: int | None = None, max_loras: int | None = None):
        self.policy = policy
        self.limits = limits
        self.profile = profile
        self.index = index
        self.max_queue = max_queue
        self.max_loras = max_loras if max_loras is not None else limits.max_batch
        self.waiting: list[SimRequest] = []
        self.running: list[SimRequest] = []
        self.merged: str | None = None
        self.finished: list[SimRequest] = []
        self.switches = 0
        self.switch_seconds = 0.0
        self.steps = 0
        self.batch_adapters = 0  # distinct adapters (base included) over the rows of each step, summed
        self.mode_seconds: dict[str, float] = {}

    def accepts(self, request: Request) -> bool:
        return self.limits.fits_alone(request) and (self.max_queue is None or len(self.waiting) < self.max_queue)

    def status(self) -> ReplicaStatus:
        used = sum(r.kv_tokens for r in self.running)
        kv = used / self.limits.kv_tokens if self.limits.kv_tokens else len(self.running) / self.limits.max_batch
        return ReplicaStatus(len(self.waiting), len(self.running), kv,
                             frozenset(r.adapter for r in self.running if r.adapter is not None),
                             frozenset(r.adapter for r in self.waiting if r.adapter is not None), self.max_loras)

    def step(self, now: float) -> float | None:
        """Plans and runs one step starting at `now`; returns its end time, or None when there is
        nothing to do (the engine then idles until a request arrives)."""
        state = StepState(now, self.waiting, self.running, self.merged, self.limits)
        plan = self.policy.plan(state)
        check_plan(plan, state)
        ops = switch_ops(self.merged, plan.merged)
        if not (ops or plan.admit or self.running):
            if self.waiting:
                raise RuntimeError(f"policy {self.policy!r} admits nothing into an idle engine with "
                                   f"{len(self.waiting)} waiting requests: it would stall forever")
            return None
        switch_s = self.profile.switch_s(ops)
        t = now + switch_s
        self.switches += len(ops)
        self.switch_seconds += switch_s
        self.merged = plan.merged
        decoding = self.running
        if plan.admit:
            t += self.profile.prefill_s(plan.admit, plan.mode, plan.merged)
            admitted = {id(r) for r in plan.admit}
            self.waiting = [r for r in self.waiting if id(r) not in admitted]
            for r in plan.admit:
                r.generated = 1
                r.first_token = t
        if decoding:
            t += self.profile.decode_s(decoding, plan.mode, plan.merged)
            for r in decoding:
                r.generated += 1
        self.running = []
        for r in (*decoding, *plan.admit):
            if r.done:
                r.finish = t if r.generated > 1 else r.first_token
                self.finished.append(r)
            else:
                self.running.append(r)
        self.steps += 1
        self.batch_adapters += len({r.adapter for r in (*decoding, *plan.admit)})
        self.mode_seconds[plan.mode] = self.mode_seconds.get(plan.mode, 0.0) + (t - now)
        return t


@dataclasses.dataclass
class SimResult:
    results: list[RequestResult]
    rejected: list[str]
    switches: int
    steps: int
    mode_seconds: dict[str, float]
    batch_adapters: int
    switch_seconds: float = 0.0  # of the steps' time, spent switching weights

    def summary(self, slo_ttft: float = 6.0) -> dict:
        """`serve.summary.summarize`, plus rejected requests, steps and the mean number of distinct
        adapters (the base model counted as one) among the rows of a step."""
        out = summarize(self.results, slo_ttft=slo_ttft, switches=self.switches)
        out.update(rejected=len(self.rejected), steps=self.steps,
                   adapters_per_step=self.batch_adapters / self.steps if self.steps else 0.0)
        return out


def to_request(spec: RequestSpec, profile: CostProfile) -> SimRequest:
    """The scheduler's request for a workload spec: images add the profile's image tokens to the prompt."""
    return SimRequest(id=spec.id, adapter=spec.adapter, arrival=spec.arrival,
                      prompt_tokens=spec.prompt_tokens + spec.images * profile.image_tokens,
                      max_new_tokens=spec.output_tokens, images=spec.images)


def simulate(requests: Sequence[RequestSpec], *, policy: str | Callable[[], Policy], profile: CostProfile,
             limits: Limits, replicas: int = 1, router: str = "affinity", policy_params: dict | None = None,
             max_queue: int | None = None, max_loras: int | None = None, seed: int = 0) -> SimResult:
    """Runs `requests` through `replicas` simulated engines, each with its own policy object (a
    registry name plus `policy_params`, or a factory), behind `router`."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    factory = policy if callable(policy) else (lambda: make_policy(policy, **(policy_params or {})))
    engines = [SimEngine(factory(), limits, profile, index=i, max_queue=max_queue, max_loras=max_loras)
               for i in range(replicas)]
    route = make_router(router, seed=seed)
    arrivals = sorted((to_request(s, profile) for s in requests), key=lambda r: r.arrival)
    rejected = []
    busy: list[tuple[float, int]] = []  # (step end, engine index)
    idle = [True] * replicas

    def start(index: int, now: float) -> None:
        end = engines[index].step(now)
        idle[index] = end is None
        if end is not None:
            heapq.heappush(busy, (end, index))

    i = 0
    while i < len(arrivals) or busy:
        if i < len(arrivals) and (not busy or arrivals[i].arrival <= busy[0][0]):
            request = arrivals[i]
            i += 1
            index = route.route(request.adapter, [e.status() for e in engines]) if replicas > 1 else 0
            engine = engines[index]
            if not engine.accepts(request):
                rejected.append(request.id)
                continue
            request.replica = index
            engine.waiting.append(request)
            if idle[index]:
                start(index, request.arrival)
        else:
            end, index = heapq.heappop(busy)
            start(index, end)
    finished = [r.result() for e in engines for r in e.finished]
    finished.sort(key=lambda r: r.arrival)
    modes: dict[str, float] = {}
    for e in engines:
        for mode, seconds in e.mode_seconds.items():
            modes[mode] = modes.get(mode, 0.0) + seconds
    return SimResult(finished, rejected, sum(e.switches for e in engines), sum(e.steps for e in engines), modes,
                     sum(e.batch_adapters for e in engines), sum(e.switch_seconds for e in engines))
