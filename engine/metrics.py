"""The server's Prometheus metrics, under vLLM's names where vLLM has one, each server with its own registry.

The engine thread feeds them: `after_step` copies the engine's `EngineStats` after every step (gauges as they are,
counters by how much the engine's totals grew), and `request_finished` records one request's latencies, measured on
the server's clock from the moment the request reached the engine thread. `render` is the body of `GET /metrics`.

Names follow vLLM's v1 loggers (prometheus_client adds `_total` to counters in the text format, as vLLM's do); the
`inferlab:` ones have no vLLM counterpart: the requests run in each step (a histogram, so a scrape shows whether
the engine batched), and the free and total KV blocks (the free count returns to the total once every request is
done or aborted, cached prefix blocks included: they are evictable).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .types import EngineStats

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Bucket edges in seconds: a CPU test server sits at the top of these ranges, a GPU server at the bottom.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

# EngineStats counters (totals since the engine started) and the Prometheus counters they feed.
COUNTERS = {
    "prefix_cache_queries": ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    "prefix_cache_hits": ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache."),
    "num_preemptions": ("vllm:num_preemptions", "Requests preempted (their KV freed, to be recomputed)."),
    "prompt_tokens": ("vllm:prompt_tokens", "Prompt tokens computed (prefilled)."),
    "generation_tokens": ("vllm:generation_tokens", "Tokens generated."),
}
GAUGES = {
    "num_running": ("vllm:num_requests_running", "Requests in the running batch."),
    "num_waiting": ("vllm:num_requests_waiting", "Requests waiting to be scheduled."),
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "Fraction of KV blocks in use, 0 to 1."),
    "num_free_blocks": ("inferlab:num_free_blocks", "KV blocks free (cached prefix blocks no request holds count)."),
    "num_total_blocks": ("inferlab:num_total_blocks", "KV blocks in the pool."),
}


class ServerMetrics:
    """The collectors of one server, registered in a registry of their own."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        label = {"model_name": model_name}

        def labelled(metric_type, name, doc, extra=(), **kwargs):
            metric = metric_type(name, doc, ["model_name", *extra], registry=self.registry, **kwargs)
            return metric if extra else metric.labels(**label)

        self._gauges = {field: labelled(Gauge, *spec) for field, spec in GAUGES.items()}
        self._counters = {field: labelled(Counter, *spec) for field, spec in COUNTERS.items()}
        self._last_totals = dict.fromkeys(COUNTERS, 0)
        self._success = labelled(Counter, "vllm:request_success", "Requests finished.", ("finished_reason",))
        self._model_name = model_name
        self._ttft = labelled(Histogram, "vllm:time_to_first_token_seconds", "Time to the first generated token.",
                              buckets=TTFT_BUCKETS)  # fmt: skip
        self._itl = labelled(Histogram, "vllm:inter_token_latency_seconds", "Time between consecutive tokens.",
                             buckets=ITL_BUCKETS)  # fmt: skip
        self._e2e = labelled(Histogram, "vllm:e2e_request_latency_seconds", "Arrival to the last token.",
                             buckets=E2E_BUCKETS)  # fmt: skip
        self._batch = labelled(Histogram, "inferlab:step_num_requests", "Requests run in one engine step.",
                               buckets=BATCH_BUCKETS)  # fmt: skip

    def after_step(self, stats: EngineStats) -> None:
        for field, gauge in self._gauges.items():
            gauge.set(getattr(stats, field))
        for field, counter in self._counters.items():
            total = getattr(stats, field)
            grown = total - self._last_totals[field]
            if grown > 0:  # a total never shrinks; if an engine's did, the counter simply waits for it
                counter.inc(grown)
                self._last_totals[field] = total
        if stats.last_step_num_requests > 0:
            self._batch.observe(stats.last_step_num_requests)

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self._itl.observe(seconds)

    def request_finished(self, finish_reason: str, e2e_seconds: float | None) -> None:
        self._success.labels(model_name=self._model_name, finished_reason=finish_reason).inc()
        if e2e_seconds is not None:
            self._e2e.observe(e2e_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def read_metric(text: str, sample: str, **labels: str) -> float:
    """The sum of the samples named `sample` (e.g. "vllm:prefix_cache_hits_total") whose labels include `labels`,
    in a /metrics body; 0.0 when there is none (a labelled counter appears only once it has counted)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )
