"""pytest hooks and fixtures of the grader: options, markers, implementation loading, skips, limits, reports.

Markers:
    points(n)           the test is worth n points (default 1)
    gpu                 needs a CUDA GPU; skipped without one
    speed               judged against a threshold in the exercise's thresholds.toml (implies gpu)
    exercise("NN")      the exercise a test belongs to, for tests that live outside exercises/NN/
    visibility(v)       Gradescope visibility of the test in results.json (hidden tests: "hidden")
    time_limit(s)       the test may take up to s seconds (default --test-timeout, 120 s)
    public_seeds        the secret seed is not mixed into this test's seeds (they were picked by hand)

Around every graded test the plugin seeds the random generators (grader/seeding.py, with the instructor's secret if
one is set), enforces the time limit (grader/limits.py), and checks after each phase that the grading helpers are
still the originals (grader/guard.py). Under `python -m grader` it also reports each test, as it finishes, to the
parent process (grader/reporter.py), which decides the score.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path

import pytest

from . import device, failures, isolation, limits, timing
from .channel import CHANNEL_FD_ENV
from .guard import Guard, modified_message
from .impl import IMPL_CHOICES, ImplementationError, Implementations
from .scoring import Scoreboard, TestResult
from .seeding import SECRET_ENV, Seeding, mix
from .speed import HostSpeed, Speed

IMPLS = pytest.StashKey[Implementations]()
SCORES = pytest.StashKey[Scoreboard]()
STARTED = pytest.StashKey[float]()
INTERPRETER = pytest.StashKey[bool]()
SEEDING = pytest.StashKey[Seeding]()
GUARD = pytest.StashKey[Guard]()
LIMIT = pytest.StashKey[float]()
POISONED = pytest.StashKey[list]()  # [nodeid] of the test that broke the CUDA context, once one has
STOPPED_IN_IMPORT = pytest.StashKey[list]()  # [nodeid] of a test stopped by its limit inside an import
TEST_START = pytest.StashKey[float]()  # CPU clock (limits.clock)
TEST_WALL_START = pytest.StashKey[float]()
TEST_LIMIT = pytest.StashKey[float]()
OUT_OF_MEMORY = pytest.StashKey[bool]()
SANDBOX = pytest.StashKey[object]()  # grader.sandbox_process.Sandbox, under `python -m grader`

MARKERS = (
    "points(n): the test is worth n points (default 1)",
    "gpu: needs a CUDA GPU; skipped without one",
    "speed: judged against a threshold from the exercise's thresholds.toml; needs a CUDA GPU",
    'exercise(id): the exercise a test belongs to, e.g. exercise("01"), for tests outside exercises/NN/',
    'visibility(v): who sees this test in results.json: "visible" (default), "hidden", "after_due_date" or '
    '"after_published"',
    "time_limit(seconds): this test may take up to `seconds` for its setup and call (default: --test-timeout)",
    "public_seeds: this test's seeds were picked by hand for the data they give: the secret seed is not mixed in",
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
    group.addoption(
        "--test-timeout",
        type=float,
        metavar="SECONDS",
        default=None,
        help=f"time limit of each graded test (default {limits.DEFAULT_TEST_LIMIT:g}; 0: none); "
        "@pytest.mark.time_limit(s) raises it for one test",
    )
    group.addoption(
        "--seed-secret",
        metavar="TEXT",
        default=None,
        help=f"mix this secret into every seed of the graded tests (also ${SECRET_ENV})",
    )


def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    interpreter = device.use_interpreter_without_cuda()
    timing.bind_cuda()  # the clocks are bound before any student code can replace them
    impls = Implementations.from_options(config.rootpath, config.getoption("impl"), config.getoption("solutions"))
    config.stash[IMPLS] = impls
    config.stash[SCORES] = Scoreboard(impls.kind)
    config.stash[STARTED] = time.time()
    config.stash[INTERPRETER] = interpreter
    config.stash[SEEDING] = Seeding(config.getoption("seed_secret") or os.environ.get(SECRET_ENV))
    config.stash[GUARD] = Guard()
    timeout = config.getoption("test_timeout")
    config.stash[LIMIT] = limits.DEFAULT_TEST_LIMIT if timeout is None else timeout
    config.stash[POISONED] = []
    config.stash[STOPPED_IN_IMPORT] = []
    if os.environ.get(CHANNEL_FD_ENV):
        from .reporter import ChildReporter
        from .sandbox_process import Sandbox

        impls.sandbox = config.stash[SANDBOX] = Sandbox(config.rootpath)
        reporter = ChildReporter(config, impls, config.stash[SCORES], config.stash[POISONED],
                                 config.stash[STOPPED_IN_IMPORT])  # fmt: skip
        config.pluginmanager.register(reporter, "inferlab-reporter")


def pytest_report_header(config: pytest.Config) -> list[str]:
    impls = config.stash[IMPLS]
    lines = device.header_lines(interpreter=config.stash[INTERPRETER])
    lines.append(f"inferlab: grading the {impls.kind} implementation ({impls.root})")
    if config.stash[SEEDING].secret:
        lines.append("inferlab: a secret seed is mixed into every seed of the graded tests")
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


def speed_kind(item: pytest.Item) -> str:
    fixtures = getattr(item, "fixturenames", ())
    if item.get_closest_marker("speed") is not None or "speed" in fixtures:
        return "gpu"
    return "host" if "host_speed" in fixtures else ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    benchmarks_off = _benchmarks_disabled(config)
    for item in items:
        kind = speed_kind(item)
        if (kind == "gpu" or item.get_closest_marker("gpu")) and not device.cuda_available():
            reason = device.NO_GPU_REASON if kind == "gpu" else device.NEEDS_GPU_REASON
            item.add_marker(pytest.mark.skip(reason=reason))
        elif kind == "gpu" and benchmarks_off:
            item.add_marker(pytest.mark.skip(reason=BENCHMARKS_OFF_REASON))
        fixtures = getattr(item, "fixturenames", ())
        if "speed" in fixtures:
            item.add_marker(pytest.mark.benchmark(timer=timing.cuda_event_clock, group=f"exercise {exercise_of(item)}"))
        elif "host_speed" in fixtures:
            item.add_marker(pytest.mark.benchmark(group=f"exercise {exercise_of(item)} (host)"))


BENCHMARKS_OFF_REASON = "speed not graded: benchmarks are disabled (--benchmark-disable, or pytest-xdist is running)"


def _benchmarks_disabled(config: pytest.Config) -> bool:
    try:
        disabled = bool(config.getoption("benchmark_disable"))
    except ValueError:  # pytest-benchmark not loaded
        return False
    distributed = getattr(config.option, "numprocesses", None) or hasattr(config, "workerinput")
    return disabled or bool(distributed)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Register what will run (after -k/-m deselection), so the score counts exactly the selected tests; then take
    the guard's snapshot, after every test module is imported and before any student code is."""
    config = session.config
    scores = config.stash[SCORES]
    for item in session.items:
        test = graded_test(item, config.stash[LIMIT])
        if test is not None:
            scores.add(test)
    config.stash[GUARD].snapshot(config.pluginmanager)
    sandbox = config.stash.get(SANDBOX, None)
    if sandbox is not None and any(isolation.isolated(t.exercise, t.name, t.speed_kind) for t in scores.tests.values()
                                   if not t.skip_reason and not config.option.collectonly):  # fmt: skip
        sandbox.start()  # it imports torch while the first test sets up


