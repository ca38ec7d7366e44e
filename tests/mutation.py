"""Mutation testing of the graders: wrong implementations that the tests must catch, and name.

A mutant is the reference solution with one realistic mistake, written from the mistakes students make (not from the
tests): a text replacement in one solution file. `run_mutant` copies the exercise's solutions into a temporary
tree, applies the replacement, grades it with `pytest exercises/NN --impl=solution --solutions=<tree>` in a fresh
process (forked by tests/forkserver.py, which has the libraries imported already) and reads the results file. A
mutant is *caught* when some graded test fails, and *diagnosed* when a failing test's name or message contains the
mutant's diagnosis (a phrase that names the mistake).

    python3 tests/mutation.py 02        # grade every mutant of exercise 02, print caught k/n, diagnosed d/n
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from forkserver import ForkServer

ROOT = Path(__file__).resolve().parent.parent
MUTANTS_DIR = Path(__file__).resolve().parent / "mutants"


@dataclass(frozen=True)
class Mutant:
    name: str  # the mistake, in a student's words
    file: str  # which solution file, e.g. "block_manager.py"
    old: str  # text of the reference that the mistake replaces (must occur exactly once)
    new: str
    diagnosis: str  # a phrase (case-insensitive) that a failing test's name or message must contain
    pytest_args: tuple[str, ...] | None = None  # e.g. ("-k", "cost") to run only the tests it needs; default below
    needs_cuda: bool = False  # a mistake only a GPU path makes (e.g. inside a CUDA graph): graded where CUDA is


@dataclass
class Verdict:
    mutant: Mutant
    caught: bool
    diagnosed: bool
    failures: list[str]  # "name: first line of the message" of each failed graded test
    error: str = ""


def mutants_of(exercise: str) -> list[Mutant]:
    """The exercise's mutants; a mutant without pytest_args gets the file's PYTEST_ARGS (e.g. skip slow tests)."""
    path = MUTANTS_DIR / f"ex{exercise}.py"
    spec = importlib.util.spec_from_file_location(f"inferlab_mutants_{exercise}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    default = tuple(getattr(module, "PYTEST_ARGS", ()))
    return [m if m.pytest_args is not None else replace(m, pytest_args=default) for m in module.MUTANTS]


def exercises_with_mutants() -> list[str]:
    return sorted(p.stem.removeprefix("ex") for p in MUTANTS_DIR.glob("ex[0-9][0-9].py"))


def mutated_source(exercise: str, mutant: Mutant) -> str:
    source = (ROOT / "solutions" / exercise / mutant.file).read_text()
    count = source.count(mutant.old)
    if count != 1:
        raise ValueError(f"mutant {mutant.name!r}: its text occurs {count} times in solutions/{exercise}/{mutant.file}")
    return source.replace(mutant.old, mutant.new)


def unused_plugins(exercise: str) -> list[str]:
    """Plugins an exercise's tests never use: loading them costs about a second per mutant process."""
    tests = "".join(p.read_text() for p in (ROOT / "exercises" / exercise).glob("test_*.py"))
    plugins = ["anyio"] + (["hypothesispytest"] if "hypothesis" not in tests else [])
    return [arg for plugin in plugins for arg in ("-p", f"no:{plugin}")]


