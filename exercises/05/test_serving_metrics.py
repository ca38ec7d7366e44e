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


def call(what: str, function, *args):
    """function(*args), or a test failure that says what was expected and which exception came back instead."""
    try:
        return function(*args)
    except Exception as error:  # noqa: BLE001  (the student's exception is what came back)
        pytest.fail(f"{what}: {function.__name__}{args} raised {type(error).__name__}: {error}", pytrace=False)


# --- percentile and summarize: the statistics every metric is reported with ------------------------------------------


def test_percentile_takes_a_percentage_from_0_to_100(metrics):
    values = [4.0, 1.0, 3.0, 2.0]
    try:
        median = metrics.percentile(values, 50)
    except Exception as error:  # noqa: BLE001
        pytest.fail(f"percentile({values}, 50) raised {type(error).__name__}: {error}: q is a percentage in [0, 100] "
                    "(50 is the median), not a fraction in [0, 1]", pytrace=False)  # fmt: skip
    check(median, 2.5, f"percentile({values}, 50), the median", [(2.0, "nearest rank instead of interpolation")])
    what = f"percentile({values}, 0.5): the 0.5th percentile"
    check(call(what, metrics.percentile, values, 0.5), 1.015, what, [
        (2.5, "q is a percentage in [0, 100] (50 is the median), not a fraction in [0, 1]"),
        (1.0, "nearest rank instead of interpolation"),
    ])  # fmt: skip
    for q in (-1, 100.5, 150):
        what = f"percentile(values, {q}): q outside [0, 100]"
        expect_error(ValueError, lambda q=q: metrics.percentile(values, q), what)


def test_percentile_interpolates_between_the_closest_ranks(metrics):
    values = [4.0, 1.0, 3.0, 2.0]
    for q, expected in ((0, 1.0), (50, 2.5), (99, 3.97), (100, 4.0), (25, 1.75)):
        what = f"percentile({values}, {q})"
        check(call(what, metrics.percentile, values, q), expected, what, [
            (sorted(values)[min(3, math.ceil(q / 100 * 4) - 1 if q else 0)], "nearest rank instead of interpolation"),
        ])  # fmt: skip
    assert values == [4.0, 1.0, 3.0, 2.0], f"percentile must not reorder its input: it is now {values}"


def test_percentile_and_summary_of_no_values_are_zero(metrics):
    what = "percentile([], 50): no values, so 0.0"
    check(call(what, metrics.percentile, [], 50), 0.0, what)
    stats = call("summarize([]): no values, so all 0.0", metrics.summarize, [])
    assert (stats.mean, stats.median, stats.p99) == (0.0, 0.0, 0.0), f"summarize([]): no values, all 0.0, got {stats}"


def test_summarize_reports_mean_median_and_p99(metrics):
    values = [0.3, 0.1, 0.2, 1.0]
    stats = call(f"summarize({values})", metrics.summarize, values)
    check(stats.mean, 0.4, f"mean of {values}")
    check(stats.median, 0.25, f"median of {values} (the 50th percentile, interpolated)", [
        (0.2, "nearest rank instead of interpolation"),
    ])  # fmt: skip
    check(stats.p99, 0.979, f"p99 of {values} (rank 0.99 x 3 = 2.97: 0.3 + 0.97 x 0.7)", [
        (1.0, "nearest rank instead of interpolation"),
    ])  # fmt: skip


# --- serving_metrics, on a hand-made run ----------------------------------------------------------------------------


def test_counts_and_throughputs_divide_by_the_wall_time(metrics):
    m = metrics.serving_metrics(timelines(), duration=2.0)
    check(m.completed, 3, "completed requests", [(4, "the failed request counted as completed")])
    check(m.failed, 1, "failed requests (refused, no tokens)")
    check(m.total_input_tokens, 60, "input tokens (completed requests only)", [(100, "the failed request counted")])
    check(m.total_output_tokens, 8, "output tokens streamed", [(13, "counted output_len, not tokens received")])
    check(m.request_throughput, 1.5, "requests/s = completed / duration", [(2.0, "the failed request counted")])
    check(m.output_throughput, 4.0, "output tokens/s = 8 / 2 s")
    check(m.total_token_throughput, 34.0, "total tokens/s = (60 + 8) / 2 s")


def test_a_request_without_tokens_is_not_completed_even_if_not_marked_failed(metrics):
    run = timelines() + [RequestTimeline(4, arrival=0.5, prompt_len=50, output_len=2)]  # no token, failed is False
    m = metrics.serving_metrics(run, duration=2.0)
    check(m.completed, 3, "completed requests", [(4, "a request that streamed no token counted as completed")])
    check(m.failed, 2, "failed requests: the refused one and the one that streamed no token")
    check(m.total_input_tokens, 60, "input tokens (completed requests only)", [
        (110, "a request that streamed no token counted as completed"),
    ])  # fmt: skip


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


def test_tpot_is_the_mean_gap_after_the_first_token(metrics):
    uneven = [RequestTimeline(0, arrival=0.0, prompt_len=8, output_len=4, token_times=[0.5, 0.6, 0.7, 1.1])]
    m = metrics.serving_metrics(uneven, duration=2.0)
    # (E2EL - TTFT) / (tokens - 1) = (1.1 - 0.5) / 3 = 0.2; its gaps 0.1, 0.1 and 0.4 have the median 0.1
    check(m.tpot.mean, 0.2, "TPOT of one request with gaps 0.1, 0.1, 0.4", [
        (0.1, "TPOT is the mean gap, (E2EL - TTFT) / (output tokens - 1), not the median gap"),
    ])  # fmt: skip
    check(m.itl.median, 0.1, "median ITL of the gaps 0.1, 0.1, 0.4", [
        (0.2, "ITL is every gap of every request pooled, not a per-request average"),
    ])  # fmt: skip


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
    zero = "an SLO of 0 is an SLO (only None means none)"
    m = metrics.serving_metrics(timelines(), duration=2.0, ttft_slo=0.0)
    check(m.goodput, 0.0, "goodput with a TTFT SLO of 0 s: no request has TTFT <= 0", [(1.5, zero)])
    m = metrics.serving_metrics(timelines(), duration=2.0, tpot_slo=0.0)
    check(m.goodput, 0.5, "goodput with a TPOT SLO of 0 s: only request 1, which has no TPOT, meets it", [
        (1.5, zero),
    ])  # fmt: skip
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
    expect_error(ValueError, lambda: metrics.serving_metrics(timelines(), duration=-1.0), "a negative duration")
