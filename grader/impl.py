"""Which code the tests exercise: the student's stubs (`exercises/NN/`) or the reference solutions (`solutions/NN/`).

Tests never import an exercise module themselves: they ask the `impl` fixture for it by name, so the same test file
grades a student's work, the reference solution, or an instructor's private solutions tree. Modules are imported from
their file path under a unique name, once per session; an import that fails is remembered and reported to every test
that asks for it, as one clear failure each instead of a crash at collection.

Under `python -m grader` the test process also reports when it starts and finishes importing a student module
(`listener`), so that an import that hangs or crashes the process is recognised as such; the modules named in
`known_broken` (by an earlier process of the same run) are not imported again, and fail each test at once with the
reason.

Under `python -m grader`, the tests of an isolated exercise (grader/isolation.py) ask for `load(..., isolated=True)`:
the module is imported in the test process's sandbox (grader/sandbox_process.py) and the test gets a proxy of it;
the student's file is never executed in the test process. An import that fails, hangs or kills the sandbox is
remembered the same way.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from .limits import TimeLimitExceeded

IMPL_CHOICES = ("student", "solution")
IMPL_ENV = "INFERLAB_IMPL"
SOLUTIONS_ENV = "INFERLAB_SOLUTIONS"


class ImplementationError(Exception):
    """The module a test asked for could not be found or imported."""


@dataclass
class Implementations:
    kind: str  # "student" or "solution"
    exercises_root: Path
    solutions_root: Path
    _modules: dict[tuple[str, str], ModuleType | ImplementationError] = field(default_factory=dict)
    known_broken: dict[str, str] = field(default_factory=dict)  # "01/kv_cache" -> why it cannot be imported
    listener: Callable[[str, str], None] | None = None  # called ("importing" | "imported", "01/kv_cache")
    sandbox: object = None  # grader.sandbox_process.Sandbox, under `python -m grader`

    @classmethod
    def from_options(cls, rootdir: Path, impl: str | None, solutions: str | None) -> Implementations:
        kind = impl or os.environ.get(IMPL_ENV) or "student"
        if kind not in IMPL_CHOICES:
            raise ValueError(f"--impl (or ${IMPL_ENV}) must be one of {IMPL_CHOICES}, got {kind!r}")
        solutions_dir = solutions or os.environ.get(SOLUTIONS_ENV) or str(rootdir / "solutions")
        return cls(kind, rootdir / "exercises", Path(solutions_dir).expanduser().resolve())

    @property
    def root(self) -> Path:
        return self.exercises_root if self.kind == "student" else self.solutions_root

    @property
    def bars(self) -> str:
        """Which speed bars apply (thresholds.toml): "solution" only for the course's own references (solutions/
        beside exercises/); a student's module graded through --impl=solution --solutions DIR meets the student's."""
        own = self.exercises_root.parent / "solutions"
        return "solution" if self.kind == "solution" and self.solutions_root == own.resolve() else "student"

    def path(self, exercise: str, module: str) -> Path:
        return self.root / exercise / f"{module}.py"

    def load(self, exercise: str, module: str, isolated: bool = False) -> ModuleType:
        if isolated:
            return self._load_isolated(exercise, module)
        key = (exercise, module)
        if key not in self._modules:
            label = f"{exercise}/{module}"
            if label in self.known_broken:
                self._modules[key] = ImplementationError(f"could not import {self.path(exercise, module)}:\n"
                                                         f"{self.known_broken[label]}")  # fmt: skip
            else:
                if self.listener is not None:
                    self.listener("importing", label)
                self._modules[key] = self._import(exercise, module)
                if self.listener is not None:
                    self.listener("imported", label)
        loaded = self._modules[key]
        if isinstance(loaded, ImplementationError):
            raise loaded
        return loaded

    def _load_isolated(self, exercise: str, module: str):
        from .remote import SandboxDied

        key, label, path = ("sandbox", exercise, module), f"{exercise}/{module}", self.path(exercise, module)
        if label in self.known_broken:
            raise ImplementationError(f"could not import {path}:\n{self.known_broken[label]}")
        if isinstance(self._modules.get(key), ImplementationError):
            raise self._modules[key]
        if not path.is_file():
            hint = " (pass --solutions PATH to point at your solutions tree)" if self.kind == "solution" else ""
            raise ImplementationError(f"{self.kind} module not found: {path}{hint}")
        if self.listener is not None:
            self.listener("importing", label)
        try:
            proxy = self.sandbox.load(path, f"inferlab_{self.kind}_{exercise}_{module}")
        except TimeLimitExceeded as exc:
            self._modules[key] = ImplementationError(
                f"could not import {path}: importing it did not finish within {exc.seconds:g} s (a loop at import?)"
            )
            raise
        except SandboxDied as exc:
            self._modules[key] = ImplementationError(f"could not import {path}: importing it killed the process "
                                                     f"that runs it ({exc})")  # fmt: skip
            raise self._modules[key] from None
        except Exception as exc:  # any error in the student's file, raised in the sandbox and sent back
            self._modules[key] = ImplementationError(f"could not import {path}:\n{type(exc).__name__}: {exc}")
            raise self._modules[key] from None
        if self.listener is not None:
            self.listener("imported", label)
        return proxy

    def _import(self, exercise: str, module: str) -> ModuleType | ImplementationError:
        path = self.path(exercise, module)
        if not path.is_file():
            hint = " (pass --solutions PATH to point at your solutions tree)" if self.kind == "solution" else ""
            return ImplementationError(f"{self.kind} module not found: {path}{hint}")
        name = f"inferlab_{self.kind}_{exercise}_{module}"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses and Triton's source inspection look the module up by name
        try:
            spec.loader.exec_module(mod)
        except KeyboardInterrupt:
            raise
        except TimeLimitExceeded as exc:  # the import itself hangs: this test times out, the next ones fail at once
            del sys.modules[name]
            self._modules[(exercise, module)] = ImplementationError(
                f"could not import {path}: importing it did not finish within {exc.seconds:g} s (a loop at import?)"
            )
            raise
        except BaseException as exc:  # any error in the student's file (sys.exit, pytest.skip too): one per test
            del sys.modules[name]
            where = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            return ImplementationError(f"could not import {path}:\n{where}")
        return mod
