"""Timing: GPU work with CUDA events, host work with the host clock; warm-up, fresh inputs, medians.

The host clock cannot time GPU work: a launch returns in microseconds while the kernel runs on. So the clock handed
to pytest-benchmark returns a *stamp*, a CUDA event recorded on the current stream; subtracting two stamps waits for
the later event and returns the seconds between them on the GPU's own timeline.

Before the start stamp, L2 is flushed by *reading* a buffer larger than it, and the GPU is given a short spin to run,
without a host synchronize. Reading leaves L2 full of clean lines that cost nothing to evict; zeroing a buffer (what
`triton.testing.do_bench` does) leaves up to L2's size of dirty lines, whose write-back then lands in the timed call
(about 3 us on an H200: 7% of a 40 us kernel). While the GPU spins, the host gets through the timed call's launch
(Python, argument checks, Triton's launcher), so the measurement starts with work already queued and counts the GPU's
time, not a GPU idling on a slow host. (That is what `triton.testing.do_bench` gets by queueing many calls back to
back.) The host cost of every launch after the first one still counts: a decode loop that is bound by its launches
is measured as such.

Host work (an allocator, a scheduler: Python on the CPU) is timed with `time.perf_counter` with the garbage
collector paused, so that a collection of the whole heap never lands inside one call. Two pieces of host work that a
test compares are timed *interleaved*, call by call, so that both see the same machine: on a shared 2-core CI runner
the load changes from second to second, and a ratio of two medians taken a second apart would carry that change.

The clocks are the ones bound when the grader was imported (`perf_counter` below, the CUDA event functions in
`bind_cuda`, which the plugin calls before any student code runs): code under test that replaces `time.perf_counter`
or `torch.cuda.Event.elapsed_time` does not change what the grader measures (and grader/guard.py fails the test).

Work left running on another CUDA stream would end after the end stamp and go unmeasured, so subtracting two stamps
also waits for the whole device and notes how much longer that took than on an idle device (`stray_work`): a timed
call whose device was still busy well after its end stamp has launched work the stamp did not wait for.
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from time import perf_counter  # bound at import, before any student code: see the module docstring

FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H200: 60 MB)
SPIN_CYCLES = 2_000_000  # about 1 ms at 2 GHz: longer than the host needs to launch one call


# Seconds. On an H200, after a long pytest session (many streams and graphs made by earlier tests), the first device
# synchronize after an honest call took 46-62 us, and still 37-46 us more than a second synchronize right after it:
# driver work, not a kernel. So a call counts as leaving work behind only when the device stays busy longer than a
# floor plus the call's own time.
STRAY_FLOOR = 100e-6  # twice the worst seen, since the fix could not be re-run on a GPU


class _Cuda:
    """torch.cuda's event functions, bound once (`bind_cuda`) so that a replaced one does not change our clock."""

    Event = record = synchronize = elapsed_time = device_synchronize = None


def bind_cuda() -> None:
    """Bind the CUDA clock functions now (the plugin calls this before the code under test is imported)."""
    if _Cuda.Event is not None:
        return
    import torch

    _Cuda.Event = torch.cuda.Event
    _Cuda.record = torch.cuda.Event.record
    _Cuda.synchronize = torch.cuda.Event.synchronize
    _Cuda.elapsed_time = torch.cuda.Event.elapsed_time
    _Cuda.device_synchronize = torch.cuda.synchronize


# (GPU seconds between the stamps, host seconds the whole device then took to go idle), one per subtraction
stray_work: list[tuple[float, float]] = []


class EventStamp:
    """A point on the GPU timeline. `later - earlier` waits for `later` and gives the seconds between them."""

    __slots__ = ("event",)

    def __init__(self):
        bind_cuda()
        self.event = _Cuda.Event(enable_timing=True)
        _Cuda.record(self.event)

    def __sub__(self, earlier: EventStamp) -> float:
        _Cuda.synchronize(self.event)
        elapsed = _Cuda.elapsed_time(earlier.event, self.event) / 1e3
        # Every stream: anything still running was launched and not waited for. A second synchronize, on a device
        # now surely idle, costs what the call itself costs (tens of microseconds on a busy host); the difference is
        # the time the device really stayed busy.
        start = perf_counter()
        _Cuda.device_synchronize()
        busy = perf_counter() - start
        start = perf_counter()
        _Cuda.device_synchronize()
        stray_work.append((elapsed, max(0.0, busy - (perf_counter() - start))))
        return elapsed


def cuda_event_clock() -> EventStamp:
    """The timer given to pytest-benchmark for GPU speed tests."""
    return EventStamp()


