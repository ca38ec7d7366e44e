"""The `speed` and `host_speed` fixtures: time work the same way in every exercise and judge it against a threshold.

    def test_dequant_bandwidth(impl, speed):
        timing = speed.bench(kernel, setup=fresh_inputs, check=compare_with_reference)
        fraction = speed.bandwidth_fraction(timing, nbytes)
        speed.judge("dequant_bandwidth_fraction", fraction, roofline=fraction)

`bench` is the test's main measurement: it goes through pytest-benchmark (so `--benchmark-json` carries it) with a
CUDA-event clock. `time` measures baselines in the same test with the same method. Both call `setup()` for fresh
inputs before every call, flush L2 outside the timed region, warm up first, and hand every timed result to
`check`, so a fast wrong answer never passes. Thresholds come from the exercise's thresholds.toml, never seconds.
`bench` holds the code under test to more (grader/timed_inputs.py, grader/timing.py): `check` is required, every
call must get a freshly made input, the inputs must come back unchanged (`inputs_written` names any the function
writes by design), and work left running on another CUDA stream after the call returns fails the test.

`host_speed` is the same discipline for work that runs on the CPU (an allocator, a scheduler), graded on every
machine, CPU-only CI included:

    def test_allocate_is_constant_time(impl, host_speed):
        timings = host_speed.compare({"small pool": (op, small_setup), "large pool": (op, large_setup)})
        ratio = timings["large pool"].median / timings["small pool"].median
        host_speed.judge("large_over_small_pool", ratio)

`compare` times its calls interleaved, so both medians see the same machine load (grader/timing.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from pathlib import Path

import pytest

from . import device, timing
from .scoring import Scoreboard, SpeedResult
from .thresholds import resolve
from .timed_inputs import TimedInputs
from .timing import L2Flusher, Timing, gc_paused, time_calls, time_host_calls, time_host_interleaved

Setup = Callable[[], tuple[tuple, dict]]

_session_bandwidth: list[float] = []


def session_copy_bandwidth() -> float:
    """Measured once per session, the first time a speed test needs it."""
    if not _session_bandwidth:
        _session_bandwidth.append(timing.copy_bandwidth())
    return _session_bandwidth[0]


class Judge:
    """Records a measured ratio against its threshold and fails the test, with a clear message, if it misses."""

    def __init__(self, nodeid: str, benchmark, impl: str, thresholds: Path, scoreboard: Scoreboard):
        self.nodeid = nodeid
        self.benchmark = benchmark
        self.impl = impl
        self.thresholds = thresholds
        self.scoreboard = scoreboard
        self.last_bandwidth: tuple[float | None, float | None] = (None, None)  # bytes/s achieved, copy bandwidth

    @property
    def gpu(self) -> str | None:
        return device.gpu_name()

    @property
    def hardware(self) -> str:
        return f"GPU {self.gpu}"

    def judge(self, name: str, measured: float, *, roofline: float | None = None, detail: str = "") -> None:
        """Record `measured` against the threshold `name` and fail the test with a clear message if it misses."""
        threshold = resolve(self.thresholds, name, self.impl, self.gpu)
        passed = threshold.passes(measured)
        achieved, limit = self.last_bandwidth if roofline is not None else (None, None)
        result = SpeedResult(threshold, measured, passed, roofline, detail, achieved, limit, self.hardware)
        self.scoreboard.record_speed(self.nodeid, result)
        self.benchmark.extra_info[name] = measured
        self.benchmark.extra_info[f"{name}_threshold"] = f"{threshold.symbol} {threshold.value:g}"
        if not passed:
            pytest.fail(
                f"{threshold.what}: measured {measured:.3g}, needs {threshold.symbol} {threshold.value:g} "
                f"(threshold {threshold.source}, {self.hardware}). {detail}".strip(),
                pytrace=False,
            )


class Speed(Judge):
    def __init__(self, nodeid: str, benchmark, impl: str, thresholds: Path, scoreboard: Scoreboard):
        super().__init__(nodeid, benchmark, impl, thresholds, scoreboard)
        self.flush = L2Flusher()

    @property
    def copy_bandwidth(self) -> float:
        """Bytes/s of a device-to-device copy (read + write), measured at the first speed test of the session."""
        bandwidth = session_copy_bandwidth()
        self.benchmark.extra_info["copy_bandwidth_bytes_per_s"] = bandwidth
        return bandwidth

    def time(self, fn: Callable, setup: Setup, *, rounds: int = 20, warmup: int = 3, check=None) -> Timing:
        """Time a baseline: same method as `bench`, not reported to pytest-benchmark."""
        return time_calls(fn, setup, self.flush, rounds=rounds, warmup=warmup, check=check)

    def bench(self, fn: Callable, setup: Setup, *, rounds: int = 20, warmup: int = 3, check=None,
              inputs_written: Collection[int | str] = ()) -> Timing:  # fmt: skip
        """Time the code under test through pytest-benchmark; every timed result goes through `check` (required)."""
        if check is None:
            raise TypeError("speed.bench needs check=: every timed output is re-checked, so a fast wrong one fails")
        inputs = TimedInputs(setup, inputs_written)

        def setup_then_flush():
            args, kwargs = inputs()
            self.flush()
            return args, kwargs

        def verified(result, *args, **kwargs):
            inputs.verify()
            check(result, *args, **kwargs)

        first = len(timing.stray_work)
        measured = _checked_pedantic(self.benchmark, fn, setup_then_flush, rounds, warmup, verified)
        stray = timing.stray_work_message(timing.stray_work[first:])
        del timing.stray_work[first:]
        if stray:
            pytest.fail(stray, pytrace=False)
        return measured

    def bandwidth_fraction(self, timing: Timing, nbytes: int) -> float:
        achieved = nbytes / timing.median
        fraction = achieved / self.copy_bandwidth
        self.benchmark.extra_info.update(bytes=nbytes, bytes_per_s=achieved, roofline_fraction=fraction)
        self.last_bandwidth = (achieved, self.copy_bandwidth)
        return fraction


class HostSpeed(Judge):
    """Times host (CPU) work: `time.perf_counter`, garbage collector paused, warm-up, fresh inputs; ratios of host
    timings use each side's best round (`Timing.best`), which a busy machine does not move."""

    @property
    def hardware(self) -> str:
        return f"host CPU, {os.cpu_count()} cores"

    def time(self, fn: Callable, setup: Setup, *, rounds: int = 20, warmup: int = 3, check=None) -> Timing:
        """Time a baseline: same method as `bench`, not reported to pytest-benchmark."""
        return time_host_calls(fn, setup, rounds=rounds, warmup=warmup, check=check)

    def compare(self, calls: dict[str, tuple[Callable, Setup]], *, rounds: int = 20, warmup: int = 3, check=None):
        """Time several pieces of work interleaved (one call of each per round): {name: Timing}.

        `check(name, result, *args, **kwargs)` sees every timed result. Runs through pytest-benchmark, one round
        being one call of each piece, so `--benchmark-json` carries the rounds and each piece's median.
        """
        if self.benchmark.disabled:  # under xdist or --benchmark-disable: time it ourselves, report nothing
            return time_host_interleaved(calls, rounds=rounds, warmup=warmup, check=check)
        samples: dict[str, list[float]] = {name: [] for name in calls}
        finished_rounds = []

        def one_round(prepared):
            for name, (fn, _) in calls.items():
                args, kwargs = prepared[name]
                timing = time_host_interleaved({name: (fn, lambda a=args, k=kwargs: (a, k))}, 1, 0, check)
                if len(finished_rounds) >= warmup:
                    samples[name].append(timing[name].median)

        self.benchmark.pedantic(
            one_round,
            setup=lambda: (({name: setup() for name, (_, setup) in calls.items()},), {}),
            teardown=lambda prepared: finished_rounds.append(True),
            rounds=rounds,
            warmup_rounds=warmup,
        )
        timings = {name: Timing(s) for name, s in samples.items()}
        for name, measured in timings.items():
            self.benchmark.extra_info[f"median_seconds[{name}]"] = measured.median
        return timings

    def bench(self, fn: Callable, setup: Setup, *, rounds: int = 20, warmup: int = 3, check=None) -> Timing:
        """Time the code under test through pytest-benchmark's host clock; every timed result goes through `check`."""
        if self.benchmark.disabled:  # under xdist or --benchmark-disable: time it ourselves, report nothing
            return self.time(fn, setup, rounds=rounds, warmup=warmup, check=check)

        def gc_paused_fn(*args, **kwargs):
            with gc_paused():
                return fn(*args, **kwargs)

        return _checked_pedantic(self.benchmark, gc_paused_fn, setup, rounds, warmup, check)


def _checked_pedantic(benchmark, fn: Callable, setup: Setup, rounds: int, warmup: int, check) -> Timing:
    """pytest-benchmark's pedantic mode, with each call's result handed to `check` after its round (outside timing)."""
    results = []

    def timed(*args, **kwargs):
        results.append(fn(*args, **kwargs))

    def teardown(*args, **kwargs):
        result = results.pop()
        if check is not None:
            check(result, *args, **kwargs)

    benchmark.pedantic(timed, setup=setup, teardown=teardown, rounds=rounds, warmup_rounds=warmup)
    return Timing(list(benchmark.stats.stats.data))
