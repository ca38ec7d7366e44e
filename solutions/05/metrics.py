"""Exercise 05 reference: serving metrics with the definitions of vLLM's `bench serve`.

Same public API as exercises/05/metrics.py, whose docstrings are the specification.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise


@dataclass(frozen=True)
class Stats:
    mean: float
    median: float
    p99: float


@dataclass(frozen=True)
class ServingMetrics:
    completed: int
    failed: int
    duration: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft: Stats
    tpot: Stats
    itl: Stats
    e2el: Stats
    goodput: float
    peak_kv_usage: float
    cost_per_million_output_tokens: float


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: list[float]) -> Stats:
    if not values:
        return Stats(0.0, 0.0, 0.0)
    return Stats(sum(values) / len(values), percentile(values, 50), percentile(values, 99))


def serving_metrics(
    timelines,
    duration: float,
    *,
    ttft_slo: float | None = None,
    tpot_slo: float | None = None,
    gpu_hour_price: float = 0.0,
    kv_usage=(),
) -> ServingMetrics:
    if duration <= 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    ttfts, tpots, itls, e2els = [], [], [], []
    completed = failed = input_tokens = output_tokens = good = 0
    for t in timelines:
        if t.failed or not t.token_times:
            failed += 1
            continue
        completed += 1
        input_tokens += t.prompt_len
        output_tokens += len(t.token_times)
        ttft = t.token_times[0] - t.arrival
        e2el = t.token_times[-1] - t.arrival
        ttfts.append(ttft)
        e2els.append(e2el)
        itls.extend(b - a for a, b in pairwise(t.token_times))
        tpot = None
        if len(t.token_times) > 1:
            tpot = (e2el - ttft) / (len(t.token_times) - 1)
            tpots.append(tpot)
        if (ttft_slo is None or ttft <= ttft_slo) and (tpot_slo is None or tpot is None or tpot <= tpot_slo):
            good += 1
    cost = gpu_hour_price * duration / 3600 / output_tokens * 1e6 if output_tokens else math.inf
    return ServingMetrics(
        completed=completed,
        failed=failed,
        duration=duration,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=completed / duration,
        output_throughput=output_tokens / duration,
        total_token_throughput=(input_tokens + output_tokens) / duration,
        ttft=summarize(ttfts),
        tpot=summarize(tpots),
        itl=summarize(itls),
        e2el=summarize(e2els),
        goodput=good / duration,
        peak_kv_usage=max(kv_usage, default=0.0),
        cost_per_million_output_tokens=cost,
    )
