"""`python -m grader.student_repo DIR`: write the repo a course hands to students.

It holds what a student needs and nothing that gives answers away: the exercises (stubs, tests, READMEs,
thresholds), the fixtures, the serving engine that exercise 07 completes, the grader, the files that install and
register it, and GitHub Classroom's autograding workflow (autograder/classroom.yml, as
.github/workflows/classroom.yml). It leaves out the reference solutions, the grader's own tests (they need the
solutions), the instructor's measurement scripts (bench/), CI, and the history (a fresh folder, no .git), since
a clone of the full repo's history holds the solutions too. Instructors keep the solutions elsewhere and grade with
`--impl=solution --solutions PATH`, or copy a student's file over and grade it as usual.

    python -m grader.student_repo ../course-2027          # then: cd ../course-2027 && git init && git add -A
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("exercises", "fixtures", "engine", "grader", "conftest.py", "pyproject.toml", "README.md", ".gitignore")
WORKFLOW = ("autograder/classroom.yml", ".github/workflows/classroom.yml")  # (from, to)
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".benchmarks", "*.egg-info")


def write_student_repo(destination: Path, source: Path = ROOT) -> list[str]:
    """Copy the student's part of `source` into `destination` (which must not exist or be empty)."""
    destination = Path(destination)
    if destination.exists() and any(destination.iterdir()):
        raise FileExistsError(f"{destination} exists and is not empty: choose a new folder")
    destination.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, destination / name, ignore=IGNORED)
        elif path.is_file():
            shutil.copy2(path, destination / name)
    workflow = source / WORKFLOW[0]
    if workflow.is_file():
        (destination / WORKFLOW[1]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(workflow, destination / WORKFLOW[1])
    leaked = sorted(str(p.relative_to(destination)) for p in destination.rglob("*") if "solutions" in p.parts)
    if leaked:
        raise RuntimeError(f"the student repo would hold solutions: {leaked}")
    return sorted(COPIED) + ([WORKFLOW[1]] if workflow.is_file() else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grader.student_repo", description=__doc__.split("\n\n")[0])
    parser.add_argument("destination", type=Path, help="a new (or empty) folder")
    args = parser.parse_args(argv)
    try:
        copied = write_student_repo(args.destination)
    except (FileExistsError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.destination}: {', '.join(copied)} (no solutions, no grader self-tests, no history)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