def stray_work_message(measurements: list[tuple[float, float]]) -> str | None:
    """Why the timings cannot be trusted, if the device kept running well past the end stamps; else None."""
    if not measurements:
        return None
    elapsed = statistics.median(e for e, _ in measurements)
    stray = statistics.median(s for _, s in measurements)
    if stray <= STRAY_FLOOR + elapsed:
        return None
    return (
        f"work was left running on another CUDA stream: the timed calls measured {elapsed * 1e6:.1f} us (median), "
        f"but the GPU stayed busy {stray * 1e6:.1f} us after each call's end was recorded on the current stream. "
        "Launch the work on torch.cuda.current_stream(), or make the current stream wait for your stream "
        "(torch.cuda.current_stream().wait_stream(s)) before returning."
    )


class L2Flusher:
    """Evicts L2 by reading, then queues a spin that covers the host's launch of the timed call (module docstring)."""

    def __init__(self, nbytes: int = FLUSH_BYTES, spin_cycles: int = SPIN_CYCLES):
        import torch

        self.buffer = torch.zeros(nbytes // 4, dtype=torch.int32, device="cuda")
        self.spin_cycles = spin_cycles

    def __call__(self) -> None:
        import torch

        self.buffer.max()  # reads every line; the one-element result is the only write
        torch.cuda._sleep(self.spin_cycles)


@dataclass
class Timing:
    samples: list[float]  # seconds, one per timed call

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        """The fastest call. On the host clock a busy machine only ever adds time to a call (another process took
        the core mid-call), so the best of many interleaved rounds is what a ratio of host timings should use: it stays
        put when the load changes, where the median drifts with it."""
        return min(self.samples)

    @property
    def spread(self) -> float:
        """Relative interquartile range: how much the samples disagree."""
        if len(self.samples) < 4:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.samples, n=4)
        return (q3 - q1) / self.median


def time_calls(
    fn: Callable,
    setup: Callable[[], tuple[tuple, dict]],
    flush: Callable[[], None],
    rounds: int,
    warmup: int,
    check: Callable | None = None,
) -> Timing:
    """Time `fn(*args, **kwargs)` with fresh `setup()` arguments and a flushed L2 before each call."""
    samples = []
    for i in range(warmup + rounds):
        args, kwargs = setup()
        flush()
        start = cuda_event_clock()
        result = fn(*args, **kwargs)
        elapsed = cuda_event_clock() - start
        if check is not None:
            check(result, *args, **kwargs)
        if i >= warmup:
            samples.append(elapsed)
    return Timing(samples)


def copy_bandwidth(nbytes: int = 2**30, rounds: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written: the roofline's roof."""
    import torch

    src = torch.randint(-(2**31), 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device="cuda")
    dst = torch.empty_like(src)
    spin = lambda: torch.cuda._sleep(SPIN_CYCLES)  # noqa: E731  (no flush: 1 GiB does not fit in any L2)
    timing = time_calls(dst.copy_, lambda: ((src,), {}), spin, rounds=rounds, warmup=5)
    if not torch.equal(dst, src):
        raise RuntimeError("copy bandwidth measurement: the copy came back wrong")
    return 2 * nbytes / timing.median


@contextmanager
def gc_paused():
    """No garbage collection inside: a collection of the whole heap would land in whichever call it interrupted."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def time_host_calls(
    fn: Callable,
    setup: Callable[[], tuple[tuple, dict]],
    rounds: int,
    warmup: int,
    check: Callable | None = None,
) -> Timing:
    """Time host work `fn(*args, **kwargs)` with fresh `setup()` arguments, garbage collector paused per call.

    `check(result, *args, **kwargs)` sees every timed result, as in `time_calls`.
    """
    named_check = None if check is None else (lambda name, result, *args, **kwargs: check(result, *args, **kwargs))
    return time_host_interleaved({"fn": (fn, setup)}, rounds, warmup, named_check)["fn"]


def time_host_interleaved(
    calls: dict[str, tuple[Callable, Callable[[], tuple[tuple, dict]]]],
    rounds: int,
    warmup: int,
    check: Callable | None = None,
) -> dict[str, Timing]:
    """Time several pieces of host work, one call of each in turn per round, so all see the same machine load.

    `calls` maps a name to `(fn, setup)`; `check(name, result, *args, **kwargs)` sees every timed result.
    """
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(warmup + rounds):
        for name, (fn, setup) in calls.items():
            args, kwargs = setup()
            with gc_paused():
                start = perf_counter()
                result = fn(*args, **kwargs)
                elapsed = perf_counter() - start
            if check is not None:
                check(name, result, *args, **kwargs)
            if i >= warmup:
                samples[name].append(elapsed)
    return {name: Timing(s) for name, s in samples.items()}
