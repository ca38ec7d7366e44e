"""Exercise 05, part 2: how serving is measured (the definitions of vLLM's `bench serve`).

A client sends a request and receives its output tokens as a stream. From the send time and the arrival time of
each streamed token:

    TTFT   time to first token:  first token - send time (queueing and the whole prefill are in it)
    ITL    inter-token latency:  every gap between consecutive tokens of a request, all requests pooled
    TPOT   time per output token: (E2EL - TTFT) / (output tokens - 1), for requests with more than one token
           (the mean gap after the first token, not the median gap)
    E2EL   end-to-end latency:   last token - send time

Each is reported as mean, median and p99. Throughputs divide by the wall time of the whole run: requests/s, output
tokens/s, total (input + output) tokens/s, counting completed requests only. Goodput is the requests/s that met
every service-level objective given (e.g. TTFT <= 200 ms and TPOT <= 50 ms): what users experienced as served.
Cost per million output tokens turns throughput into money at a GPU's hourly price.

A timeline is any object with the fields of fixtures/serving_sim.py's RequestTimeline: `arrival` (send time, s),
`prompt_len`, `token_times` (when each output token streamed back, s, in order) and `failed` (the engine refused
the request: it has no tokens). A timeline with no token counts as failed even if `failed` is False.
"""

from __future__ import annotations

import math  # noqa: F401
from dataclasses import dataclass


@dataclass(frozen=True)
class Stats:
    mean: float
    median: float
    p99: float


@dataclass(frozen=True)
class ServingMetrics:
    completed: int  # requests that streamed at least one token and did not fail
    failed: int  # requests that failed (or never produced a token)
    duration: float  # wall time of the run, seconds
    total_input_tokens: int  # prompt tokens of completed requests
    total_output_tokens: int  # tokens streamed back
    request_throughput: float  # completed / duration
    output_throughput: float  # total_output_tokens / duration
    total_token_throughput: float  # (total_input_tokens + total_output_tokens) / duration
    ttft: Stats
    tpot: Stats
    itl: Stats
    e2el: Stats
    goodput: float  # completed requests meeting every SLO given, per second
    peak_kv_usage: float  # max of kv_usage (0.0 if none given)
    cost_per_million_output_tokens: float  # dollars; math.inf if no output token was produced


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between the closest ranks (numpy's default).

    q is a percentage, 0 <= q <= 100 (50 is the median, 99 the p99), not a fraction: percentile(v, 0.5) is the
    0.5th percentile, near the minimum. Sort a copy; the rank is (len - 1) * q / 100; interpolate between the values
    at floor(rank) and the next one. 0.0 for no values (whatever q). ValueError for q outside [0, 100]. Must not
    reorder `values`.
    """
    raise NotImplementedError("percentile: rank = (n - 1) * q / 100 in the sorted copy, interpolate linearly")


def summarize(values: list[float]) -> Stats:
    """Mean, median (the 50th percentile) and p99 of `values`; all 0.0 when there are none."""
    raise NotImplementedError("summarize: Stats(mean, percentile(values, 50), percentile(values, 99))")


def serving_metrics(
    timelines,
    duration: float,
    *,
    ttft_slo: float | None = None,
    tpot_slo: float | None = None,
    gpu_hour_price: float = 0.0,
    kv_usage=(),
) -> ServingMetrics:
    """Every metric of a run. `duration` (seconds, > 0, else ValueError: 0 and negatives are refused) is the run's
    wall time.

    Failed requests (and any without a token, whatever its `failed` says) count only in `failed`. A one-token answer
    has a TTFT and an E2EL but no TPOT and no ITL (it meets any TPOT SLO). SLOs are inclusive (ttft <= ttft_slo);
    None means no such SLO, and 0 is an SLO like any other (met only by a latency of 0).
    Cost: gpu_hour_price dollars per hour of `duration`, per million output tokens. `kv_usage`: the fraction of KV
    blocks in use after each step (the simulator's SimResult.kv_usage); report its peak.
    """
    raise NotImplementedError("serving_metrics: collect TTFT / TPOT / ITL / E2EL per request, then summarize")
