"""GPU timing: CUDA events after warm-up, L2 flushed outside the timed region, fresh inputs, medians.

The host clock cannot time GPU work: a launch returns in microseconds while the kernel runs on. So the clock handed
to pytest-benchmark returns a *stamp*, a CUDA event recorded on the current stream; subtracting two stamps waits for
the later event and returns the seconds between them on the GPU's own timeline. Inputs are made and L2 is flushed
before the start stamp, without a host synchronize, so the GPU is still busy with that work while the host launches
the timed call: the launch latency stays out of the measurement, as in `triton.testing.do_bench`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H200: 60 MB)


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
    def __init__(self, nbytes: int = FLUSH_BYTES):
        import torch

        self.buffer = torch.empty(nbytes // 4, dtype=torch.int32, device="cuda")

    def __call__(self) -> None:
        self.buffer.zero_()  # queued on the stream, no host wait: see the module docstring


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
    timing = time_calls(dst.copy_, lambda: ((src,), {}), lambda: None, rounds=rounds, warmup=5)
    if not torch.equal(dst, src):
        raise RuntimeError("copy bandwidth measurement: the copy came back wrong")
    return 2 * nbytes / timing.median
