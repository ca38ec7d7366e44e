"""pytest hooks and fixtures of the grader: options, markers, implementation loading, skips, reports.

Markers:
    points(n)       the test is worth n points (default 1)
    gpu             needs a CUDA GPU; skipped without one
    speed           judged against a threshold in the exercise's thresholds.toml (implies gpu)
    exercise("NN")  the exercise a test belongs to, for tests that live outside exercises/NN/
    visibility(v)   Gradescope visibility of the test in results.json (hidden tests: "hidden")
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from . import device
from .impl import IMPL_CHOICES, ImplementationError, Implementations
from .scoring import Scoreboard, TestResult
from .speed import HostSpeed, Speed
from .timing import cuda_event_clock

IMPLS = pytest.StashKey[Implementations]()
SCORES = pytest.StashKey[Scoreboard]()
STARTED = pytest.StashKey[float]()
INTERPRETER = pytest.StashKey[bool]()

MARKERS = (
    "points(n): the test is worth n points (default 1)",
    "gpu: needs a CUDA GPU; skipped without one",
    "speed: judged against a threshold from the exercise's thresholds.toml; needs a CUDA GPU",
    'exercise(id): the exercise a test belongs to, e.g. exercise("01"), for tests outside exercises/NN/',
    'visibility(v): who sees this test in results.json: "visible" (default), "hidden", "after_due_date" or '
    '"after_published"',
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("inferlab", "inferlab grading")
    group.addoption(
        "--impl",
        choices=IMPL_CHOICES,
        default=None,
        help="which code the exercise tests exercise: the student's stubs (default) or the reference solutions; "
        "also settable as $INFERLAB_IMPL",
    )
    group.addoption(
        "--solutions",
        metavar="PATH",
        default=None,
        help="solutions tree for --impl=solution (default: ./solutions; also $INFERLAB_SOLUTIONS)",
    )
    group.addoption("--results", metavar="PATH", default=None, help="write Gradescope's results.json here")


def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    interpreter = device.use_interpreter_without_cuda()
    impls = Implementations.from_options(config.rootpath, config.getoption("impl"), config.getoption("solutions"))
    config.stash[IMPLS] = impls
    config.stash[SCORES] = Scoreboard(impls.kind)
    config.stash[STARTED] = time.time()
    config.stash[INTERPRETER] = interpreter


def pytest_report_header(config: pytest.Config) -> list[str]:
    impls = config.stash[IMPLS]
    lines = device.header_lines(interpreter=config.stash[INTERPRETER])
    lines.append(f"inferlab: grading the {impls.kind} implementation ({impls.root})")
    return lines


def exercise_of(item: pytest.Item) -> str | None:
    marker = item.get_closest_marker("exercise")
    if marker is not None:
        return str(marker.args[0])
    try:
        parts = item.path.relative_to(item.config.rootpath).parts
    except ValueError:
        return None
    if len(parts) > 2 and parts[0] == "exercises":
        return parts[1]
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        needs_gpu = item.get_closest_marker("gpu") or item.get_closest_marker("speed")
        if needs_gpu and not device.cuda_available():
            reason = device.NO_GPU_REASON if item.get_closest_marker("speed") else device.NEEDS_GPU_REASON
            item.add_marker(pytest.mark.skip(reason=reason))
        fixtures = getattr(item, "fixturenames", ())
        if "speed" in fixtures:
            item.add_marker(pytest.mark.benchmark(timer=cuda_event_clock, group=f"exercise {exercise_of(item)}"))
        elif "host_speed" in fixtures:
            item.add_marker(pytest.mark.benchmark(group=f"exercise {exercise_of(item)} (host)"))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Register what will run (after -k/-m deselection), so the score counts exactly the selected tests."""
    scores = session.config.stash[SCORES]
    for item in session.items:
        exercise = exercise_of(item)
        if exercise is not None:
            points = item.get_closest_marker("points")
            visibility = item.get_closest_marker("visibility")
            test = TestResult(item.nodeid, exercise, item.name, float(points.args[0]) if points else 1.0)
            test.visibility = visibility.args[0] if visibility else "visible"
            host_timed = "host_speed" in getattr(item, "fixturenames", ())
            test.speed_test = item.get_closest_marker("speed") is not None or host_timed
            scores.add(test)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if call.excinfo is not None and _is_stub_placeholder(call.excinfo):
        entry = call.excinfo.traceback[-1]
        where = f"{Path(entry.path).name}:{entry.lineno + 1} in {entry.name}()"
        report.longrepr = f"not implemented yet: {where}\n{call.excinfo.value}"
    if report.skipped and report.when == "call" and exercise_of(item) is not None:
        # Graded tests are skipped only by the grader (in setup: no GPU, benchmarks off). A skip raised while one
        # runs comes from the code under test, and skipping is not passing.
        report.outcome = "failed"
        report.longrepr = f"skipped while running, which counts as a failure: {_skip_reason(report)}"
    if report.failed or report.skipped or report.when == "call":
        message = report.longreprtext if not report.skipped else f"skipped: {_skip_reason(report)}"
        item.config.stash[SCORES].record_phase(item.nodeid, report.when, report.outcome, message)
    return report