def run_mutant(exercise: str, mutant: Mutant, timeout: float = 300, server: ForkServer | None = None) -> Verdict:
    """Grade one mutant in a fresh process: a child of `server` (libraries imported already) or a new interpreter."""
    with tempfile.TemporaryDirectory(prefix=f"mutant{exercise}-") as tmp:
        tree = Path(tmp) / "solutions"
        shutil.copytree(ROOT / "solutions" / exercise, tree / exercise)
        (tree / exercise / mutant.file).write_text(mutated_source(exercise, mutant))
        results = Path(tmp) / "results.json"
        args = [f"exercises/{exercise}", "-q", "-p", "no:cacheprovider", "--impl=solution", f"--solutions={tree}",
                f"--results={results}", "-o", "addopts=", "-p", "mutation_stop", *unused_plugins(exercise),
                *mutant.pytest_args]  # fmt: skip
        # The run stops at the first failure that names the mistake (tests/mutation_stop.py): that is all we need.
        env = dict(os.environ, INFERLAB_SUMMARY="off", INFERLAB_MUTANT_DIAGNOSIS=mutant.diagnosis)
        tests_dir = str(Path(__file__).resolve().parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests_dir, env.get("PYTHONPATH")]))
        log = Path(tmp) / "pytest.log"
        if server is not None:
            rc = server.run(args, cwd=str(ROOT), env=env, log=str(log), timeout=timeout)
            output = log.read_text(errors="replace") if log.is_file() else ""
        else:
            try:
                run = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=ROOT, env=env, capture_output=True,
                                     text=True, timeout=timeout)  # fmt: skip
                rc, output = run.returncode, run.stdout
            except subprocess.TimeoutExpired:
                rc = None
        if rc is None:
            return Verdict(mutant, True, False, [], f"timed out after {timeout:.0f} s")
        if not results.is_file():
            return Verdict(mutant, False, False, [], f"no results file; pytest said:\n{output[-2000:]}")
        tests = json.loads(results.read_text())["tests"]
    ran = [t for t in tests if not t["output"].startswith("not run")]  # the run stops once the mistake is named
    failed = [t for t in ran if t["max_score"] > 0 and t["score"] < t["max_score"]]
    phrase = mutant.diagnosis.lower()
    diagnosed = any(phrase in (t["name"] + "\n" + t["output"]).lower() for t in failed)
    summaries = [f"{t['name']}: {(t['output'].strip().splitlines() or [''])[-1][:160]}" for t in failed]
    return Verdict(mutant, bool(failed), diagnosed, summaries)


def gradable_mutants(exercise: str) -> list[Mutant]:
    """The exercise's mutants that this machine can grade: those of GPU-only paths need CUDA."""
    import torch

    return [m for m in mutants_of(exercise) if not m.needs_cuda or torch.cuda.is_available()]


def run_all(exercise: str, workers: int = 2) -> list[Verdict]:
    """Every gradable mutant, `workers` at a time, each worker forking its runs from its own fork server (where the
    system forks): the libraries are imported once per worker instead of once per mutant."""
    import torch

    local, servers = threading.local(), []
    # The servers import triton: in the environment the grader gives its runs (the interpreter without CUDA).
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("TRITON_INTERPRET", "1")

    def grade(mutant: Mutant) -> Verdict:
        if not hasattr(local, "server"):
            local.server = ForkServer(env) if hasattr(os, "fork") else None
            servers.append(local.server)
        return run_mutant(exercise, mutant, server=local.server)

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(grade, gradable_mutants(exercise)))
    finally:
        for server in filter(None, servers):
            server.close()


def report(exercise: str, verdicts: list[Verdict]) -> str:
    n = len(verdicts)
    caught = sum(v.caught for v in verdicts)
    diagnosed = sum(v.diagnosed for v in verdicts)
    lines = [f"exercise {exercise}: caught {caught}/{n}, diagnosed {diagnosed}/{n}"]
    left = len(mutants_of(exercise)) - n
    if left:
        lines[0] += f" ({left} more need a CUDA GPU)"
    for v in verdicts:
        mark = "diagnosed" if v.diagnosed else ("caught" if v.caught else "MISSED")
        lines.append(f"  {mark:<10} {v.mutant.name}" + (f"  ({v.error.splitlines()[0]})" if v.error else ""))
        if v.caught and not v.diagnosed:
            lines += [f"             {f}" for f in v.failures[:3]]
    return "\n".join(lines)


if __name__ == "__main__":
    for exercise in sys.argv[1:] or exercises_with_mutants():
        print(report(exercise, run_all(exercise)))
