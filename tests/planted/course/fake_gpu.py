"""A fake GPU for the grader's own tests: `speed` tests run without CUDA, on a clock the tests control.

`install()` makes the grader believe a GPU is present, and replaces the CUDA-event clock by the host clock, the L2
flush by nothing, and the copy bandwidth by a constant. `leave_work_running(seconds)` stands for a kernel launched on
another stream and not waited for: the next clock subtraction reports the device busy that long after the end stamp.
"""

from time import perf_counter

import grader.device
import grader.speed
import grader.timing

COPY_BANDWIDTH = 1e12  # bytes/s
_pending = [0.0]


def leave_work_running(seconds: float) -> None:
    _pending[0] += seconds


class FakeStamp:
    def __init__(self):
        self.at = perf_counter()

    def __sub__(self, earlier):
        elapsed = self.at - earlier.at
        grader.timing.stray_work.append((elapsed, _pending[0]))
        _pending[0] = 0.0
        return elapsed


class NoFlush:
    def __call__(self):
        pass


def install() -> None:
    grader.device.cuda_available = lambda: True
    grader.device.gpu_name = lambda: "Fake GPU"
    grader.timing.cuda_event_clock = FakeStamp
    grader.timing.copy_bandwidth = lambda: COPY_BANDWIDTH
    grader.speed.L2Flusher = NoFlush
