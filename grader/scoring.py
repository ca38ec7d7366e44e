"""Points and verdicts: what each graded test earned, the end-of-run tables, and Gradescope's results.json.

A graded test is any test that belongs to an exercise (it lives under `exercises/NN/` or carries
`@pytest.mark.exercise("NN")`). It is worth `@pytest.mark.points(n)` points (1 by default), earned only if every
phase passed. A test the grader skips (a GPU test without a GPU) is neither earned nor possible, so a CPU run grades
out of the correctness points alone. A test that never ran (the session was stopped, or crashed) earns nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .thresholds import Threshold

MESSAGE_LIMIT = 4000


@dataclass
class SpeedResult:
    threshold: Threshold
    measured: float
    passed: bool
    roofline: float | None = None  # fraction of the measured copy bandwidth (or compute peak), if it applies
    detail: str = ""
    bytes_per_s: float | None = None  # for a roofline fraction: what the kernel achieved ...
    copy_bandwidth: float | None = None  # ... against the limit measured on this GPU
    hardware: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SpeedResult:
        return cls(**{**data, "threshold": Threshold(**data["threshold"])})


@dataclass
class TestResult:
    nodeid: str
    exercise: str
    name: str
    points: float
    visibility: str = "visible"  # Gradescope's: visible, hidden, after_due_date, after_published
    outcome: str = "not run"  # not run, passed, failed or skipped (by the grader, e.g. no GPU)
    message: str = "not run: the session ended before this test finished"
    speed: list[SpeedResult] = field(default_factory=list)
    limit: float = 0.0  # seconds this test may take (0: no limit)
    speed_kind: str = ""  # "gpu" (the speed fixture or marker), "host" (host_speed) or "" (correctness)
    path: str = ""  # the test file, relative to the root
    duration: float = 0.0  # seconds, setup to teardown
    cpu_seconds: float = 0.0  # CPU time of the test process, setup to teardown (what time limits count)
    skip_reason: str = ""  # why the grader skips it before it runs (no GPU), known at collection

    def to_record(self) -> dict:
        return {**asdict(self), "speed": [s.to_dict() for s in self.speed]}

    @classmethod
    def from_record(cls, data: dict) -> TestResult:
        return cls(**{**data, "speed": [SpeedResult.from_dict(s) for s in data.get("speed", [])]})

    @property
    def speed_test(self) -> bool:
        return bool(self.speed_kind)

    @property
    def earned(self) -> float:
        return self.points if self.outcome == "passed" else 0.0

    @property
    def possible(self) -> float:
        return 0.0 if self.outcome == "skipped" or self.known_skip else self.points

    @property
    def known_skip(self) -> bool:
        """Never run, and would have been skipped by the grader anyway (a GPU test on a CPU): out of the maximum, as
        when it runs and skips."""
        return self.outcome == "not run" and bool(self.skip_reason)


@dataclass
class ExerciseTotal:
    earned: float = 0.0
    possible: float = 0.0
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    not_run: int = 0  # never started (pytest -x, -k, a session stopped early): worth nothing, but not failed


class Scoreboard:
    def __init__(self, impl: str):
        self.impl = impl
        self.tests: dict[str, TestResult] = {}

    def add(self, test: TestResult) -> None:
        self.tests[test.nodeid] = test

    def record_phase(self, nodeid: str, when: str, outcome: str, message: str) -> None:
        """One phase's report (setup, call, teardown): a test passes only by its call, and a failure sticks."""
        test = self.tests.get(nodeid)
        if test is None or test.outcome in ("failed", "skipped"):
            return
        if outcome in ("failed", "skipped"):
            test.outcome, test.message = outcome, clip(message)
        elif when == "call":
            test.outcome, test.message = "passed", ""

    def record_speed(self, nodeid: str, result: SpeedResult) -> None:
        if nodeid in self.tests:
            self.tests[nodeid].speed.append(result)

    def totals(self) -> dict[str, ExerciseTotal]:
        totals: dict[str, ExerciseTotal] = {}
        for test in self.tests.values():
            total = totals.setdefault(test.exercise, ExerciseTotal())
            total.earned += test.earned
            total.possible += test.possible
            outcome = "skipped" if test.known_skip else test.outcome.replace(" ", "_")
            setattr(total, outcome, getattr(total, outcome) + 1)
        return dict(sorted(totals.items()))

    def score_lines(self) -> list[str]:
        lines = table_lines(self.totals())
        skipped = [t.message if t.outcome == "skipped" else f"skipped: {t.skip_reason}" for t in self.tests.values()
                   if t.outcome == "skipped" or t.known_skip]  # fmt: skip
        return lines + not_graded_lines(skipped) if lines else lines

    def speed_lines(self) -> list[str]:
        rows = [(t, s) for t in self.tests.values() for s in t.speed]
        if not rows:
            return []
        lines = [f"{'test':<44}{'measured':>11}{'roofline':>10}{'threshold':>12}  verdict"]
        for test, s in rows:
            roof = f"{s.roofline:.0%}" if s.roofline is not None else "-"
            bar = f"{s.threshold.symbol} {s.threshold.value:g}"
            verdict = "pass" if s.passed else "FAIL"
            lines.append(f"{test.exercise + ' ' + test.name:<44.44}{s.measured:>11.3g}{roof:>10}{bar:>12}  {verdict}")
        return lines

    def gradescope(self, execution_time: float) -> dict:
        tests = []
        for number, test in enumerate(self.tests.values(), start=1):
            output = test.message if test.outcome != "passed" else ""
            output += "".join(f"\n{s.threshold.what}: {s.measured:.3g} ({s.detail})" for s in test.speed)
            tests.append(
                {
                    "name": f"{test.exercise} {test.name}",
                    "number": str(number),
                    "score": test.earned,
                    "max_score": test.possible,
                    "output": output.strip(),
                    "tags": [test.exercise] + (["speed"] if test.speed_test else []),
                    "visibility": test.visibility,
                }
            )
        leaderboard = [
            {"name": f"{t.exercise} {s.threshold.name}", "value": round(s.measured, 4), "order": _order(s)}
            for t in self.tests.values()
            for s in t.speed
        ]
        result = {
            "score": sum(t.earned for t in self.tests.values()),
            "execution_time": round(execution_time, 1),
            "output": "\n".join(self.score_lines()),
            "visibility": "visible",
            "stdout_visibility": "visible",
            "tests": tests,
        }
        if leaderboard:
            result["leaderboard"] = leaderboard
        return result

    def write_gradescope(self, path: Path, execution_time: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.gradescope(execution_time), indent=2) + "\n")