def graded_test(item: pytest.Item, default_limit: float) -> TestResult | None:
    exercise = exercise_of(item)
    if exercise is None:
        return None
    points = item.get_closest_marker("points")
    visibility = item.get_closest_marker("visibility")
    test = TestResult(item.nodeid, exercise, item.name, float(points.args[0]) if points else 1.0)
    test.visibility = visibility.args[0] if visibility else "visible"
    test.speed_kind = speed_kind(item)
    test.limit = limits.limit_of(item, default_limit * (limits.SPEED_FACTOR if test.speed_kind == "gpu" else 1))
    test.path = item.nodeid.split("::")[0]
    test.skip_reason = _skipped_by_marker(item)
    return test


def _skipped_by_marker(item: pytest.Item) -> str:
    """The reason of a skip or skipif marker that applies, known before the test runs (e.g. no GPU); else ""."""
    try:
        from _pytest.skipping import evaluate_skip_marks

        skip = evaluate_skip_marks(item)
    except Exception:  # a skipif condition that cannot be evaluated here is evaluated (and reported) in setup
        return ""
    return (skip.reason or "skipped") if skip is not None else ""


# --- around each graded test: seeds, time limit, the guard --------------------------------------------------------


def _graded(item: pytest.Item) -> bool:
    return item.nodeid in item.config.stash[SCORES].tests


