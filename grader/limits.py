"""Time limits per test: one infinite loop costs the test it is in, not the exercise.

Every graded test gets `--test-timeout` seconds (DEFAULT_TEST_LIMIT unless set; 0 turns the limit off; GPU speed
tests get SPEED_FACTOR times that) for its setup and its call together; `@pytest.mark.time_limit(s)` raises it for a
test that is long by design. Teardown gets a
quarter of the limit on top, so that fixtures still finalise after a test that used all of its time.

Two mechanisms enforce it. In the test process, SIGALRM raises `TimeLimitExceeded` in the hung code: a hang in Python
(a loop, a Triton kernel under the interpreter) becomes an ordinary failure with a traceback that points at the loop,
and the process carries on with the next test. A hang in C (a spinning kernel, a deadlock, a handler that swallows
the signal) cannot be interrupted from inside, so `python -m grader` also watches every test from the parent process
and kills the child at `hard_deadline`, a little later: that costs the test in flight, and the parent runs the rest
in a fresh process (grader/supervisor.py).
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager

DEFAULT_TEST_LIMIT = 120.0  # seconds: the slowest graded tests of 01-05 take about 5 s on a loaded 2-core CPU, the
# slowest of any exercise about 20 s (a few more run 100 s and say so with a marker); the H200 runs faster
SPEED_FACTOR = 3  # GPU speed tests time dozens of calls and their baselines: three times the default
TEARDOWN_SHARE = 0.25  # teardown's allowance, as a fraction of the limit, on top of it
KILL_GRACE = 5.0  # at most this many seconds the parent waits past the in-process limit before it kills the process


class TimeLimitExceeded(BaseException):
    """Raised in a test that ran past its limit. A BaseException, so that `except Exception` in the code under test
    (or hypothesis, which retries failing examples) does not swallow it."""

    def __init__(self, seconds: float):
        super().__init__(timeout_message(seconds))
        self.seconds = seconds


def limit_of(item, default: float) -> float:
    """The test's limit in seconds: its `time_limit` marker, else the session default (0: no limit)."""
    marker = item.get_closest_marker("time_limit")
    if marker is None:
        return float(default)
    seconds = float(marker.args[0] if marker.args else marker.kwargs["seconds"])
    if seconds <= 0:
        raise ValueError(f"{item.nodeid}: time_limit must be positive seconds, got {seconds:g}")
    return seconds


def hard_deadline(limit: float) -> float:
    """Seconds after a test starts at which the parent process stops waiting for it."""
    return limit * (1 + TEARDOWN_SHARE) + kill_grace(limit)


def kill_grace(limit: float) -> float:
    return min(KILL_GRACE, max(1.0, limit))


def timeout_message(seconds: float, where: str | None = None) -> str:
    where = f" It was stopped in {where}." if where else ""
    return (
        f"timed out after {seconds:g} s: the test did not finish within its time limit.{where} "
        "One common cause is a loop that never ends (a condition that stays true, an index that never advances); "
        "another is work far slower than the reference."
    )


@contextmanager
def alarm(seconds: float, limit: float):
    """Raise TimeLimitExceeded(limit) in this (main) thread after `seconds` of wall time; no-op where impossible."""
    usable = limit > 0 and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable or sys.gettrace() is not None:  # a debugger is stepping through the test: no limit
        yield
        return

    def expire(signum, frame):
        raise TimeLimitExceeded(limit)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
