"""`python -m grader.points results.json`: the points of a graded run, and an exit code to gate on.

    python -m grader.points results.json                  print each exercise's points and the total; exit 0
    python -m grader.points results.json 01 --full        exit 1 unless exercise 01 earned all of its points
    python -m grader.points results.json --min 0.6        exit 1 unless the run earned 60% of its points

GitHub Classroom's command grader awards a step's points when its command exits 0: one step per exercise with
`--full` turns a results.json written once into a score per exercise (autograder/classroom.yml).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .scoring import table_lines, totals_of_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grader.points", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a results.json written by python -m grader --results")
    parser.add_argument("exercises", nargs="*", help="only these exercises (default: all)")
    parser.add_argument("--full", action="store_true", help="exit 1 unless every point was earned")
    parser.add_argument("--min", type=float, default=None, metavar="FRACTION", help="exit 1 below this fraction")
    args = parser.parse_args(argv)
    try:
        tests = json.loads(args.results.read_text())["tests"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: cannot read {args.results}: {exc}", file=sys.stderr)
        return 2
    totals = totals_of_results([t for t in tests if not args.exercises or t["tags"][0] in args.exercises])
    if args.exercises and not totals:
        print(f"error: no tests of exercise {', '.join(args.exercises)} in {args.results}", file=sys.stderr)
        return 2
    print("\n".join(table_lines(totals)))
    earned = sum(t.earned for t in totals.values())
    possible = sum(t.possible for t in totals.values())
    needed = possible if args.full else (args.min or 0.0) * possible
    return 0 if earned >= needed - 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
