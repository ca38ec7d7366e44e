"""One test process of `python -m grader`: start it, follow its records, and say how it ended.

`run_child` starts a pytest child with a plan (which tests to run, which student modules are known to be broken),
hands it the results channel and the per-run key (grader/channel.py), and follows it with its own clock:
`_Follower` checks every verified record against the plan and the run so far (what it rejects: grader/supervisor.py),
and the deadlines come from each test's limit (grader/limits.py), the start-up and between-tests allowances below, and
the exercise's remaining time. When the child ends, its process group and any process it abandoned are killed
(grader/sandbox.py), and `ChildRun` says what was reported, what was in flight, and why it stopped.
"""

from __future__ import annotations

import json
import os
import re
import select
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import limits, sandbox
from .channel import CHANNEL_FD_ENV, KEY_FD_ENV, PLAN_ENV, TRACEBACK_FD_ENV, Receiver, new_key
from .reporter import MEMORY_LIMIT_ENV
from .scoring import TestResult

STARTUP_LIMIT = 180.0  # seconds for a child to import torch and collect (a loaded 2-core machine is slow)
BETWEEN_TESTS_LIMIT = 60.0  # seconds from one test's result to the next test's start
EXIT_GRACE = 10.0  # seconds a child has to exit after `done`
TRACEBACK_TAIL = 64 * 1024
TRACEBACK_WAIT = 1.0  # seconds a hung child has to say where it is before it is killed


