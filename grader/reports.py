"""What `python -m grader` writes for a course: Gradescope's results.json, a markdown report, JUnit XML, a chart.

All of them are written by the parent process from its own verdicts, after every test process has ended (and every
process those left behind has been killed), so nothing a test process writes can end up in them:

- `--results PATH`: Gradescope's results.json (https://gradescope-autograders.readthedocs.io, "specifications");
- beside it, PATH with `.md`: each exercise's score, each speed test's measured ratio against its threshold, what
  happened (timeouts, crashes, re-runs, rejected records), and the failures with their messages (hidden tests by
  name only). GitHub Actions can show it as the job summary;
- beside it, `<stem>-roofline.png` when speed was graded: every roofline-judged kernel against the copy bandwidth
  measured on the GPU it ran on (grader/roofline.py);
- `--junitxml PATH`: JUnit XML in the layout pytest's `--junitxml` writes, one `<testsuite>` per exercise, with the
  points as properties, for CI tools that read test reports.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from . import roofline
from .scoring import Scoreboard, TestResult, clip, not_graded_lines

REPORT_MESSAGE_LIMIT = 1500


@dataclass
class Outputs:
    results: Path | None
    report: Path | None
    chart: Path | None
    junit: Path | None

    @classmethod
    def beside(cls, results: str | None, junit: str | None) -> Outputs:
        path = Path(results).resolve() if results else None
        return cls(
            path,
            path.with_suffix(".md") if path else None,
            path.with_name(f"{path.stem}-roofline.png") if path else None,
            Path(junit).resolve() if junit else None,
        )

    def paths(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.results, self.report, self.chart, self.junit) if p is not None)

    def write(self, scores: Scoreboard, elapsed: float, summary: list[str], happened: list[str], header: dict):
        """Write every requested output; return the lines that say what was written."""
        lines = []
        if self.results:
            results = scores.gradescope(elapsed)
            results["output"] = "\n".join(summary)
            _write(self.results, json.dumps(results, indent=2) + "\n")
            chart_note = roofline.write_chart(self.chart, scores)
            _write(self.report, markdown(scores, elapsed, happened, header, self.chart if chart_note is None else None,
                                         chart_note))  # fmt: skip
            lines.append(f"results written to {self.results} (report: {self.report.name}"
                         + (f", chart: {self.chart.name})" if chart_note is None else ")"))  # fmt: skip
        if self.junit:
            _write(self.junit, junit_xml(scores, elapsed))
            lines.append(f"JUnit XML written to {self.junit}")
        return lines


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text)
    partial.replace(path)  # readers never see half a file


def markdown(scores: Scoreboard, elapsed: float, happened: list[str], header: dict, chart: Path | None,
             chart_note: str | None) -> str:  # fmt: skip
    gpus = header.get("gpus") or []
    hardware = sorted({s.hardware for t in scores.tests.values() for s in t.speed if s.hardware})
    lines = [
        "# inferlab grade",
        "",
        f"{scores.impl} implementation; exercises {', '.join(header.get('exercises', []))}; {elapsed:.0f} s; "
        + (f"{len(gpus)} CUDA GPU{'s' if len(gpus) > 1 else ''}" if gpus else "no CUDA GPU (speed not graded)")
        + ("; a secret seed was mixed into the tests' inputs" if header.get("secret") else ""),
        "",
        "## Score",
        "",
        "| exercise | points | passed | failed | skipped |",
        "|---|---:|---:|---:|---:|",
    ]
    totals = scores.totals()
    for exercise, t in totals.items():
        lines.append(f"| {exercise} | {t.earned:g} / {t.possible:g} | {t.passed} | {t.failed} | {t.skipped} |")
    earned, possible = sum(t.earned for t in totals.values()), sum(t.possible for t in totals.values())
    lines += [f"| **total** | **{earned:g} / {possible:g}** | | | |", ""]
    skipped = not_graded_lines([t.message for t in scores.tests.values() if t.outcome == "skipped"])
    lines += [f"{line[0].upper()}{line[1:]}." for line in skipped] + ([""] if skipped else [])
    lines += ["## Speed", ""]
    rows = [(t, s) for t in scores.tests.values() for s in t.speed]
    if rows:
        lines += [f"Measured on {', '.join(hardware)}: ratios measured in this run, never seconds.", "",
                  "| exercise | test | what | measured | threshold | roofline | verdict |",
                  "|---|---|---|---:|---:|---:|---|"]  # fmt: skip
        for test, s in rows:
            roof = f"{s.roofline:.0%}" if s.roofline is not None else "-"
            lines.append(
                f"| {test.exercise} | {test.name} | {s.threshold.what} | {s.measured:.3g} | "
                f"{s.threshold.symbol} {s.threshold.value:g} | {roof} | {'pass' if s.passed else 'FAIL'} |"
            )
        lines.append("")
    else:
        lines += ["No speed test was graded in this run (they need a CUDA GPU, or they failed before measuring).", ""]
    if chart is not None:
        lines += [f"![roofline]({chart.name})", ""]
    elif chart_note:
        lines += [f"No roofline chart: {chart_note}.", ""]
    if happened:
        lines += ["## What happened", "", *(f"- {event}" for event in happened), ""]
    failed = [t for t in scores.tests.values() if t.outcome not in ("passed", "skipped")]
    if failed:
        lines += ["## Failed tests", ""]
        for test in failed:
            lines.append(f"### {test.exercise} {test.name} ({test.points:g} point{'s' if test.points != 1 else ''})")
            if test.visibility != "visible":
                lines += ["", "(a hidden test: its message is not shown)", ""]
                continue
            lines += ["", "```text", clip(test.message, REPORT_MESSAGE_LIMIT).replace("```", "'''"), "```", ""]
    return "\n".join(lines)


def junit_xml(scores: Scoreboard, elapsed: float) -> str:
    root = ET.Element("testsuites", name="inferlab", time=f"{elapsed:.3f}")
    by_exercise: dict[str, list[TestResult]] = {}
    for test in scores.tests.values():
        by_exercise.setdefault(test.exercise, []).append(test)
    for exercise, tests in by_exercise.items():
        failures = sum(t.outcome not in ("passed", "skipped") for t in tests)
        skipped = sum(t.outcome == "skipped" for t in tests)
        suite = ET.SubElement(root, "testsuite", name=f"exercise {exercise}", tests=str(len(tests)),
                              failures=str(failures), errors="0", skipped=str(skipped),
                              time=f"{sum(t.duration for t in tests):.3f}")  # fmt: skip
        for test in tests:
            classname = test.path.removesuffix(".py").replace("/", ".") or f"exercises.{exercise}"
            case = ET.SubElement(suite, "testcase", classname=classname, name=test.name, time=f"{test.duration:.3f}")
            properties = ET.SubElement(case, "properties")
            for name, value in (("points", test.points), ("score", test.earned), ("max_score", test.possible)):
                ET.SubElement(properties, "property", name=name, value=f"{value:g}")
            if test.outcome == "skipped":
                ET.SubElement(case, "skipped", message=test.message.removeprefix("skipped: "))
            elif test.outcome != "passed":
                first = (test.message.strip().splitlines() or ["failed"])[-1][:200]
                failure = ET.SubElement(case, "failure", message=first)
                failure.text = clip(test.message) if test.visibility == "visible" else "(a hidden test)"
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
