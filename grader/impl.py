"""Which code the tests exercise: the student's stubs (`exercises/NN/`) or the reference solutions (`solutions/NN/`).

Tests never import an exercise module themselves: they ask the `impl` fixture for it by name, so the same test file
grades a student's work, the reference solution, or an instructor's private solutions tree. Modules are imported from
their file path under a unique name, once per session; an import that fails is remembered and reported to every test
that asks for it, as one clear failure each instead of a crash at collection.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

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

    def path(self, exercise: str, module: str) -> Path:
        return self.root / exercise / f"{module}.py"

    def load(self, exercise: str, module: str) -> ModuleType:
        key = (exercise, module)
        if key not in self._modules:
            self._modules[key] = self._import(exercise, module)
        loaded = self._modules[key]
        if isinstance(loaded, ImplementationError):
            raise loaded
        return loaded

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
        except (
            BaseException
        ) as exc:  # any error in the student's file (sys.exit, pytest.skip too): one failure per test
            del sys.modules[name]
            where = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            return ImplementationError(f"could not import {path}:\n{where}")
        return mod
