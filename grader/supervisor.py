"""The parent's side of `python -m grader`: run tests in child processes, watch them, and decide every score.

For one batch of tests (an exercise's correctness tests, or its speed tests) the supervisor starts a pytest child
with a plan (which tests to run), reads its records as they arrive (grader/channel.py), and keeps its own clock:

- a test that does not report back within its hard deadline (grader/limits.py) is charged as timed out, with the
  place it was stopped if faulthandler got to say it; the child is killed;
- a child that dies in the middle of a test (a segmentation fault, the out-of-memory killer, `os._exit`) costs that
  test, with the cause in words; a child that stops after a broken CUDA context costs nothing more;
- in every case the tests that had not started yet run again in a fresh child, without the finished ones; a student
  module whose import hung or crashed the child is not imported again (its tests fail at once, with the reason);
- the maximum never depends on how a run ended: points come from the collection pass, before any student code ran,
  and every collected test ends with a result, "not run" included (a test skipped while running counts as failed).

What the parent rejects, and what that costs: a record with a wrong signature or sequence number, a `result` for a
test other than the one in flight or a second one, a `start` out of the plan's order, a record that is not one of
ours: the child is killed, the test in flight scores 0 and the rest of the batch is not graded ("forged"). Records
after `done` (an atexit hook) are rejected and noted, and change nothing. A child after which the course's files
changed (grader/sandbox.py) has none of its results accepted, and no further child is started.

What remains possible, and why: where the student's code runs in the test process itself (the exercises that
grader/isolation.py does not list, and every exercise's speed tests and in-process instrumented tests), it can read
anything that process holds, the channel's key included, and it can patch pytest or the grader in ways that undo
themselves before the guard looks (grader/guard.py). A submission written against this grader's internals can forge
those results. The isolated exercises close that: their student module runs in a sandbox process that holds no key
and cannot reach the test process (grader/sandbox_process.py), and their in-process tests earn points only when
every isolated correctness test passed. What this design guarantees everywhere is that the grade cannot be changed
after the fact (files, atexit hooks, forked helpers), by a crash or a hang, by replacing a helper for more than a
phase, or by anything a generic cheat (not one written against this grader) does. Run the test processes as another
user (`--run-as`) so that they cannot write the grader, the installed packages or the results either.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import failures, limits, sandbox
from .child import STARTUP_LIMIT, ChildCommand, ChildRun, run_child, where_it_hung
from .scoring import TestResult


class Compromised:
    """Set once the course's files changed under a test process: from then on nothing is accepted or started."""

    def __init__(self, manifest: sandbox.Manifest | None):
        self.manifest = manifest
        self.changes: list[str] = []
        self._lock = threading.Lock()

    def check(self) -> list[str]:
        with self._lock:
            if self.manifest is not None and not self.changes:
                self.changes = self.manifest.changes()
            return self.changes

    def message(self) -> str:
        shown = ", ".join(self.changes[:5]) + (f" and {len(self.changes) - 5} more" if len(self.changes) > 5 else "")
        return (
            f"not graded: a test process changed the course's files ({shown}), so nothing it or a later process "
            "reported can be trusted"
        )


