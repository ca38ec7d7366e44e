"""The grading helpers, checked after every phase of every graded test: the code under test cannot swap them unseen.

Student code runs in the test process, so it could replace `torch.testing.assert_close` with a function that passes
everything, or `time.perf_counter` with one that makes it fast. The grader's own timing binds the clocks when the
grader is imported, before any student code (grader/timing.py), so a replaced clock does not fool it; and this
module records, once collection is done and before the first test runs, what each watched name refers to: the
comparison helpers of torch, numpy, math and pytest, the clocks of time and torch.cuda, the builtins tests lean on,
pytest's and pytest-benchmark's machinery, every global of the grader's modules and of the shared test fixtures, and
the hook implementations pytest calls. After each phase (setup, call, teardown) the grader compares: a name that now
refers to something else fails the test ("the grading helpers were modified"), and the original is put back so that
the next test is graded with the real helpers.

A replacement that undoes itself before the phase ends (a patched `assert_close` that restores the original on its
first call) is not seen: checking at every phase is as close as an in-process check gets. In an isolated exercise
(grader/isolation.py) the student's code runs in a sandbox process and replaces only the sandbox's helpers, which
grade nothing; the guard matters for the tests that still run it in the test process (speed tests, in-process
instrumentation, and exercises not isolated yet).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

MISSING = object()

# (importable owner, attribute names). Owners that are not imported when the snapshot is taken are left out: the
# code under test could not have used them before the grader saw them, and importing them here would slow every run.
WATCHED: dict[str, tuple[str, ...]] = {
    "builtins": ("all", "any", "abs", "isinstance", "issubclass", "len", "min", "max", "sum", "sorted", "round",
                 "getattr", "hasattr", "repr", "print", "id", "type"),
    "time": ("perf_counter", "perf_counter_ns", "monotonic", "monotonic_ns", "time", "time_ns", "process_time",
             "sleep"),
    "math": ("isclose", "isfinite", "isnan", "isinf", "fsum"),
    "statistics": ("median", "mean", "quantiles", "stdev"),
    "gc": ("disable", "enable", "isenabled", "collect"),
    "torch": ("allclose", "equal", "isclose", "eq", "ne", "isfinite", "isnan", "all", "any", "abs", "max", "min",
              "sum", "argmax", "cat", "stack", "where", "testing", "cuda", "manual_seed", "Generator", "no_grad"),
    "torch.testing": ("assert_close", "assert_allclose"),
    "torch.Tensor": ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__float__", "__int__",
                     "__sub__", "__abs__", "equal", "allclose", "isclose", "eq", "ne", "all", "any", "item", "tolist",
                     "max", "min", "sum", "abs", "float", "double", "isfinite", "isnan", "cpu", "to", "clone",
                     "data_ptr", "shape", "size", "dtype", "numel"),
    "torch.cuda": ("synchronize", "Event", "Stream", "current_stream", "default_stream", "stream", "_sleep",
                   "is_available", "get_device_name", "memory_allocated", "max_memory_allocated",
                   "reset_peak_memory_stats", "empty_cache"),
    "torch.cuda.Event": ("__new__", "__init__", "record", "synchronize", "query", "elapsed_time", "wait"),
    "numpy": ("allclose", "array_equal", "isclose", "all", "any"),
    "numpy.testing": ("assert_allclose", "assert_array_equal", "assert_equal"),
    "pytest": ("fail", "raises", "approx", "skip", "importorskip", "warns"),
    "_pytest.outcomes": ("fail", "skip", "exit"),
    "_pytest.runner": ("call_and_report", "runtestprotocol", "call_runtest_hook", "check_interactive_exception",
                       "show_test_item", "pytest_runtest_makereport"),
    "_pytest.runner.CallInfo": ("from_call", "__init__"),
    "_pytest.reports.TestReport": ("from_item_and_call", "__init__"),
    "_pytest.python.Function": ("runtest", "setup"),
    "pluggy._callers": ("_multicall",),
    "pluggy._hooks.HookCaller": ("__call__", "_hookexec", "get_hookimpls"),
    "pluggy._manager.PluginManager": ("_hookexec", "register", "unregister"),
    "pytest_benchmark.fixture.BenchmarkFixture": ("__call__", "pedantic", "_raw", "_raw_pedantic", "_make_stats",
                                                  "_calibrate_timer"),
    "pytest_benchmark.stats.Stats": ("update", "median", "sorted_data"),
}  # fmt: skip
HOOKS = (
    "pytest_runtest_protocol", "pytest_runtest_setup", "pytest_runtest_call", "pytest_runtest_teardown",
    "pytest_runtest_makereport", "pytest_runtest_logreport", "pytest_runtest_logstart", "pytest_runtest_logfinish",
    "pytest_pyfunc_call", "pytest_sessionfinish", "pytest_terminal_summary",
)  # fmt: skip
TRUSTED_PACKAGES = ("grader", "fixtures")  # every global of their modules is watched


@dataclass(frozen=True)
class Watch:
    label: str
    owner: object
    name: str
    original: object


class Guard:
    def __init__(self):
        self.watches: list[Watch] = []
        self.hooks: dict[str, list] = {}
        self._pluginmanager = None

    def snapshot(self, pluginmanager=None) -> None:
        """Record what every watched name refers to now (call it before any student code is imported)."""
        watches = []
        for owner_path, names in WATCHED.items():
            owner = _resolve(owner_path)
            if owner is None:
                continue
            for name in names:
                value = _current(owner, name)
                if value is not MISSING or isinstance(owner, type):  # a class may gain a shadowing attribute
                    watches.append(Watch(f"{owner_path}.{name}", owner, name, value))
        for module in _trusted_modules():
            watches += _module_watches(module)
        self.watches = watches
        self._pluginmanager = pluginmanager
        self.hooks = self._hook_impls()

    def modified(self, overrides: dict | None = None) -> list[str]:
        """Names that no longer refer to what the snapshot (or `overrides`, {(id(owner), name): value}) says.

        A library may wrap one of its own functions when one of its modules is first imported (torch._dynamo wraps
        torch.manual_seed): a replacement whose code lies in the owner's own package and that wraps the expected
        function is accepted, and becomes what is expected from then on.
        """
        overrides = overrides or {}
        changed = []
        for i, w in enumerate(self.watches):
            expected = overrides.get((id(w.owner), w.name), w.original)
            now = _current(w.owner, w.name)
            if now is expected:
                continue
            if _wraps_from_its_own_package(now, expected, w.owner):
                if expected is w.original:
                    self.watches[i] = Watch(w.label, w.owner, w.name, now)
                continue
            changed.append(w.label)
        hooks = self._hook_impls()
        changed += [f"the pytest hook {name}" for name in self.hooks if hooks.get(name) != self.hooks[name]]
        return changed

    def restore(self, overrides: dict | None = None) -> None:
        """Put every watched name back (hook implementations cannot be put back: the run is stopped instead)."""
        overrides = overrides or {}
        for w in self.watches:
            expected = overrides.get((id(w.owner), w.name), w.original)
            if _current(w.owner, w.name) is expected:
                continue
            try:
                if expected is MISSING:
                    delattr(w.owner, w.name)
                else:
                    setattr(w.owner, w.name, expected)
            except (AttributeError, TypeError):
                pass

    def hooks_modified(self) -> bool:
        return self._hook_impls() != self.hooks

    def _hook_impls(self) -> dict[str, list]:
        if self._pluginmanager is None:
            return {}
        impls = {}
        for name in HOOKS:
            caller = getattr(self._pluginmanager.hook, name, None)
            if caller is not None:
                impls[name] = [(id(impl), impl.function, impl.wrapper, impl.hookwrapper)
                               for impl in caller.get_hookimpls()]  # fmt: skip
        return impls


def modified_message(names: list[str]) -> str:
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    return (
        f"the grading helpers were modified while this test ran ({shown}): the grader put them back and does not "
        "accept this test's result. Code under test must not replace functions of torch, time, pytest or the grader."
    )


def _wraps_from_its_own_package(new, expected, owner) -> bool:
    if expected is MISSING or not callable(new) or inspect.unwrap(new, stop=lambda f: f is expected) is not expected:
        return False
    package = sys.modules.get((getattr(owner, "__module__", None) or getattr(owner, "__name__", "")).split(".")[0])
    code = getattr(new, "__code__", None)
    if package is None or code is None or not getattr(package, "__file__", None):
        return False
    return Path(package.__file__).parent in Path(code.co_filename).parents


def _resolve(path: str):
    """The module or class at a dotted path, if its module is already imported."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        module = sys.modules.get(".".join(parts[:cut]))
        if module is None:
            continue
        owner = module
        for attr in parts[cut:]:
            owner = getattr(owner, attr, None)
            if owner is None:
                return None
        return owner
    return None


def _current(owner, name: str):
    try:
        return vars(owner).get(name, MISSING)
    except TypeError:
        return getattr(owner, name, MISSING)


def _trusted_modules() -> list[ModuleType]:
    return [
        module
        for name, module in list(sys.modules.items())
        if isinstance(module, ModuleType) and name.split(".")[0] in TRUSTED_PACKAGES
    ]


def _module_watches(module: ModuleType) -> list[Watch]:
    """Every global of a trusted module, and every attribute of the classes it defines."""
    watches = []
    for name, value in list(vars(module).items()):
        if name.startswith("__") and name.endswith("__"):
            continue
        watches.append(Watch(f"{module.__name__}.{name}", module, name, value))
        if isinstance(value, type) and value.__module__ == module.__name__:
            for attr, member in list(vars(value).items()):
                if attr not in ("__dict__", "__weakref__", "__doc__", "__annotations__"):
                    watches.append(Watch(f"{module.__name__}.{name}.{attr}", value, attr, member))
    return watches
