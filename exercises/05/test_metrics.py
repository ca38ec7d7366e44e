"""Exercise 05 specification, part 2: serving metrics with the definitions of vLLM's `bench serve`.

Every expected number below is worked out by hand from a hand-made timeline (fixtures/serving_sim.py's
`RequestTimeline`: when a request was sent, when each of its output tokens streamed back, or that it failed).
"""

from __future__ import annotations

import math

import pytest

from fixtures.checks import expect_error
from fixtures.serving_sim import RequestTimeline

APPROX = dict(rel=1e-9, abs=1e-12)


@pytest.fixture
def metrics(impl):
    return impl("metrics")


def timelines() -> list[RequestTimeline]:
    return [
        RequestTimeline(0, arrival=0.0, prompt_len=10, output_len=4, token_times=[0.5, 0.6, 0.8, 1.1]),
        RequestTimeline(1, arrival=0.2, prompt_len=20, output_len=1, token_times=[0.4]),  # a one-token answer
        RequestTimeline(2, arrival=0.3, prompt_len=30, output_len=3, token_times=[1.3, 1.5, 1.6]),
        RequestTimeline(3, arrival=0.4, prompt_len=40, output_len=5, failed=True),  # refused: no tokens
    ]


def check(got, expected, what, mistakes=()):
    if got == pytest.approx(expected, **APPROX):
        return
    named = [why for wrong, why in mistakes if got == pytest.approx(wrong, **APPROX)]
    pytest.fail(f"{what}: expected {expected:.6g}, got {got:.6g}" + (f": {named[0]}" if named else ""), pytrace=False)


def test_counts_and_throughputs_divide_by_the_wall_time(metrics):
    m = metrics.serving_metrics(timelines(), duration=2.0)
    check(m.completed, 3, "completed requests", [(4, "the failed request counted as completed")])
    check(m.failed, 1, "failed requests (refused, no tokens)")
    check(m.total_input_tokens, 60, "input tokens (completed requests only)", [(100, "the failed request counted")])
    check(m.total_output_tokens, 8, "output tokens streamed", [(13, "counted output_len, not tokens received")])
    check(m.request_throughput, 1.5, "requests/s = completed / duration", [(2.0, "the failed request counted")])
    check(m.output_throughput, 4.0, "output tokens/s = 8 / 2 s")
    check(m.total_token_throughput, 34.0, "total tokens/s = (60 + 8) / 2 s")


def test_ttft_and_e2e_latency_are_measured_from_the_send_time(metrics):
    m = metrics.serving_metrics(timelines(), duration=2.0)
    # TTFT: 0.5, 0.2, 1.0; E2EL: 1.1, 0.2, 1.3
    check(m.ttft.mean, 1.7 / 3, "mean TTFT", [(2.2 / 3, "measured from time 0 instead of each request's arrival")])
    check(m.ttft.median, 0.5, "median TTFT")
    check(m.e2el.mean, 2.6 / 3, "mean E2E latency")
    check(m.e2el.median, 1.1, "median E2E latency")


def test_tpot_excludes_the_first_token_and_one_token_answers(metrics):
    m = metrics.serving_metrics(timelines(), duration=2.0)
    # request 0: (1.1 - 0.5) / 3 = 0.2; request 2: (1.6 - 1.3) / 2 = 0.15; request 1 has no TPOT
    check(m.tpot.mean, 0.175, "mean TPOT", [
        ((1.1 / 4 + 1.3 / 3) / 2, "TPOT is (E2EL - TTFT) / (output tokens - 1): the first token is excluded"),
        ((0.2 + 0.15) / 3, "a one-token answer has no TPOT: leave it out instead of counting 0"),
        ((1.1 / 4 + 0.2 + 1.3 / 3) / 3, "TPOT excludes the first token, and one-token answers have none"),
    ])  # fmt: skip
    check(m.tpot.median, 0.175, "median TPOT")


