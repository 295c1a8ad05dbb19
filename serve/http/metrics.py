"""`/metrics`: Prometheus text from the engine's state and the server's request records.

The engine's state is read at scrape time (`engine.stats()`), so gauges are never stale:
- the Gateway API Inference Extension's model-server protocol, under vLLM's names, so its endpoint picker
  routes across replicas as it does for vLLM: `vllm:num_requests_waiting` (TotalQueuedRequests),
  `vllm:num_requests_running`, `vllm:kv_cache_usage_perc` (KVCacheUtilization, a fraction 0..1; also as
  `vllm:gpu_cache_usage_perc`, the name older pickers read) and `vllm:lora_requests_info`, whose labels
  `max_lora`, `running_lora_adapters` and `waiting_lora_adapters` (comma-separated) carry the adapter
  affinity information and whose value is the time of the scrape;
- the orchestration: `valora:loaded_adapters`, `valora:mode_info{mode, merged}` (1 for the current mode)
  and `valora:mode_switches_total`.
The server records per request: `valora:requests_total{model, outcome}` and vLLM's latency histograms
`vllm:time_to_first_token_seconds`, `vllm:time_per_output_token_seconds` and
`vllm:e2e_request_latency_seconds`, labelled with the model (base or adapter) the request named.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from serve.engine import Result

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                 5.0, 10.0)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0)


class _EngineCollector:
    """Gauges read from `engine.stats()` at each scrape."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        name = self.engine.served_model_name
        for metric, help_text, value in (
                ("vllm:num_requests_waiting", "Requests waiting to be admitted into a decode slot.",
                 stats.waiting),
                ("vllm:num_requests_running", "Requests in decode slots.", stats.running),
                ("vllm:kv_cache_usage_perc", "KV cache usage, 0..1 (1 = full).", stats.kv_usage),
                ("vllm:gpu_cache_usage_perc", "KV cache usage, 0..1 (1 = full); the older name of "
                 "vllm:kv_cache_usage_perc.", stats.kv_usage)):
            family = GaugeMetricFamily(metric, help_text, labels=["model_name"])
            family.add_metric([name], value)
            yield family
        info = GaugeMetricFamily(
            "vllm:lora_requests_info", "Adapters of running and waiting requests; the value is the time of "
            "this report.", labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        info.add_metric([str(stats.max_loras), ",".join(stats.running_adapters),
                         ",".join(stats.waiting_adapters)], time.time())
        yield info
        yield GaugeMetricFamily("valora:loaded_adapters", "Adapters loaded in the adapter pool.",
                                value=len(stats.loaded_adapters))
        mode = GaugeMetricFamily("valora:mode_info", "The orchestration mode of the current step (1).",
                                 labels=["mode", "merged"])
        mode.add_metric([stats.mode, stats.merged or ""], 1)
        yield mode
        yield CounterMetricFamily("valora:mode_switches", "Switches between orchestration modes.",
                                  value=stats.switches)


class ServerMetrics:
    """The server's registry: the engine's gauges and the per-request records."""

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.requests = Counter("valora:requests", "Requests answered, by model (base or adapter) and outcome "
                                "(stop, length, cancelled, error, rejected).", ["model", "outcome"],
                                registry=self.registry)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time from arrival to the first token.",
                              ["model_name"], buckets=_TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Time between consecutive output tokens.",
                              ["model_name"], buckets=_TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Time from arrival to the last token.",
                             ["model_name"], buckets=_E2E_BUCKETS, registry=self.registry)

    def record_result(self, model: str, result: Result) -> None:
        self.requests.labels(model, result.finish_reason).inc()
        if result.first_token is not None:
            self.ttft.labels(model).observe(result.first_token - result.arrival)
        times = result.token_times
        for earlier, later in zip(times, times[1:]):
            self.tpot.labels(model).observe(later - earlier)
        if result.finished is not None:
            self.e2e.labels(model).observe(result.finished - result.arrival)

    def record_refusal(self, model: str, status: int) -> None:
        self.requests.labels(model, "rejected" if status in (429, 503) else "error").inc()
