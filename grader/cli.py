"""`python -m grader`: grade the current implementation and print the score table.

    python -m grader                      grade every exercise (the student's code)
    python -m grader 01 03                grade some exercises
    python -m grader --impl solution      grade the reference solutions
    python -m grader --results out.json   also write Gradescope's results.json

Anything after `--` goes to pytest unchanged. Exits 0 when grading ran, whatever the score: a failing student test
is a grade, not an error (`--strict` exits 1 on any failure instead).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GRADED = (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grader", description=__doc__.split("\n\n")[0])
    parser.add_argument("exercises", nargs="*", help="exercise numbers, e.g. 01 03 (default: all)")
    parser.add_argument("--impl", choices=("student", "solution"), default="student")
    parser.add_argument("--solutions", metavar="PATH", help="private solutions tree for --impl solution")
    parser.add_argument("--results", metavar="PATH", help="write Gradescope's results.json here")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any graded test fails")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    pytest_args = argv[split + 1 :]

    exercises = args.exercises or _all_exercises()
    missing = [e for e in exercises if not (ROOT / "exercises" / e).is_dir()]
    if missing:
        parser.error(f"no such exercise: {', '.join(missing)} (have: {', '.join(_all_exercises())})")
    command = [str(ROOT / "exercises" / e) for e in exercises]
    command += ["--rootdir", str(ROOT), "-q", "--tb=no", "-rN", "-p", "no:cacheprovider", f"--impl={args.impl}"]
    command += ["-W", "ignore::pytest.PytestAssertRewriteWarning"]  # grader itself was imported before pytest
    if args.solutions:
        command.append(f"--solutions={args.solutions}")
    if args.results:
        command.append(f"--results={args.results}")
    command += pytest_args
    code = pytest.main(command)
    if code not in GRADED:
        return int(code)
    return int(code) if args.strict else 0


def _all_exercises() -> list[str]:
    return sorted(p.name for p in (ROOT / "exercises").iterdir() if p.name.isdigit())
