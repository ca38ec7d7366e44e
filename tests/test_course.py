"""The course itself: stubs and solutions agree on their API, and every graded test fails on the stubs.

(That every test passes on the solutions is the main test run: `pytest --impl=solution`.)
"""

import importlib.util
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXERCISES = sorted(p.parent for p in ROOT.glob("exercises/[0-9][0-9]/test_*.py"))
STUBS = [
    p for d in EXERCISES for p in sorted(d.glob("*.py")) if not p.name.startswith("test_") and p.name != "conftest.py"
]


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
