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
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H200: 60 MB)
SPIN_CYCLES = 2_000_000  # about 1 ms at 2 GHz: longer than the host needs to launch one call


class EventStamp:
    """A point on the GPU timeline. `later - earlier` waits for `later` and gives the seconds between them."""

    __slots__ = ("event",)

    def __init__(self):
        import torch

        self.event = torch.cuda.Event(enable_timing=True)
        self.event.record()

    def __sub__(self, earlier: EventStamp) -> float:
        self.event.synchronize()
        return earlier.event.elapsed_time(self.event) / 1e3


def cuda_event_clock() -> EventStamp:
    """The timer given to pytest-benchmark for GPU speed tests."""
    return EventStamp()


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
        start = EventStamp()
        result = fn(*args, **kwargs)
        elapsed = EventStamp() - start
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
                start = time.perf_counter()
                result = fn(*args, **kwargs)
                elapsed = time.perf_counter() - start
            if check is not None:
                check(name, result, *args, **kwargs)
            if i >= warmup:
                samples[name].append(elapsed)
    return {name: Timing(s) for name, s in samples.items()}
