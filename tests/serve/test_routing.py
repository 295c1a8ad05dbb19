"""Routers (serve.routing) on hand-built replica statuses, following the Gateway API Inference
Extension's low-latency decision tree (LoRA affinity, least queue, least KV)."""

import pytest

from serve.routing import AffinityRouter, ReplicaStatus, make_router


def status(waiting=0, running=0, kv=0.0, running_adapters=(), waiting_adapters=(), max_loras=4):
    return ReplicaStatus(waiting, running, kv, frozenset(running_adapters), frozenset(waiting_adapters), max_loras)


def test_round_robin_cycles_and_least_loaded_takes_the_emptiest():
    replicas = [status(waiting=3), status(running=1), status(waiting=1, running=1)]
    rr = make_router("round-robin")
    assert [rr.route("A", replicas) for _ in range(4)] == [0, 1, 2, 0]
    assert make_router("least-loaded").route("A", replicas) == 1


def test_affinity_prefers_replicas_running_or_queueing_the_adapter():
    router = AffinityRouter(affinity_threshold=1.0)
    replicas = [status(), status(running=3, running_adapters={"A"}, max_loras=1),
                status(waiting=2, waiting_adapters={"B"})]
    assert router.route("A", replicas) == 1  # busier, but A runs there
    assert router.route("B", replicas) == 2
    # With the threshold at 0 it takes a replica with room for another adapter instead (1 has none).
    assert AffinityRouter(affinity_threshold=0.0).route("A", replicas[:2]) == 0


def test_affinity_falls_back_to_room_for_another_adapter_then_least_queue():
    router = AffinityRouter()
    full = status(running=2, running_adapters={"A", "B"}, max_loras=2)
    replicas = [full, status(waiting=5, running_adapters={"C"}), status(waiting=1, kv=0.5, running_adapters={"D"})]
    assert router.route("E", replicas) == 2  # no replica has E; the full one has no room; least queue
    # Base requests skip affinity: least queue keeps 0 and 2 (within 5/3 of the lowest), least KV takes 0.
    assert router.route(None, replicas) == 0


def test_affinity_goes_least_queue_first_when_every_replica_is_past_the_queue_threshold():
    router = AffinityRouter(queue_threshold=4, affinity_threshold=1.0)
    replicas = [status(waiting=20, waiting_adapters={"A"}), status(waiting=5)]
    assert router.route("A", replicas) == 1  # the queue outweighs affinity when both are overloaded
    assert router.route("A", [status(waiting=3, waiting_adapters={"A"}), status(waiting=0)]) == 0


def test_unknown_router_is_refused():
    with pytest.raises(ValueError, match="unknown router 'random'; choose one of affinity, round-robin, least-loaded"):
        make_router("random")
