"""The course's parts the engine is built from, loaded from the reference solutions or from the student's exercises.

    parts = load_parts("solution")      # solutions/NN/... (or $INFERLAB_SOLUTIONS/NN/...)
    parts = load_parts("student")       # exercises/NN/...: the student's own code serves the traffic
    parts.block_manager.BlockManager, parts.scheduler.Scheduler, parts.scheduler.Request, ...

Modules are imported from their file path under the same names the grader gives them, once per process, so that
the engine and the tests share one copy. The GPU-only parts (exercise 06's paged-attention kernel, exercise 03's
GEMV) are imported on first use: they import Triton, which a CPU engine never needs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
IMPLS = ("solution", "student")
SOLUTIONS_ENV = "INFERLAB_SOLUTIONS"


def parts_root(impl: str) -> Path:
    """The folder holding the exercises' modules for `impl`."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "student":
        return ROOT / "exercises"
    return Path(os.environ.get(SOLUTIONS_ENV) or ROOT / "solutions").expanduser().resolve()


def solutions_available() -> bool:
    """Whether the reference parts exist here (a student repo has no solutions/)."""
    root = parts_root("solution")
    return (root / "02" / "block_manager.py").is_file() and (root / "05" / "scheduler.py").is_file()


def load_module(impl: str, exercise: str, module: str) -> ModuleType:
    """exercises/NN/<module>.py or solutions/NN/<module>.py, imported once per process."""
    root = parts_root(impl)
    path = root / exercise / f"{module}.py"
    if impl == "solution" and not path.is_file():  # solutions/ may sit elsewhere, or only hold some exercises
        path = ROOT / "solutions" / exercise / f"{module}.py"
    name = f"inferlab_{impl}_{exercise}_{module}"
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve() == path.resolve():
        return loaded
    if not path.is_file():
        raise ImportError(f"the engine needs {path} ({impl} parts), which does not exist")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses and Triton look the module up by name
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


class Parts:
    """Exercise 02's block manager and 05's scheduler at once; 06's kernel and 03's GEMV when first asked for."""

    def __init__(self, impl: str = "solution"):
        self.impl = impl
        self.block_manager = load_module(impl, "02", "block_manager")
        self.scheduler = load_module(impl, "05", "scheduler")

    @property
    def paged_attention(self) -> ModuleType:
        return load_module(self.impl, "06", "paged_attention")

    @property
    def awq(self) -> ModuleType:
        return load_module(self.impl, "03", "awq")


def load_parts(impl: str = "solution") -> Parts:
    return Parts(impl)
