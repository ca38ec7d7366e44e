"""`python -m grader.times [NN ...]`: record what each graded test of the reference solutions costs on this machine.

Each exercise's `recorded_times.json` (beside its tests) holds the CPU seconds of every graded test that passed on the
reference, and the CPU seconds of the calibration loop on the recording machine (grader/limits.py). The grader turns
them into per-test time limits: TIME_FACTOR times the reference's time, scaled to the grading machine, never below
FLOOR. So a function that loops forever costs each test that calls it seconds, not the default two minutes, and the
rest of the exercise is still graded.

Re-record after adding or changing tests (a test with no record keeps the default limit):

    python -m grader.times              # every exercise (a few minutes on a 2-core CPU)
    python -m grader.times 01 05        # some

It runs `pytest exercises/NN --impl=solution -p grader.times` and, as that session's plugin, writes the files.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

from . import limits

ROOT = Path(__file__).resolve().parent.parent


def pytest_sessionfinish(session: pytest.Session, exitstatus) -> None:
    from .plugin import SCORES

    scores = session.config.stash.get(SCORES, None)
    if scores is None:
        return
    by_folder: dict[Path, dict[str, float]] = {}
    for item in session.items:
        test = scores.tests.get(item.nodeid)
        if test is not None and test.outcome == "passed" and test.cpu_seconds > 0:
            by_folder.setdefault(Path(str(item.path)).parent, {})[item.nodeid] = round(test.cpu_seconds, 4)
    calibration = limits.calibrate()
    for folder, tests in sorted(by_folder.items()):
        record = {
            "about": "CPU seconds of each graded test on the reference, and of the calibration loop on the machine "
            "that recorded them (python -m grader.times; used by grader/limits.py)",
            "recorded": f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, Python {platform.python_version()}",
            "calibration": round(calibration, 6),
            "tests": dict(sorted(tests.items())),
        }
        (folder / limits.RECORDED_TIMES).write_text(json.dumps(record, indent=1) + "\n")
        print(f"recorded {len(tests)} tests in {folder / limits.RECORDED_TIMES}")


def main(argv: list[str] | None = None) -> int:
    exercises = (argv if argv is not None else sys.argv[1:]) or sorted(
        p.name for p in (ROOT / "exercises").iterdir() if p.is_dir() and any(p.glob("test_*.py"))
    )
    folders = [f"exercises/{e}" for e in exercises]
    command = [sys.executable, "-m", "pytest", *folders, "--impl=solution", "-q", "-p", "no:cacheprovider",
               "-p", "grader.times", "-o", "addopts=", "--test-timeout=0"]  # fmt: skip
    return subprocess.run(command, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
