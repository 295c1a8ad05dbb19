"""Routing requests across engine replicas, from what each replica reports: its queued and running
requests, KV cache utilisation, and the adapters its running and waiting requests use (the
Kubernetes Gateway API Inference Extension's model-server protocol; vLLM exports them as
`vllm:num_requests_waiting`, `vllm:gpu_cache_usage_perc` and `vllm:lora_requests_info` with
`running_lora_adapters`, `waiting_lora_adapters` and `max_lora`).

Routers (`ROUTERS`, `make_router`):
- "affinity": the inference extension's default low-latency decision tree. Replicas with fewer
  than `queue_threshold` (128) waiting requests go through LoRA affinity, then least queue, then
  least KV; when none is below the threshold, least queue, then affinity, then least KV. LoRA
  affinity keeps the replicas whose running or waiting requests use the request's adapter, or,
  when none does (or with probability 1 - `affinity_threshold`, 0.001, when both groups exist),
  those with room for another adapter (fewer than `max_loras` distinct adapters). Least queue (and
  least KV) keep the replicas within the lowest (max - min) / n of the range. A filter that would
  keep nothing passes its input on. The final pick is uniform among those left. Base-model
  requests skip the affinity filter. Randomness comes from the router's seeded generator.
- "round-robin": replicas in turn.
- "least-loaded": the replica with the fewest running plus waiting requests (lowest index on ties).
"""

from __future__ import annotations

import abc
import dataclasses
import random
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class ReplicaStatus:
    waiting: int
    running: int
    kv_utilization: float
    running_adapters: frozenset[str]
    waiting_adapters: frozenset[str]
    max_loras: int


class Router(abc.ABC):
    name: str

    @abc.abstractmethod
    def route(self, adapter: str | None, replicas: Sequence[ReplicaStatus]) -> int:
        """The index of the replica that takes a request for `adapter`."""


class RoundRobinRouter(Router):
    name = "round-robin"

    def __init__(self, seed: int = 0):
        self._next = 0

    def route(self, adapter, replicas):
        index = self._next % len(replicas)
        self._next += 1
        return index


class LeastLoadedRouter(Router):
    name = "least-loaded"

    def __init__(self, seed: int = 0):
        pass

    def route(self, adapter, replicas):
        return min(range(len(replicas)), key=lambda i: (replicas[i].running + replicas[i].waiting, i))


def _lowest_bucket(indices: list[int], value) -> list[int]:
    values = [value(i) for i in indices]
    low, high = min(values), max(values)
    cut = low + (high - low) / len(indices)
    return [i for i, v in zip(indices, values) if v <= cut]


class AffinityRouter(Router):
    name = "affinity"

    def __init__(self, seed: int = 0, queue_threshold: int = 128, affinity_threshold: float = 0.999):
        self.queue_threshold = queue_threshold
        self.affinity_threshold = affinity_threshold
        self._rng = random.Random(seed)

    def _affinity(self, adapter, indices, replicas):
        if adapter is None:
            return indices
        hot = [i for i in indices if adapter in replicas[i].running_adapters or adapter in replicas[i].waiting_adapters]
        room = [i for i in indices
                if len(replicas[i].running_adapters | replicas[i].waiting_adapters) < replicas[i].max_loras]
        if hot and room:
            return hot if self._rng.random() < self.affinity_threshold else room
        return hot or room

    def route(self, adapter, replicas):
        every = list(range(len(replicas)))
        low = [i for i in every if replicas[i].waiting < self.queue_threshold]
        queue = lambda i: replicas[i].waiting  # noqa: E731
        kv = lambda i: replicas[i].kv_utilization  # noqa: E731
        if low:
            steps = [lambda s: self._affinity(adapter, s, replicas), lambda s: _lowest_bucket(s, queue)]
            chosen = low
        else:
            steps = [lambda s: _lowest_bucket(s, queue), lambda s: self._affinity(adapter, s, replicas)]
            chosen = every
        for step in (*steps, lambda s: _lowest_bucket(s, kv)):
            chosen = step(chosen) or chosen
        return self._rng.choice(chosen)


ROUTERS: dict[str, type[Router]] = {cls.name: cls for cls in (AffinityRouter, RoundRobinRouter, LeastLoadedRouter)}


def make_router(name: str, seed: int = 0) -> Router:
    try:
        cls = ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r}; choose one of {', '.join(ROUTERS)}") from None
    return cls(seed=seed)