def _is_stub_placeholder(excinfo: pytest.ExceptionInfo) -> bool:
    """A stub's own `raise NotImplementedError(hint)`, not one raised by a library the student called."""
    if not excinfo.errisinstance(NotImplementedError):
        return False
    try:
        return "raise NotImplementedError" in str(excinfo.traceback[-1].statement)
    except Exception:
        return False


def _skip_reason(report: pytest.TestReport) -> str:
    if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return str(report.longrepr)


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    scores = config.stash[SCORES]
    score_lines = scores.score_lines()
    if not score_lines or os.environ.get("INFERLAB_SUMMARY") == "off":  # `python -m grader` prints its own
        return
    terminalreporter.write_sep("=", f"inferlab score ({scores.impl} implementation)")
    for line in score_lines:
        terminalreporter.write_line(line)
    speed_lines = scores.speed_lines()
    if speed_lines:
        terminalreporter.write_sep("-", "speed (ratios measured in this run; roofline = fraction of copy bandwidth)")
        for line in speed_lines:
            terminalreporter.write_line(line)
    failed = sorted({t.exercise for t in scores.tests.values() if t.outcome == "failed"})
    if failed:
        details = " ".join(f"exercises/{e}" for e in failed)
        terminalreporter.write_line(
            f"what to fix: pytest {details}" + (" --impl=solution" if scores.impl == "solution" else "")
        )
    results = config.getoption("results")
    if results:
        terminalreporter.write_line(f"results written to {results}")


def pytest_sessionfinish(session: pytest.Session) -> None:
    results = session.config.getoption("results")
    if results:
        elapsed = time.time() - session.config.stash[STARTED]
        session.config.stash[SCORES].write_gradescope(Path(results), elapsed)


@pytest.fixture
def impl(request: pytest.FixtureRequest):
    """`impl("kv_cache")` is the module under test: the student's or the solution's, by --impl."""
    impls = request.config.stash[IMPLS]
    exercise = exercise_of(request.node) or request.path.parent.name

    def load(module: str):
        try:
            return impls.load(exercise, module)
        except ImplementationError as exc:
            return Unavailable(str(exc))

    return load


class Unavailable:
    """Stands in for a module that could not be loaded: the first use fails the test (not its setup) and says why."""

    def __init__(self, reason: str):
        self._reason = reason

    def __getattr__(self, name: str):
        pytest.fail(self._reason, pytrace=False)


@pytest.fixture
def speed(request: pytest.FixtureRequest, benchmark) -> Speed:
    """Times GPU work with CUDA events and judges it against the exercise's thresholds.toml."""
    if not device.cuda_available():
        pytest.skip(device.NO_GPU_REASON)
    if benchmark.disabled:
        pytest.skip("speed not graded: benchmarks are disabled (--benchmark-disable, or pytest-xdist is running)")
    return Speed(*_judge_arguments(request, benchmark))


@pytest.fixture
def host_speed(request: pytest.FixtureRequest, benchmark) -> HostSpeed:
    """Times host (CPU) work with the host clock and judges it against the exercise's thresholds.toml; runs anywhere."""
    return HostSpeed(*_judge_arguments(request, benchmark))


def _judge_arguments(request: pytest.FixtureRequest, benchmark) -> tuple:
    exercise = exercise_of(request.node) or request.path.parent.name
    thresholds = request.config.rootpath / "exercises" / exercise / "thresholds.toml"
    impls = request.config.stash[IMPLS]
    return request.node.nodeid, benchmark, impls.kind, thresholds, request.config.stash[SCORES]