@dataclass
class ChildCommand:
    """How to start a test process: `argv` (python -m pytest ...), the environment, where its output goes."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    output: object = None  # a file for the child's stdout and stderr; None: the terminal
    run_as: str | None = None
    memory_limit: int | None = None  # bytes of address space (RLIMIT_AS), CPU-only runs


@dataclass
class ChildRun:
    """What one child reported, and how it ended."""

    collected: list[str] | None = None
    collected_tests: list[dict] | None = None
    collect_errors: list[dict] = field(default_factory=list)
    gpus: int = 0
    results: dict[str, TestResult] = field(default_factory=dict)
    in_flight: str | None = None
    importing: str | None = None
    ending: str = "finished"  # finished, timed out, crashed, forged, stalled, out of budget
    returncode: int | None = None
    tracebacks: str = ""
    rejected: list[str] = field(default_factory=list)
    after_done: list[str] = field(default_factory=list)
    poisoned: bool = False  # the test process asked for a fresh one for the rest (see `fresh`: why)
    fresh: str = ""
    done: bool = False  # the session finished normally (sent `done`)


def run_child(command: ChildCommand, plan: dict, plan_path: Path, limits_by_id: dict[str, float],
              budget_deadline: float = float("inf")) -> ChildRun:  # fmt: skip
    """Start one child with `plan`, follow its records until it ends, and say what happened."""
    plan_path.write_text(json.dumps(plan))
    key = new_key()
    records_r, records_w = os.pipe()
    key_r, key_w = os.pipe()
    traceback_r, traceback_w = os.pipe()
    os.write(key_w, key)
    os.close(key_w)
    env = dict(command.env)
    env.update({CHANNEL_FD_ENV: str(records_w), KEY_FD_ENV: str(key_r), TRACEBACK_FD_ENV: str(traceback_w),
                PLAN_ENV: str(plan_path)})  # fmt: skip
    if command.memory_limit:
        env[MEMORY_LIMIT_ENV] = str(command.memory_limit)
    kwargs = {}
    if command.run_as:
        kwargs.update(user=command.run_as, group=_group_of(command.run_as), extra_groups=[])
    try:
        process = subprocess.Popen(command.argv, env=env, cwd=command.cwd, pass_fds=(records_w, key_r, traceback_w),
                                   stdout=command.output, stderr=subprocess.STDOUT if command.output else None,
                                   start_new_session=True, **kwargs)  # fmt: skip
    except (OSError, KeyError, ValueError) as exc:  # no such user, no permission to run Python as that user
        for fd in (records_r, records_w, key_r, traceback_r, traceback_w):
            os.close(fd)
        return ChildRun(ending="crashed", tracebacks=f"the test process could not be started: {exc}")
    sandbox.track(process.pid)
    for fd in (records_w, key_r, traceback_w):
        os.close(fd)
    try:
        run = _follow(process, Receiver(key), records_r, traceback_r, plan, limits_by_id, budget_deadline)
    finally:
        sandbox.kill_group(process.pid)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        sandbox.untrack(process.pid)
        sandbox.reap_orphans()
        os.close(records_r)
        os.close(traceback_r)
    if run.returncode is None:
        run.returncode = process.returncode
    return run


def _group_of(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_gid


def _follow(process, receiver: Receiver, records_fd: int, traceback_fd: int, plan: dict,
            limits_by_id: dict[str, float], budget_deadline: float) -> ChildRun:  # fmt: skip
    follower = _Follower(plan, limits_by_id)
    follower.pid = process.pid
    run = follower.run
    open_fds = {records_fd, traceback_fd}
    selector = selectors.DefaultSelector()
    for fd in open_fds:
        selector.register(fd, selectors.EVENT_READ)
    noted = 0  # rejections already acted on
    while run.ending != "forged":
        deadline, stalled = follower.deadline()
        if budget_deadline < deadline:
            deadline, stalled = budget_deadline, "out of budget"
        now = time.monotonic()
        if now >= deadline or follower.out_of_cpu_time(process.pid):
            run.ending = stalled if stalled != "finished" else run.ending
            if run.ending == "timed out":
                _ask_for_tracebacks(process.pid, traceback_fd, run)
            break
        exited = process.poll() is not None  # then read what it left in the pipes and stop (a helper it forked
        events = selector.select(timeout=0 if exited else min(deadline - now, 0.5))  # may hold them open)
        for key, _ in events:
            data = os.read(key.fd, 65536)
            if not data:
                selector.unregister(key.fd)
                open_fds.discard(key.fd)
                if key.fd == records_fd:
                    receiver.finish()
            elif key.fd == traceback_fd:
                run.tracebacks = (run.tracebacks + data.decode(errors="replace"))[-TRACEBACK_TAIL:]
            else:
                for record in receiver.feed(data):
                    follower.handle(record)
        if len(receiver.rejected) > noted:  # junk in the pipe: forged while tests run, noted after `done`
            if follower.done_at is None:
                follower.forged(receiver.rejected[noted])
            else:
                run.after_done += receiver.rejected[noted:]
            noted = len(receiver.rejected)
        if exited and not events:
            break
    selector.close()
    if process.poll() is None:
        sandbox.kill_group(process.pid)
        process.wait()
    run.returncode = process.returncode
    if run.ending == "finished" and run.in_flight is not None:
        run.ending = "crashed"
    return run


class _Follower:
    """Checks each verified record against the plan and the run so far (module docstring: what is rejected)."""

    def __init__(self, plan: dict, limits_by_id: dict[str, float]):
        self.run = ChildRun()
        self.planned = set(plan["run"]) if plan.get("run") is not None else None
        self.limits = limits_by_id
        self.order: list[str] = []
        self.position = 0
        self.done_at: float | None = None
        self.last = self.started = time.monotonic()
        self.started_cpu: float | None = None  # the child's CPU seconds when the test in flight started
        self.pid: int | None = None

    def deadline(self) -> tuple[float, str]:
        """When to stop waiting, and what it means if that time comes."""
        run = self.run
        if run.in_flight is not None:
            limit = self.limits.get(run.in_flight, 0.0)
            return (self.started + limits.wall_deadline(limit) if limit else float("inf")), "timed out"
        if self.done_at is not None:
            return self.done_at + EXIT_GRACE, "finished"
        return self.last + (STARTUP_LIMIT if run.collected is None else BETWEEN_TESTS_LIMIT), "stalled"

    def out_of_cpu_time(self, pid: int) -> bool:
        """Whether the test in flight has burnt more CPU time than its hard deadline (a hang the test process could
        not interrupt itself, e.g. in native code or with its signals blocked)."""
        limit = self.limits.get(self.run.in_flight, 0.0) if self.run.in_flight is not None else 0.0
        if not limit or self.started_cpu is None:
            return False
        spent = cpu_seconds(pid)
        return spent is not None and spent - self.started_cpu > limits.hard_deadline(limit)

    def forged(self, why: str) -> None:
        self.run.rejected.append(why)
        self.run.ending = "forged"

    def handle(self, record) -> None:
        run, fields = self.run, record.fields
        self.last = time.monotonic()
        if self.done_at is not None:
            run.after_done.append(f"a {record.kind!r} record after the test process had finished")
        elif (record.seq == 0) != (record.kind == "collected"):
            self.forged(f"a {record.kind!r} record as record number {record.seq}")
        elif record.kind == "collected":
            run.collected = list(fields.get("nodeids") or [])
            run.collected_tests = fields.get("tests")
            run.gpus = int(fields.get("gpus") or 0)
            self.order = [n for n in run.collected if self.planned is None or n in self.planned]
        elif record.kind == "collect_error":
            run.collect_errors.append(fields)
        elif record.kind == "start":
            expected = self.order[self.position] if self.position < len(self.order) else None
            if run.in_flight is not None or fields.get("nodeid") != expected:
                return self.forged(f"a 'start' of {fields.get('nodeid')!r} out of the plan's order")
            run.in_flight, run.importing, self.started = expected, None, self.last
            self.started_cpu = cpu_seconds(self.pid) if self.pid is not None else None
        elif record.kind in ("importing", "imported"):
            if run.in_flight is None:
                return self.forged(f"an {record.kind!r} record outside a test")
            run.importing = fields.get("module") if record.kind == "importing" else None
        elif record.kind == "result":
            self._result(fields)
        elif record.kind == "done":
            self.done_at = self.last
            run.done = True
        else:
            self.forged(f"a record of unknown kind {record.kind!r}")

    def _result(self, fields: dict) -> None:
        run, nodeid = self.run, fields.get("nodeid")
        if nodeid != run.in_flight or nodeid in run.results or not isinstance(fields.get("test"), dict):
            return self.forged(f"a 'result' for {nodeid!r}, which was not the test in flight")
        try:
            result = TestResult.from_record(fields["test"])
        except (TypeError, KeyError, ValueError) as exc:
            return self.forged(f"a 'result' that does not parse ({exc})")
        if result.nodeid != nodeid:
            return self.forged(f"a 'result' whose test is {result.nodeid!r}, not {nodeid!r}")
        run.results[nodeid] = result
        run.in_flight, run.importing = None, None
        run.poisoned = run.poisoned or bool(fields.get("poisoned"))
        if fields.get("poisoned") and isinstance(fields.get("fresh"), str):
            run.fresh = fields["fresh"][:200]
        self.position += 1


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of process `pid` (every thread), from /proc; None where it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return None


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _ask_for_tracebacks(pid: int, traceback_fd: int, run: ChildRun) -> None:
    """Before a hung child is killed, ask it (SIGUSR1, which its faulthandler answers even from native code) where
    it is, and read what it writes."""
    try:
        os.kill(pid, signal.SIGUSR1)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + TRACEBACK_WAIT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([traceback_fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        data = os.read(traceback_fd, 65536)
        if not data:
            break
        run.tracebacks = (run.tracebacks + data.decode(errors="replace"))[-TRACEBACK_TAIL:]
        if b"Current thread" in data or b"Thread 0x" in data:
            deadline = min(deadline, time.monotonic() + 0.1)  # the dump came: take what follows it and stop


FRAME = re.compile(r'File "(?P<path>[^"]+)", line (?P<line>\d+) in (?P<name>\S+)')


def where_it_hung(tracebacks: str, roots: list[Path]) -> str | None:
    """The innermost frame under one of `roots` (the student's code first) in the last faulthandler dump."""
    dumps = tracebacks.split("Current thread")  # faulthandler writes the current thread first, innermost frame first
    frames = [m.groupdict() for m in FRAME.finditer(dumps[-1] if len(dumps) > 1 else tracebacks)]
    for root in roots:
        for frame in frames:
            path = Path(frame["path"])
            if root in path.parents:
                return f"{path.name}:{frame['line']} in {frame['name']}()"
    return None