def _remaining(item: pytest.Item) -> float:
    return item.stash[TEST_LIMIT] - (limits.clock() - item.stash[TEST_START])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    if not _graded(item):
        return (yield)
    config = item.config
    item.stash[TEST_START] = limits.clock()  # CPU time: a busy machine does not eat a test's limit
    item.stash[TEST_WALL_START] = time.monotonic()
    item.stash[TEST_LIMIT] = config.stash[SCORES].tests[item.nodeid].limit
    config.stash[SEEDING].begin(item.nodeid, mix_secret=item.get_closest_marker("public_seeds") is None)
    sandbox = config.stash.get(SANDBOX, None)
    if sandbox is not None:
        sandbox.begin_test(mix(config.stash[SEEDING].secret or "", f"sandbox:{item.nodeid}"), item.stash[TEST_LIMIT])
    if config.stash[POISONED]:
        pytest.fail(failures.poisoned_message(config.stash[POISONED][0]), pytrace=False)
    with limits.alarm(_remaining(item), item.stash[TEST_LIMIT]):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    if not _graded(item):
        return (yield)
    limit = item.stash[TEST_LIMIT]
    if limit and _remaining(item) <= 0:
        raise limits.TimeLimitExceeded(limit)
    with limits.alarm(_remaining(item), limit):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item):
    if not _graded(item) or TEST_START not in item.stash:
        return (yield)
    limit = item.stash[TEST_LIMIT]
    try:
        with limits.alarm(limit * limits.TEARDOWN_SHARE, limit):
            result = yield
        _surface_cuda_errors()
        return result
    finally:
        item.config.stash[SEEDING].end()
        sandbox = item.config.stash.get(SANDBOX, None)
        if sandbox is not None:
            sandbox.end_test()
        sys.last_type = sys.last_value = sys.last_traceback = None  # a failed test's frames hold its tensors
        if hasattr(sys, "last_exc"):
            sys.last_exc = None
        if item.stash.get(OUT_OF_MEMORY, False):
            _release_memory()


def _release_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _surface_cuda_errors() -> None:
    """An asynchronous kernel error surfaces at the next synchronisation: make it this test's, not the next one's."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    config = item.config
    graded = _graded(item)
    excinfo = call.excinfo
    if excinfo is not None and _is_stub_placeholder(excinfo):
        report.longrepr = f"not implemented yet: {_stub_where(excinfo)}\n{excinfo.value}"
    elif excinfo is not None and excinfo.errisinstance(limits.TimeLimitExceeded):
        report.longrepr = limits.timeout_message(excinfo.value.seconds, _where(excinfo, config))
        if _inside_an_import(excinfo.tb, config.stash[IMPLS].root):
            # A module stopped half-imported stays broken in sys.modules (its later users fail with odd errors):
            # under `python -m grader` the rest of the tests run in a fresh process.
            config.stash[STOPPED_IN_IMPORT].append(item.nodeid)
    elif excinfo is not None and graded:
        _explain_failure(item, report, excinfo)
    if report.skipped and report.when == "call" and exercise_of(item) is not None:
        # Graded tests are skipped only by the grader (in setup: no GPU, benchmarks off). A skip raised while one
        # runs comes from the code under test, and skipping is not passing.
        report.outcome = "failed"
        report.longrepr = f"skipped while running, which counts as a failure: {_skip_reason(report)}"
    if graded:
        seeding, guard = config.stash[SEEDING], config.stash[GUARD]
        changed = guard.modified(seeding.overrides)
        if changed:
            guard.restore(seeding.overrides)
            report.outcome = "failed"
            report.longrepr = modified_message(changed)
    if report.failed or report.skipped or report.when == "call":
        message = report.longreprtext if not report.skipped else f"skipped: {_skip_reason(report)}"
        config.stash[SCORES].record_phase(item.nodeid, report.when, report.outcome, message)
    if graded and report.when == "teardown":
        test = config.stash[SCORES].tests[item.nodeid]
        test.duration = time.monotonic() - item.stash.get(TEST_WALL_START, 0.0)
        test.cpu_seconds = limits.clock() - item.stash.get(TEST_START, 0.0)
    return report


def _explain_failure(item: pytest.Item, report: pytest.TestReport, excinfo: pytest.ExceptionInfo) -> None:
    """Say in words what an illegal memory access or an exhausted memory means; remember a broken CUDA context."""
    text = f"{excinfo.typename}: {excinfo.value}"
    if failures.poisons_cuda(text):
        poisoned = item.config.stash[POISONED]
        if not poisoned:
            poisoned.append(item.nodeid)
        report.longrepr = f"{report.longreprtext}\n\n{failures.POISON_NOTE}"
        return
    memory = failures.out_of_memory(excinfo.value)
    if memory:
        report.longrepr = f"{report.longreprtext}\n\n{failures.oom_note(memory)}"
        item.stash[OUT_OF_MEMORY] = True  # teardown lets go of the memory


def _inside_an_import(tb, impl_root) -> bool:
    """Whether a module's body was running where the exception was raised: an import in progress (Python leaves
    importlib's own frames out of tracebacks, but the imported module's `<module>` frame stays). The code under
    test's own import is left out: grader/impl.py remembers it and fails its later tests at once."""
    root = str(impl_root)
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "<module>" and not code.co_filename.startswith(root):
            return True
        tb = tb.tb_next
    return False


