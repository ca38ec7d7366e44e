"""The course itself: every exercise has the course's shape, stubs and solutions agree on their API, and every graded
test fails on the stubs; the scaffold of a new exercise has the same shape.

(That every test passes on the solutions is the main test run: `pytest --impl=solution`. CONTRIBUTING.md lists what
these checks enforce.)
"""

import importlib.util
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grader.new_exercise import scaffold

ROOT = Path(__file__).resolve().parent.parent
EXERCISES = sorted(p.parent for p in ROOT.glob("exercises/[0-9][0-9]/test_*.py"))
STUBS = [
    p for d in EXERCISES for p in sorted(d.glob("*.py")) if not p.name.startswith("test_") and p.name != "conftest.py"
]


def stubs_of(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.glob("*.py")) if not p.name.startswith("test_") and p.name != "conftest.py"]


def shape_problems(root: Path, exercise: str) -> list[str]:
    """What the exercise lacks of the course's shape (CONTRIBUTING.md): its files, solution twins, mutants."""
    folder = root / "exercises" / exercise
    problems = [f"exercises/{exercise}/{name} is missing" for name in ("README.md", "thresholds.toml")
                if not (folder / name).is_file()]  # fmt: skip
    if not list(folder.glob("test_*.py")):
        problems.append(f"exercises/{exercise} has no test_*.py")
    stubs = stubs_of(folder)
    if not stubs:
        problems.append(f"exercises/{exercise} has no stub module")
    for stub in stubs:
        solution = root / "solutions" / exercise / stub.name
        if not solution.is_file():
            problems.append(f"{stub.name} has no solution twin at solutions/{exercise}/{stub.name}")
        elif public_api(load(stub)) != public_api(load(solution)):
            problems.append(f"{stub.name}: the stub's and the solution's public APIs differ")
    if not (root / "tests" / "mutants" / f"ex{exercise}.py").is_file():
        problems.append(f"tests/mutants/ex{exercise}.py is missing (the wrong implementations the tests must catch)")
    return problems


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"api_{path.parent.parent.name}_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def public_api(module) -> dict[str, str]:
    """Public names defined in the module, with their signatures (and those of public class members)."""
    api = {}
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            for member, value in vars(obj).items():
                if member.startswith("_") and member != "__init__":
                    continue
                if callable(value):
                    api[f"{name}.{member}"] = str(inspect.signature(value))
                elif isinstance(value, property):
                    api[f"{name}.{member}"] = "property"
            api[name] = "class"
        elif callable(obj):
            api[name] = str(inspect.signature(obj))
    return api


@pytest.mark.parametrize("exercise", sorted({d.name for d in EXERCISES}))
def test_every_exercise_has_the_course_shape(exercise):
    assert not shape_problems(ROOT, exercise)


def test_the_scaffold_of_a_new_exercise_has_the_course_shape_and_grades(tmp_path):
    """`python -m grader.new_exercise` writes an exercise that runs at once: its stub fails every graded test, and a
    filled-in two-function toy passes the shape checks and grades in full on its solution."""
    for name in ("conftest.py", "pyproject.toml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    written = scaffold(tmp_path, "42", "toy", "a toy exercise")
    assert len(written) == 6 and not shape_problems(tmp_path, "42")
    two = "\n\ndef offset(values: list[float], by: float) -> list[float]:\n    \"\"\"Each value plus `by`.\"\"\"\n"
    stub, solution = tmp_path / "exercises/42/toy.py", tmp_path / "solutions/42/toy.py"
    stub.write_text(stub.read_text() + two + '    raise NotImplementedError("offset: one addition per value")\n')
    solution.write_text(solution.read_text() + two + "    return [v + by for v in values]\n")
    tests = tmp_path / "exercises/42/test_toy.py"
    tests.write_text(tests.read_text() + "\n\ndef test_offset_adds(mod):\n    assert mod.offset([1.0], 2.0) == [3.0]\n")
    assert not shape_problems(tmp_path, "42")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    scores = {}
    for impl in ("student", "solution"):
        results = tmp_path / f"results-{impl}.json"
        command = [sys.executable, "-m", "pytest", "exercises/42", "-q", "-p", "no:cacheprovider", f"--impl={impl}",
                   f"--results={results}"]  # fmt: skip
        subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        data = json.loads(results.read_text())
        scores[impl] = (data["score"], sum(t["max_score"] for t in data["tests"]))
    assert scores == {"student": (0, 5), "solution": (5, 5)}, scores


@pytest.mark.parametrize("stub", STUBS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_stub_and_solution_have_the_same_public_api(stub):
    solution = ROOT / "solutions" / stub.parent.name / stub.name
    assert solution.is_file(), f"{stub} has no solution twin at {solution}"
    assert public_api(load(stub)) == public_api(load(solution))


def test_every_graded_test_fails_on_the_stubs(tmp_path):
    results = tmp_path / "results.json"
    subprocess.run(
        [sys.executable, "-m", "pytest", "exercises", "-q", "-p", "no:cacheprovider", "--impl=student",
         f"--results={results}", "-o", "addopts="],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    tests = json.loads(results.read_text())["tests"]
    assert len(tests) >= 10 * len(EXERCISES), f"too few graded tests collected: {len(tests)}"
    passed = [t["name"] for t in tests if t["max_score"] > 0 and t["score"] > 0]
    assert not passed, f"these graded tests pass on the stubs, so they cannot tell a student anything: {passed}"
    silent = [t["name"] for t in tests if t["max_score"] > 0 and not t["output"]]
    assert not silent, f"these tests fail on the stubs without saying why: {silent}"
