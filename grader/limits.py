"""Time limits per test: one infinite loop costs the test it is in, not the exercise, and a busy machine costs nothing.

Limits are counted in *CPU time* (`clock()`: this process's user and system time, every thread), not wall time. A
hang that is a loop burns CPU time at full speed however busy the machine is, so it is caught in seconds; an honest
test on a machine whose cores are shared with other work takes longer on the wall clock but no more CPU time, so it
does not run out of time. A hang that burns no CPU (a deadlock, a sleep) is caught by a wall-clock backstop,
`wall_deadline`, several times longer.

Every graded test gets a limit for its setup and its call together:
- `--test-timeout` seconds (DEFAULT_TEST_LIMIT unless set; 0 turns limits off; GPU speed tests get SPEED_FACTOR times
  that), raised for a test that is long by design by `@pytest.mark.time_limit(s)`;
- tightened, for a correctness test, to what it normally costs where that is known (a speed test keeps its limit:
  its time grows with the code it times, and its ratio must be what judges slow code): `recorded_times.json` beside
  each exercise's tests
  holds the reference solution's CPU time for each test (`python -m grader.times`), and the limit becomes
  TIME_FACTOR times that, scaled by how fast this machine is (`machine_scale`: a fixed calibration loop timed here
  against the machine that recorded), and never below FLOOR (FLOOR_CUDA with a GPU). So a student whose function
  loops forever loses a few seconds per test that calls it, not the exercise.
Teardown gets a quarter of the limit on top, so that fixtures still finalise after a test that used all of its time.

Two mechanisms enforce it. In the test process, SIGPROF (CPU time) and SIGALRM (the wall backstop) raise
`TimeLimitExceeded` in the hung code: a hang in Python (a loop, a Triton kernel under the interpreter) becomes an
ordinary failure with a traceback that points at the loop, and the process carries on with the next test. A hang in
C (a spinning kernel, a deadlock, a handler that blocks the signals) cannot be interrupted from inside, so
`python -m grader` also watches every test from the parent process, reading the child's CPU time from /proc, and
kills the child at `hard_deadline` of CPU time (or `wall_deadline` of wall time), a little later: that costs the
test in flight, and the parent runs the rest in a fresh process (grader/supervisor.py).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

DEFAULT_TEST_LIMIT = 120.0  # CPU seconds: the slowest graded tests of any exercise take about 20 s on a 2-core CPU
# (a few more take 100 s and say so with a marker); most take well under a second
SPEED_FACTOR = 3  # GPU speed tests time dozens of calls and their baselines: three times the default
TEARDOWN_SHARE = 0.25  # teardown's allowance, as a fraction of the limit, on top of it
KILL_GRACE = 5.0  # at most this many seconds the parent waits past the in-process limit before it kills the process
WALL_FACTOR = 6  # the wall-clock backstop: this many times the CPU deadline (a busy machine slows wall time) ...
WALL_EXTRA = 60.0  # ... plus this many seconds (a short limit must still survive a slow start)
TIME_FACTOR = 20.0  # a recorded test may take this many times the reference's CPU time ...
FLOOR = 6.0  # ... and never less than this many CPU seconds
# With CUDA, a test's first use of a kernel costs CPU seconds that the recording (on a CPU, under the Triton
# interpreter) never saw: Triton and cuBLAS compile or load kernels, CUDA graphs are captured, libraries that import
# CUDA pieces lazily import them. An H100 machine spent over 6 CPU-s in one such import.
FLOOR_CUDA = 30.0
RECORDED_TIMES = "recorded_times.json"  # beside an exercise's tests: {"calibration": s, "tests": {nodeid: s}}
SCALE_ENV = "INFERLAB_MACHINE_SCALE"  # the parent measures the machine once and hands its children the scale
CALIBRATION_ROUNDS = 3


class TimeLimitExceeded(BaseException):
    """Raised in a test that ran past its limit. A BaseException, so that `except Exception` in the code under test
    (or hypothesis, which retries failing examples) does not swallow it."""

    def __init__(self, seconds: float):
        super().__init__(timeout_message(seconds))
        self.seconds = seconds


def clock() -> float:
    """The clock limits run on: this process's CPU time, every thread (what a busy loop spends, whatever the load)."""
    return time.process_time()