def _where(excinfo: pytest.ExceptionInfo, config: pytest.Config) -> str | None:
    """The innermost frame in the code under test (else in the test file) where a timed-out test was stopped."""
    impl_root = config.stash[IMPLS].root
    stack = getattr(excinfo.value, "sandbox_stack", None)
    if stack:  # stopped while the sandbox ran the code: where the sandbox's own stack was
        from .child import where_it_hung

        return where_it_hung(stack, [impl_root, config.rootpath])
    frames = [entry for entry in excinfo.traceback if "grader" not in Path(entry.path).parts[-2:-1]]
    for preferred in (lambda p: impl_root in p.parents, lambda p: config.rootpath in p.parents):
        for entry in reversed(frames):
            path = Path(entry.path)
            if preferred(path):
                return f"{path.name}:{entry.lineno + 1} in {entry.name}()"
    return None


def _is_stub_placeholder(excinfo: pytest.ExceptionInfo) -> bool:
    """A stub's own `raise NotImplementedError(hint)`, not one raised by a library the student called."""
    if not excinfo.errisinstance(NotImplementedError):
        return False
    frames = getattr(excinfo.value, "remote_frames", None)
    if frames:  # raised in the sandbox: its innermost frame is the one that counts
        return "raise NotImplementedError" in frames[-1][3]
    try:
        return "raise NotImplementedError" in str(excinfo.traceback[-1].statement)
    except Exception:
        return False


def _stub_where(excinfo: pytest.ExceptionInfo) -> str:
    frames = getattr(excinfo.value, "remote_frames", None)
    if frames:
        path, line, name, _ = frames[-1]
        return f"{Path(path).name}:{line} in {name}()"
    entry = excinfo.traceback[-1]
    return f"{Path(entry.path).name}:{entry.lineno + 1} in {entry.name}()"


def _skip_reason(report: pytest.TestReport) -> str:
    if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return str(report.longrepr)


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    scores = config.stash[SCORES]
    if os.environ.get("INFERLAB_SUMMARY") == "off":  # `python -m grader` prints its own
        return
    if config.option.collectonly:
        graded = [t for t in scores.tests.values() if not t.skip_reason]
        if graded:
            points = sum(t.points for t in graded)
            terminalreporter.write_line(f"inferlab: {len(graded)} graded tests collected, worth {points:g} points "
                                        "(nothing ran, so nothing is scored)")  # fmt: skip
        return
    score_lines = scores.score_lines()
    if not score_lines:
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
    test = request.config.stash[SCORES].tests.get(request.node.nodeid)
    isolated = (impls.sandbox is not None and test is not None
                and isolation.isolated(test.exercise, test.name, test.speed_kind))  # fmt: skip

    def load(module: str):
        try:
            return impls.load(exercise, module, isolated=isolated)
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
        pytest.skip(BENCHMARKS_OFF_REASON)
    return Speed(*_judge_arguments(request, benchmark))


@pytest.fixture
def host_speed(request: pytest.FixtureRequest, benchmark) -> HostSpeed:
    """Times host (CPU) work with the host clock and judges it against the exercise's thresholds.toml; runs anywhere."""
    return HostSpeed(*_judge_arguments(request, benchmark))


def _judge_arguments(request: pytest.FixtureRequest, benchmark) -> tuple:
    exercise = exercise_of(request.node) or request.path.parent.name
    thresholds = request.config.rootpath / "exercises" / exercise / "thresholds.toml"
    impls = request.config.stash[IMPLS]
    return request.node.nodeid, benchmark, impls.bars, thresholds, request.config.stash[SCORES]
