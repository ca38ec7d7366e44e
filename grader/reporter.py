"""The test process's side of `python -m grader`: run the tests the parent planned, report each one as it finishes.

Registered by the plugin when the parent started this process (grader/supervisor.py). Before any student code is
imported it reads the per-run key (and closes its pipe), reads the plan (which tests to run, which student modules an
earlier process found broken), lowers its own priority for the out-of-memory killer (so that the machine's memory
running out kills this process, not the grader), and points faulthandler at a pipe the parent reads, so that a
crash or a hang leaves a Python traceback behind for the report. Then it streams records over the results channel
(grader/channel.py): the tests it collected, and for each test `start`, the imports of student modules, and `result`.
"""

from __future__ import annotations

import faulthandler
import json
import os
import resource
import signal

import pytest

from . import limits
from .channel import CHANNEL_FD_ENV, KEY_FD_ENV, PLAN_ENV, TRACEBACK_FD_ENV, Sender
from .confine import confine_writes
from .impl import Implementations
from .scoring import Scoreboard

MEMORY_LIMIT_ENV = "INFERLAB_GRADER_MEMORY_LIMIT"  # bytes of address space for the test process (CPU-only runs)


def _read_key(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 64):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


class ChildReporter:
    def __init__(self, config: pytest.Config, impls: Implementations, scores: Scoreboard, poisoned: list,
                 stopped_in_import: list):  # fmt: skip
        self._scores = scores  # the plugin's: this module never imports the plugin (no import cycle)
        self._poisoned = poisoned
        self._stopped_in_import = stopped_in_import
        self._sender = Sender(int(os.environ.pop(CHANNEL_FD_ENV)), _read_key(int(os.environ.pop(KEY_FD_ENV))))
        self._tracebacks = os.fdopen(int(os.environ.pop(TRACEBACK_FD_ENV)), "w")
        faulthandler.enable(file=self._tracebacks, all_threads=False)
        # The parent asks with SIGUSR1 where a test that ran out of CPU time is stuck, before it kills this process.
        faulthandler.register(signal.SIGUSR1, file=self._tracebacks, all_threads=False)
        with open(os.environ.pop(PLAN_ENV)) as f:
            plan = json.load(f)
        self._collect_only = plan.get("collect_only", False)
        self._run = plan.get("run")
        impls.known_broken.update(plan.get("broken", {}))
        impls.listener = lambda event, module: self._sender.send(event, module=module)
        self._session = None
        _protect_the_grader(os.environ.pop(MEMORY_LIMIT_ENV, ""))
        confine_writes(config.rootpath)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, session: pytest.Session, config: pytest.Config, items: list) -> None:
        self._session = session
        if self._run is None:
            return
        wanted = set(self._run)
        deselected = [item for item in items if item.nodeid not in wanted]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if item.nodeid in wanted]

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        import torch

        tests = [t.to_record() for t in self._scores.tests.values()] if self._collect_only else None
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        self._sender.send("collected", nodeids=[item.nodeid for item in session.items], tests=tests, gpus=gpus)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self._sender.send("collect_error", path=str(report.nodeid), message=report.longreprtext[-4000:])

    def pytest_runtest_logstart(self, nodeid: str, location) -> None:
        self._sender.send("start", nodeid=nodeid)
        test = self._scores.tests.get(nodeid)
        if test is not None and test.limit:
            # A last word before the parent kills a test hung in native code: where it was. The parent asks for it
            # with SIGUSR1 when the test runs out of CPU time; this covers the wall-clock backstop (a deadlock).
            when = limits.wall_deadline(test.limit) - limits.kill_grace(test.limit) / 2
            faulthandler.dump_traceback_later(when, file=self._tracebacks)

    def pytest_runtest_logfinish(self, nodeid: str, location) -> None:
        faulthandler.cancel_dump_traceback_later()
        test = self._scores.tests.get(nodeid)
        # After a broken CUDA context, or a test stopped inside an import, this process is not fit to go on: the
        # parent runs the remaining tests in a fresh one.
        fresh = "a broken CUDA context" if self._poisoned else ""
        fresh = fresh or ("a test stopped by its time limit inside an import" if self._stopped_in_import else "")
        self._sender.send("result", nodeid=nodeid, test=test.to_record() if test is not None else None,
                          poisoned=bool(fresh), fresh=fresh)  # fmt: skip
        if fresh and self._session is not None:
            self._session.shouldstop = f"{fresh}: the grader runs the remaining tests afresh"

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus) -> None:
        self._sender.send("done", exitstatus=int(exitstatus))


def _protect_the_grader(memory_limit: str) -> None:
    """Make this process the one the out-of-memory killer picks, and cap its memory if asked."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    if memory_limit:
        limit = int(memory_limit)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