def table_lines(totals: dict[str, ExerciseTotal]) -> list[str]:
    """The score table: one row per exercise, then the total."""
    if not totals:
        return []
    not_run = any(t.not_run for t in totals.values())  # a column only when some test never started
    header = f"{'exercise':<10}{'points':>14}{'passed':>8}{'failed':>8}{'skipped':>9}"
    lines = [header + (f"{'not run':>9}" if not_run else "")]
    for exercise, t in totals.items():
        row = f"{exercise:<10}{_pts(t.earned, t.possible):>14}{t.passed:>8}{t.failed:>8}{t.skipped:>9}"
        lines.append(row + (f"{t.not_run:>9}" if not_run else ""))
    earned = sum(t.earned for t in totals.values())
    possible = sum(t.possible for t in totals.values())
    lines.append(f"{'total':<10}{_pts(earned, possible):>14}")
    return lines


def clip(message: str, limit: int = MESSAGE_LIMIT) -> str:
    """A long failure keeps its start and its end: pytest puts the assertion message and its location last."""
    if len(message) <= limit:
        return message
    head = limit // 4
    return f"{message[:head]}\n[... {len(message) - limit} characters left out ...]\n{message[-(limit - head):]}"


def not_graded_lines(skip_messages: list[str]) -> list[str]:
    """Say what was not graded and why, so that a full score on a CPU does not read as "done"."""
    reasons: dict[str, int] = {}
    for message in skip_messages:
        reason = message.removeprefix("skipped: ").strip()
        reasons[reason] = reasons.get(reason, 0) + 1
    lines = [f"not graded here: {n} test{'s' if n > 1 else ''} ({reason})" for reason, n in reasons.items()]
    if any("GPU" in reason for reason in reasons):
        lines.append("the score counts only what ran: run on a CUDA GPU to be graded for speed too")
    return lines


def totals_of_results(tests: list[dict]) -> dict[str, ExerciseTotal]:
    """Per-exercise totals of results.json test entries (a skipped test has max_score 0)."""
    totals: dict[str, ExerciseTotal] = {}
    for test in tests:
        total = totals.setdefault(test["tags"][0], ExerciseTotal())
        total.earned += test["score"]
        total.possible += test["max_score"]
        if test["max_score"] == 0:
            total.skipped += 1
        elif test["score"] == test["max_score"]:
            total.passed += 1
        else:
            total.failed += 1
    return totals


def _pts(earned: float, possible: float) -> str:
    return f"{earned:g} / {possible:g}"


def _order(result: SpeedResult) -> str:
    return "desc" if result.threshold.compare == "at_least" else "asc"
