"""`python -m grader.new_exercise NN TOPIC "concept"`: the skeleton of a new exercise, in the course's shape.

It writes, and refuses to overwrite:

    exercises/NN/README.md            the concept, what the student builds, how it is graded
    exercises/NN/TOPIC.py             the stub: a docstring that teaches, one function with its shapes and a hint
    exercises/NN/test_TOPIC.py        the specification: graded tests that reach the code through `impl`
    exercises/NN/thresholds.toml      speed bars (ratios, never seconds), empty until the exercise has a speed test
    solutions/NN/TOPIC.py             the reference, with the stub's public API (fill it in)
    tests/mutants/exNN.py             the wrong implementations the tests must catch and name (add 15 or more)

`pytest exercises/NN` runs at once and fails (the stub is not written yet); `pytest exercises/NN --impl=solution`
fails until the reference is. CONTRIBUTING.md walks through the rest: the checklist that CI enforces.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STUB = '''"""Exercise {nn}: {concept}.

TODO (instructor): explain the idea in a few lines: what the student builds, why it matters for inference, and the
one fact the tests hinge on. Every function says its shapes, dtypes and invariants; every TODO has a hint.
"""

from __future__ import annotations


def scale(values: list[float], factor: float) -> list[float]:
    """Each value times `factor`, in order (an example to replace: keep stub and solution signatures the same).

    values: any length, including 0. factor: a finite float. Raises ValueError for a non-finite factor.
    """
    raise NotImplementedError("scale: one multiplication per value; check the factor first")
'''

SOLUTION = '''"""Exercise {nn} reference: {concept}. Same public API as exercises/{nn}/{topic}.py."""

from __future__ import annotations

import math


def scale(values: list[float], factor: float) -> list[float]:
    """Each value times `factor`, in order."""
    if not math.isfinite(factor):
        raise ValueError(f"factor must be finite, got {{factor}}")
    return [v * factor for v in values]
'''

TESTS = '''"""Exercise {nn} specification: {concept}.

Each test catches one named, common mistake; a failure says what was expected and what came back.
"""

import pytest


@pytest.fixture
def mod(impl):
    return impl("{topic}")


@pytest.mark.points(2)
def test_scale_multiplies_every_value_in_order(mod):
    got = mod.scale([1.0, -2.0, 0.5], 3.0)
    assert got == [3.0, -6.0, 1.5], f"scale([1, -2, 0.5], 3): expected [3, -6, 1.5], got {{got}}"


def test_scale_of_nothing_is_empty(mod):
    assert mod.scale([], 2.0) == []


def test_a_non_finite_factor_is_refused(mod):
    with pytest.raises(ValueError, match="finite"):
        mod.scale([1.0], float("nan"))
'''

README = """# Exercise {nn}: {concept}

TODO (instructor): the concept in a few paragraphs, a picture where one helps, and what the student builds.

## What you build

`exercises/{nn}/{topic}.py`: TODO.

## How it is graded

`pytest exercises/{nn}` runs the specification (test_{topic}.py) on any machine. TODO: what a CPU grades, what a GPU
grades, and the thresholds (thresholds.toml).
"""

THRESHOLDS = """# Exercise {nn} speed thresholds: ratios measured in the same run, never seconds (grader/thresholds.py).
# `student` is what a student's code must reach; `solution` is what the reference is held to (--impl=solution);
# `[name.gpu."H100"]` overrides either for one GPU. Add one table per judged ratio, e.g.:
#
# [over_baseline]
# what = "baseline time / your time, same inputs, same run"
# compare = "at_least"
# student = 1.5
# solution = 3.0
"""

MUTANTS = '''# ruff: noqa: E501  (mutants are data: one replacement per line reads best)
"""Exercise {nn} mutants: the reference with one mistake each, as students make them (tests/mutation.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mutation import Mutant  # noqa: E402

T = "{topic}.py"

MUTANTS = [
    # Mutant(name in a student's words, file, text of the reference it replaces (exactly once), the wrong text,
    #        a phrase a failing test's name or message must contain to name the mistake)
    Mutant("the factor is not checked", T, "    if not math.isfinite(factor):", "    if False:", "finite"),
]
'''


def scaffold(root: Path, number: str, topic: str, concept: str) -> list[Path]:
    """Write the new exercise's files under `root`; return them. Nothing is overwritten."""
    if not re.fullmatch(r"\d\d", number):
        raise ValueError(f"the exercise number must be two digits, like 09, got {number!r}")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", topic):
        raise ValueError(f"the topic must be a module name (lower case, digits, underscores), got {topic!r}")
    fields = dict(nn=number, topic=topic, concept=concept.strip().rstrip(".") or "TODO")
    files = {
        root / "exercises" / number / "README.md": README,
        root / "exercises" / number / f"{topic}.py": STUB,
        root / "exercises" / number / f"test_{topic}.py": TESTS,
        root / "exercises" / number / "thresholds.toml": THRESHOLDS,
        root / "solutions" / number / f"{topic}.py": SOLUTION,
        root / "tests" / "mutants" / f"ex{number}.py": MUTANTS,
    }
    existing = [str(p.relative_to(root)) for p in files if p.exists()]
    if existing:
        raise FileExistsError(f"these exist already, nothing was written: {', '.join(existing)}")
    for path, template in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**fields))
    return list(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grader.new_exercise", description=__doc__.split("\n\n")[0])
    parser.add_argument("number", help="two digits, e.g. 09")
    parser.add_argument("topic", help="the module's name, e.g. mixed_bits")
    parser.add_argument("concept", nargs="?", default="", help="one line: what the exercise teaches")
    parser.add_argument("--root", type=Path, default=ROOT, help="the course's root (default: this repo)")
    args = parser.parse_args(argv)
    try:
        written = scaffold(args.root, args.number, args.topic, args.concept)
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path.relative_to(args.root)}")
    print(f"next: pytest exercises/{args.number} (fails: the stub), then CONTRIBUTING.md's checklist")
    return 0


if __name__ == "__main__":
    sys.exit(main())