class Budget:
    """An exercise's time (--timeout), spent by its batches one after another."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.left = float("inf") if not seconds else float(seconds)

    def deadline(self) -> float:
        return time.monotonic() + self.left

    def spend(self, elapsed: float) -> None:
        self.left -= elapsed

    @property
    def exhausted(self) -> bool:
        return self.left <= 0


@dataclass
class Batch:
    """Tests of one exercise that run together: its correctness tests, or its speed tests."""

    exercise: str
    label: str  # "correctness", "speed (GPU)", "speed (host)"
    tests: list[TestResult]  # as collected: points, limits, visibility; outcome "not run"
    env: dict[str, str] = field(default_factory=dict)  # extra environment (CUDA_VISIBLE_DEVICES)
    results: dict[str, TestResult] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    processes: int = 0


def grade_batch(batch: Batch, command: ChildCommand, scratch: Path, budget: Budget, compromised: Compromised,
                roots: list[Path]) -> Batch:  # fmt: skip
    """Run the batch's tests, in as many fresh children as faults make necessary; every test ends with a result."""
    planned = {t.nodeid: t for t in batch.tests}
    limits_by_id = {t.nodeid: t.limit for t in batch.tests}
    broken: dict[str, str] = {}
    pending = list(batch.tests)
    command = ChildCommand(**{**command.__dict__, "env": {**command.env, **batch.env}})

    def close(tests, message: str) -> None:
        for test in tests:
            batch.results[test.nodeid] = _final(test, "failed", message)

    while pending:
        if sandbox.stopping.is_set():
            close(pending, "not run: grading was interrupted")
            break
        if compromised.changes:
            close(pending, compromised.message())
            break
        if budget.exhausted:
            close(pending, f"not run: exercise {batch.exercise} ran out of its {budget.seconds:g} s (--timeout)")
            break
        batch.processes += 1
        plan = {"run": [t.nodeid for t in pending], "broken": broken}
        began = time.monotonic()
        run = run_child(command, plan, scratch / f"plan-{batch.exercise}-{id(batch)}-{batch.processes}.json",
                        limits_by_id, budget.deadline())  # fmt: skip
        budget.spend(time.monotonic() - began)
        if compromised.check():
            close(pending, compromised.message())
            break
        for nodeid, result in run.results.items():
            if nodeid in planned:
                batch.results[nodeid] = _accepted(planned[nodeid], result)
        if sandbox.stopping.is_set():  # the child was killed by Ctrl-C, not by its own doing
            close([t for t in pending if t.nodeid not in batch.results], "not run: grading was interrupted")
            break
        if run.in_flight is not None:
            test = planned[run.in_flight]
            message = _charge(run, test, budget, batch.exercise, roots)
            batch.results[test.nodeid] = _final(test, "failed", message)
            batch.events.append(f"{test.exercise} {test.name}: {message.split('. ')[0]}")
            if run.importing and run.ending in ("timed out", "crashed"):
                what = "did not finish in time" if run.ending == "timed out" else "crashed the test process"
                broken[run.importing] = f"importing it {what} (in {test.name}): {message.split('. ')[0]}"
        if run.after_done:
            batch.events.append(f"rejected {len(run.after_done)} record(s) sent after the test process had finished "
                                "(an atexit hook of the code under test?): they changed nothing")  # fmt: skip
        rest = [t for t in pending if t.nodeid not in batch.results]
        if run.ending == "forged":
            why = run.rejected[0] if run.rejected else "a record it could not verify"
            close(rest, f"not graded: the results channel received {why}; the code under test wrote into it, so the "
                        "rest of this exercise is not graded")  # fmt: skip
            batch.events.append(f"exercise {batch.exercise}: forged record rejected ({why}); the rest not graded")
            break
        if run.collected is None:
            close(rest, "not run: " + _startup_failure(run))
            batch.events.append(f"exercise {batch.exercise}: the test process failed before running any test")
            break
        missing = [t for t in rest if t.nodeid not in run.collected]
        close(missing, "not run: the test process did not collect this test (its id changed between runs?)")
        rest = [t for t in rest if t.nodeid not in batch.results]
        if rest and run.done and run.in_flight is None and not run.poisoned:
            close(rest, "not run: the test session stopped before this test (-x or --maxfail, or pytest.exit called "
                        "by the code under test)")  # fmt: skip
            break
        if len(rest) == len(pending):
            close(rest, f"not run: the test process stopped without running them ({run.ending}, exit code "
                        f"{run.returncode})")  # fmt: skip
            break
        if rest:
            cause = (run.fresh or "a broken CUDA context") if run.poisoned else run.ending
            batch.events.append(f"exercise {batch.exercise}: {len(rest)} test(s) run again in a fresh process "
                                f"(after {cause})")  # fmt: skip
        pending = rest
    return batch


def _final(test: TestResult, outcome: str, message: str) -> TestResult:
    return TestResult(**{**test.__dict__, "speed": [], "outcome": outcome, "message": message})


def _accepted(planned: TestResult, reported: TestResult) -> TestResult:
    """The child's verdict on the parent's terms: points, limit and visibility come from the collection."""
    outcome, message = reported.outcome, reported.message
    if outcome == "skipped" and not planned.skip_reason:
        outcome, message = "failed", f"skipped while running, which counts as a failure: {message}"
    elif outcome not in ("passed", "failed"):
        outcome, message = "failed", message or "the test did not finish"
    final = _final(planned, outcome, "" if outcome == "passed" else message)
    final.speed = reported.speed
    final.duration = reported.duration
    final.cpu_seconds = reported.cpu_seconds
    return final


def _charge(run: ChildRun, test: TestResult, budget: Budget, exercise: str, roots: list[Path]) -> str:
    """What the test in flight is charged with, in words."""
    if run.ending == "timed out":
        return limits.timeout_message(test.limit, where_it_hung(run.tracebacks, roots))
    if run.ending == "out of budget":
        return f"not finished: exercise {exercise} ran out of its {budget.seconds:g} s (--timeout)"
    if run.ending == "forged":
        why = run.rejected[0] if run.rejected else "a record it could not verify"
        return f"not graded: the results channel received {why} while this test ran"
    return failures.crash_message(run.returncode, run.importing)


def _startup_failure(run: ChildRun) -> str:
    if run.ending == "stalled":
        return f"the test process did not start within {STARTUP_LIMIT:g} s"
    if run.returncode is None:
        return run.tracebacks
    tail = run.tracebacks.strip().splitlines()[-3:]
    return f"the test process failed before running any test (exit code {run.returncode})" + (
        ": " + " | ".join(tail) if tail else ""
    )
