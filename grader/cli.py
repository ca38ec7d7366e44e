"""`python -m grader`: grade the current implementation and print the score table.

    python -m grader                      grade every exercise (the student's code)
    python -m grader 01 03                grade some exercises
    python -m grader --impl solution      grade the reference solutions
    python -m grader --results out.json   also write Gradescope's results.json
    python -m grader --timeout 300        give each exercise at most 300 s

Each exercise runs in its own pytest process, so a kernel that crashes the interpreter or an exercise that runs out
of time costs that exercise's points, not the whole grade: its tests are listed as not run, with the reason.
Anything after `--` goes to pytest unchanged. Exits 0 when grading ran, whatever the score: a failing student test
is a grade, not an error (`--strict` exits 1 on any failure instead).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .scoring import not_graded_lines, table_lines, totals_of_results

ROOT = Path(__file__).resolve().parent.parent
SUMMARY_ENV = "INFERLAB_SUMMARY"  # "off": the per-exercise processes leave the table to this command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grader", description=__doc__.split("\n\n")[0])
    parser.add_argument("exercises", nargs="*", help="exercise numbers, e.g. 01 03 (default: all)")
    parser.add_argument("--impl", choices=("student", "solution"), help="default: student (or $INFERLAB_IMPL)")
    parser.add_argument("--solutions", metavar="PATH", help="private solutions tree for --impl solution")
    parser.add_argument("--results", metavar="PATH", help="write Gradescope's results.json here")
    parser.add_argument("--timeout", type=float, metavar="SECONDS", help="time limit for each exercise")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any graded test fails")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    pytest_args = argv[split + 1 :]

    available = sorted(p.name for p in (ROOT / "exercises").iterdir() if p.name.isdigit())
    exercises = args.exercises or available
    missing = [e for e in exercises if e not in available]
    if missing:
        parser.error(f"no such exercise: {', '.join(missing)} (have: {', '.join(available)})")
    options = ["--rootdir", str(ROOT), "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestAssertRewriteWarning"]
    options += [f"--impl={args.impl}"] if args.impl else []
    options += [f"--solutions={args.solutions}"] if args.solutions else []

    started = time.time()
    tests, leaderboard = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for exercise in exercises:
            graded = grade_exercise(exercise, options, pytest_args, Path(scratch), args.timeout)
            tests += graded.get("tests", [])
            leaderboard += graded.get("leaderboard", [])
    for number, test in enumerate(tests, start=1):
        test["number"] = str(number)
    table = table_lines(totals_of_results(tests))
    table += not_graded_lines([t["output"] for t in tests if t["max_score"] == 0 and t["output"].startswith("skipped")])
    print("\n".join(["", "=" * 20 + " inferlab score " + "=" * 20, *table]))
    if args.results:
        results = {
            "score": sum(t["score"] for t in tests),
            "execution_time": round(time.time() - started, 1),
            "output": "\n".join(table),
            "visibility": "visible",
            "stdout_visibility": "visible",
            "tests": tests,
        }
        if leaderboard:
            results["leaderboard"] = leaderboard
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.results}")
    failed = any(t["score"] < t["max_score"] for t in tests)
    return 1 if args.strict and failed else 0


def grade_exercise(exercise: str, options: list[str], pytest_args: list[str], scratch: Path, timeout) -> dict:
    """Run one exercise's tests in a fresh process; if it dies, its collected tests come back as not run."""
    path = str(ROOT / "exercises" / exercise)
    collected, ran = scratch / f"{exercise}-collected.json", scratch / f"{exercise}.json"
    env = dict(os.environ, **{SUMMARY_ENV: "off"})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    pytest = [sys.executable, "-m", "pytest", path, *options]
    subprocess.run(
        [*pytest, "--collect-only", "-q", f"--results={collected}", *pytest_args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    print(f"exercise {exercise}:", flush=True)
    try:
        code = subprocess.run([*pytest, "-q", "--tb=no", "-rN", f"--results={ran}", *pytest_args], env=env, cwd=ROOT,
                              timeout=timeout).returncode  # fmt: skip
        why = f"the test process crashed (exit code {code})"
    except subprocess.TimeoutExpired:
        code, why = None, f"exercise {exercise} ran out of its {timeout:g} s"
    if code in (0, 1) and ran.is_file():
        return json.loads(ran.read_text())
    if not collected.is_file():
        return {"tests": [{"name": f"{exercise} (could not collect)", "score": 0.0, "max_score": 1.0, "output": why,
                           "tags": [exercise], "visibility": "visible"}]}  # fmt: skip
    tests = json.loads(collected.read_text())["tests"]
    for test in tests:
        test["output"] = f"not run: {why}"
    return {"tests": tests}