def test_itl_pools_every_gap_between_consecutive_tokens(metrics):
    m = metrics.serving_metrics(timelines(), duration=2.0)
    gaps = [0.1, 0.2, 0.3, 0.2, 0.1]  # request 0's three gaps, then request 2's two
    check(m.itl.mean, sum(gaps) / 5, "mean ITL over all gaps", [
        ((0.2 + 0.15) / 2, "ITL is every gap of every request pooled, not a per-request average"),
    ])  # fmt: skip
    check(m.itl.median, 0.2, "median ITL")
    check(m.itl.p99, 0.296, "p99 ITL (sorted gaps 0.1 0.1 0.2 0.2 0.3: rank 0.99 x 4 = 3.96, 0.2 + 0.96 x 0.1)", [
        (0.3, "p99 by nearest rank; interpolate linearly between the closest ranks"),
    ])  # fmt: skip


def test_percentile_interpolates_between_the_closest_ranks(metrics):
    values = [4.0, 1.0, 3.0, 2.0]
    for q, expected in ((0, 1.0), (50, 2.5), (99, 3.97), (100, 4.0)):
        check(metrics.percentile(values, q), expected, f"percentile({values}, {q})", [
            (sorted(values)[min(3, math.ceil(q / 100 * 4) - 1 if q else 0)], "nearest rank instead of interpolation"),
        ])  # fmt: skip
    assert metrics.percentile(values, 50) == 2.5 and values == [4.0, 1.0, 3.0, 2.0], "the input must not be sorted"


def test_statistics_of_nothing_are_zero(metrics):
    only_one_token = [RequestTimeline(0, 0.0, 5, 1, token_times=[0.25])]
    m = metrics.serving_metrics(only_one_token, duration=1.0)
    assert (m.tpot.mean, m.tpot.median, m.tpot.p99) == (0.0, 0.0, 0.0), f"no TPOT samples: all 0.0, got {m.tpot}"
    assert (m.itl.mean, m.itl.p99) == (0.0, 0.0), f"no gaps: ITL statistics 0.0, got {m.itl}"
    check(m.ttft.p99, 0.25, "p99 TTFT of a single sample")


def test_goodput_counts_completed_requests_meeting_every_slo(metrics):
    # TTFT 0.5 / 0.2 / 1.0 and TPOT 0.2 / none / 0.15
    m = metrics.serving_metrics(timelines(), duration=2.0, ttft_slo=0.6, tpot_slo=0.18)
    check(m.goodput, 0.5, "goodput: only request 1 meets TTFT <= 0.6 and TPOT <= 0.18 (it has no TPOT), over 2 s", [
        (0.0, "a one-token answer has no TPOT, so it meets any TPOT SLO"),
        (1.5, "a request must meet every SLO, not any one of them"),
    ])  # fmt: skip
    m = metrics.serving_metrics(timelines(), duration=2.0, ttft_slo=1.0)
    check(m.goodput, 1.5, "goodput with a TTFT SLO of 1.0 s (inclusive) and no TPOT SLO")
    m = metrics.serving_metrics(timelines(), duration=2.0)
    check(m.goodput, 1.5, "goodput without SLOs: every completed request", [(2.0, "the failed request counted")])


def test_cost_per_million_output_tokens(metrics):
    m = metrics.serving_metrics(timelines(), duration=2.0, gpu_hour_price=3.6)
    # 2 s at $3.60 an hour is $0.002, for 8 output tokens: $250 per million
    check(m.cost_per_million_output_tokens, 250.0, "cost per million output tokens at $3.60 per GPU-hour", [
        (250.0 * 8 / 13, "counted output_len, not tokens received"),
        (250.0 * 3600, "the price is per hour: convert the duration"),
    ])  # fmt: skip
    nothing = metrics.serving_metrics([RequestTimeline(0, 0.0, 5, 3, failed=True)], duration=1.0, gpu_hour_price=1.0)
    assert nothing.cost_per_million_output_tokens == math.inf, "no output tokens: the cost per token is infinite"


def test_peak_kv_usage_and_bad_input(metrics):
    m = metrics.serving_metrics(timelines(), duration=2.0, kv_usage=[0.1, 0.75, 0.5])
    check(m.peak_kv_usage, 0.75, "peak KV usage")
    expect_error(ValueError, lambda: metrics.serving_metrics(timelines(), duration=0.0), "a run of 0 seconds")
