"""The host clock times CPU work: it runs on every machine."""

import gc
import time

from grader.timing import time_host_calls, time_host_interleaved


def test_host_clock_sees_the_work():
    short = time_host_calls(lambda: time.sleep(0.002), lambda: ((), {}), rounds=5, warmup=1).median
    long = time_host_calls(lambda: time.sleep(0.010), lambda: ((), {}), rounds=5, warmup=1).median
    assert 0.0015 < short < long and long > 0.009, (
        f"2 ms of sleep timed {short * 1e3:.2f} ms, 10 ms {long * 1e3:.2f} ms"
    )


def test_interleaved_calls_alternate_and_every_result_is_checked():
    order, seen = [], []
    calls = {name: (lambda n=name: order.append(n) or n, lambda: ((), {})) for name in ("a", "b")}
    timings = time_host_interleaved(calls, rounds=3, warmup=1, check=lambda name, result: seen.append((name, result)))
    assert order == ["a", "b"] * 4 and seen == [("a", "a"), ("b", "b")] * 4
    assert all(len(t.samples) == 3 for t in timings.values())


def test_the_garbage_collector_is_paused_inside_a_timed_call_and_restored_after():
    states = []
    time_host_calls(lambda: states.append(gc.isenabled()), lambda: ((), {}), rounds=2, warmup=0)
    assert states == [False, False] and gc.isenabled()


def test_a_single_timing_checks_results_like_the_gpu_clock():
    seen = []
    time_host_calls(lambda x: x + 1, lambda: ((1,), {}), rounds=2, warmup=1, check=lambda out, x: seen.append((out, x)))
    assert seen == [(2, 1)] * 3