def limit_of(item, default: float) -> float:
    """The test's limit in CPU seconds: its `time_limit` marker, else the session default (0: no limit), tightened
    to TIME_FACTOR times the reference's recorded time on this machine (never below FLOOR) where one is recorded."""
    marker = item.get_closest_marker("time_limit")
    if marker is None:
        limit = float(default)
    else:
        limit = float(marker.args[0] if marker.args else marker.kwargs["seconds"])
        if limit <= 0:
            raise ValueError(f"{item.nodeid}: time_limit must be positive seconds, got {limit:g}")
    # A speed test's time grows with the code it times by design: its ratio, not its limit, must judge slow code.
    timed = {"speed", "host_speed"} & set(getattr(item, "fixturenames", ()))
    recorded = None if timed else recorded_time(Path(str(item.path)).parent, item.nodeid)
    if limit and recorded is not None:
        limit = min(limit, round(max(floor(), TIME_FACTOR * recorded * machine_scale()), 1))
    return limit


def floor() -> float:
    from .device import cuda_available

    return FLOOR_CUDA if cuda_available() else FLOOR


def recorded_time(folder: Path, nodeid: str) -> float | None:
    """The reference's CPU seconds for `nodeid`, in the calibration units of the machine that recorded it."""
    times = _recorded(folder)
    seconds = times.get("tests", {}).get(nodeid)
    if seconds is None or not times.get("calibration"):
        return None
    return float(seconds) / float(times["calibration"])


@functools.cache
def _recorded(folder: Path) -> dict:
    path = folder / RECORDED_TIMES
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def calibrate() -> float:
    """CPU seconds of a fixed piece of Python work on this machine (the best of a few rounds): the unit in which
    recorded times are stored, so that a slower machine gets proportionally longer limits."""
    best = float("inf")
    for _ in range(CALIBRATION_ROUNDS):
        began = time.process_time()
        total, table = 0, {}
        for i in range(200_000):  # dict and integer work, as a test's Python is
            table[i & 1023] = total = (total + i * i) % 1_000_003
        best = min(best, time.process_time() - began)
    return max(best, 1e-4)


@functools.cache
def machine_scale() -> float:
    """This machine's calibration time (from the parent when there is one, else measured here)."""
    given = os.environ.get(SCALE_ENV)
    try:
        return float(given) if given else calibrate()
    except ValueError:
        return calibrate()


def hard_deadline(limit: float) -> float:
    """CPU seconds after a test starts at which the parent process stops waiting for it."""
    return limit * (1 + TEARDOWN_SHARE) + kill_grace(limit)


def wall_deadline(limit: float) -> float:
    """Wall seconds after a test starts at which the parent stops waiting for it even if it burns no CPU."""
    return hard_deadline(limit) * WALL_FACTOR + WALL_EXTRA


def kill_grace(limit: float) -> float:
    return min(KILL_GRACE, max(1.0, limit))


def timeout_message(seconds: float, where: str | None = None) -> str:
    where = f" It was stopped in {where}." if where else ""
    return (
        f"timed out after {seconds:g} s: the test did not finish within its time limit (CPU time).{where} "
        "One common cause is a loop that never ends (a condition that stays true, an index that never advances); "
        "another is work far slower than the reference."
    )


@contextmanager
def alarm(seconds: float, limit: float):
    """Raise TimeLimitExceeded(limit) in this (main) thread after `seconds` of CPU time, or after the wall-clock
    backstop for `limit`; a no-op where impossible (no itimers, another thread, a debugger)."""
    usable = limit > 0 and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable or sys.gettrace() is not None:  # a debugger is stepping through the test: no limit
        yield
        return

    def expire(signum, frame):
        raise TimeLimitExceeded(limit)

    previous = {sig: signal.signal(sig, expire) for sig in (signal.SIGPROF, signal.SIGALRM)}
    signal.setitimer(signal.ITIMER_PROF, max(seconds, 1e-3))
    signal.setitimer(signal.ITIMER_REAL, wall_deadline(limit))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
