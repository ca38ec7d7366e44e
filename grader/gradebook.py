"""The gradebook of a class graded by `python -m grader.batch`: what each submission's grader wrote, and the class.

    GRADEBOOK/submissions/<student>/results.json   the single-submission grader's results (Gradescope's format)
    GRADEBOOK/submissions/<student>/results.md     its report (and results-roofline.png when speed was graded)
    GRADEBOOK/submissions/<student>/grader.log     the end of its output
    GRADEBOOK/submissions/<student>/record.json    how it was graded: key, status, attempts, node, GPU, bandwidth
    GRADEBOOK/gradebook.csv                        a row per student: points per exercise, speed ratios, hardware
    GRADEBOOK/summary.md, summary.png              the class: points per exercise, speed ratios against thresholds

Nothing here grades: the numbers are read from each submission's results.json, so the gradebook says exactly what
the single-submission grader said. A record's key is the hash of the graded files with the grader's options; a
re-run skips a submission whose record is "graded" under the same key.
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .thresholds import Threshold, ThresholdError, resolve

GRADED, NO_RESULTS, LOST = "graded", "no results", "lost"  # a record's status
RECORD = "record.json"


@dataclass
class Record:
    student: str
    key: str  # hash of the submitted modules, the grader's options and the secret
    status: str = LOST
    attempts: int = 0
    events: list[str] = field(default_factory=list)  # lost attempts, a grader that ended without results, ...
    node: str = ""  # where the attempt that counted ran
    gpu: str = ""  # the CUDA device name ("" on a CPU-only task)
    copy_bandwidth: float | None = None  # bytes/s of a device-to-device copy on that GPU, read + written
    seconds: float = 0.0  # wall time of the attempt that counted
    exit_code: int | None = None  # of the grader
    graded_at: str = ""  # UTC, ISO 8601
    course: str = ""  # hash of the course and grader files it was graded with


@dataclass
class Row:
    """One student's line of the gradebook, from the record and the results.json it points to."""

    record: Record
    points: dict[str, tuple[float, float]]  # exercise: (earned, possible)
    ratios: dict[str, float]  # "NN threshold_name": measured

    @property
    def earned(self) -> float:
        return sum(e for e, _ in self.points.values())

    @property
    def possible(self) -> float:
        return sum(p for _, p in self.points.values())


class Gradebook:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def folder_of(self, student: str) -> Path:
        return self.folder / "submissions" / student

    def record(self, student: str) -> Record | None:
        try:
            return Record(**json.loads((self.folder_of(student) / RECORD).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def unchanged(self, student: str, key: str) -> bool:
        """Graded before with the same files and configuration (and its results are still there)."""
        record = self.record(student)
        return (record is not None and record.key == key and record.status == GRADED
                and (self.folder_of(student) / "results.json").is_file())  # fmt: skip

    def save(self, record: Record, files: dict[str, bytes]) -> None:
        """Replace what the student's folder held: the grader's files first, the record last."""
        folder = self.folder_of(record.student)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():
            if stale.is_file() and stale.name not in files:
                stale.unlink()
        for name, data in files.items():
            _write(folder / name, data)
        _write(folder / RECORD, (json.dumps(asdict(record), indent=2) + "\n").encode())

    def row(self, student: str) -> Row | None:
        record = self.record(student)
        if record is None:
            return None
        points: dict[str, tuple[float, float]] = {}
        ratios: dict[str, float] = {}
        if record.status == GRADED:
            results = json.loads((self.folder_of(student) / "results.json").read_text())
            for test in results["tests"]:
                earned, possible = points.get(test["tags"][0], (0.0, 0.0))
                points[test["tags"][0]] = (earned + test["score"], possible + test["max_score"])
            ratios = {entry["name"]: entry["value"] for entry in results.get("leaderboard", [])}
        return Row(record, dict(sorted(points.items())), ratios)

    def write(self, students: list[str], course: Path, header: list[str]) -> list[str]:
        """gradebook.csv, summary.md and summary.png for these students; return what was written."""
        rows = [row for row in map(self.row, students) if row is not None]
        exercises = sorted({e for row in rows for e in row.points})
        ratios = sorted({name for row in rows for name in row.ratios})
        _write(self.folder / "gradebook.csv", csv_text(rows, exercises, ratios).encode())
        thresholds = {name: threshold_of(course, name, _common_gpu(rows)) for name in ratios}
        chart = self.folder / "summary.png"
        note = write_chart(chart, rows, exercises, ratios, thresholds)
        summary = summary_markdown(rows, exercises, ratios, thresholds, header, chart.name if note is None else None)
        _write(self.folder / "summary.md", (summary + (f"\nNo chart: {note}.\n" if note else "")).encode())
        return [f"gradebook written to {self.folder / 'gradebook.csv'} (summary: summary.md"
                + (", chart: summary.png)" if note is None else ")")]  # fmt: skip


def csv_text(rows: list[Row], exercises: list[str], ratios: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["student", "status", "points", "max_points", *exercises, *(f"{e} max" for e in exercises),
                     *ratios, "gpu", "copy_bandwidth_gb_s", "node", "seconds", "attempts", "graded_at", "key",
                     "note"])  # fmt: skip
    for row in rows:
        r = row.record
        graded = r.status == GRADED
        writer.writerow([
            r.student, r.status, _num(row.earned), _num(row.possible) if graded else "",
            *(_num(row.points[e][0]) if e in row.points else "" for e in exercises),
            *(_num(row.points[e][1]) if e in row.points else "" for e in exercises),
            *(f"{row.ratios[name]:.4g}" if name in row.ratios else "" for name in ratios),
            r.gpu, f"{r.copy_bandwidth / 1e9:.0f}" if r.copy_bandwidth else "", r.node, f"{r.seconds:.0f}",
            r.attempts, r.graded_at, r.key[:16], "; ".join(r.events),
        ])  # fmt: skip
    return out.getvalue()


def threshold_of(course: Path, name: str, gpu: str | None) -> Threshold | None:
    """The student threshold of "NN threshold_name", for this GPU, as the grader resolves it."""
    exercise, _, threshold = name.partition(" ")
    try:
        return resolve(course / "exercises" / exercise / "thresholds.toml", threshold, "student", gpu)
    except (ThresholdError, OSError, ValueError):
        return None


def _common_gpu(rows: list[Row]) -> str | None:
    names = [row.record.gpu for row in rows if row.record.gpu]
    return max(set(names), key=names.count) if names else None


def summary_markdown(rows: list[Row], exercises: list[str], ratios: list[str], thresholds: dict,
                     header: list[str], chart: str | None) -> str:  # fmt: skip
    graded = [row for row in rows if row.record.status == GRADED]
    lines = ["# inferlab gradebook", "", *header, ""]
    no_results, lost = (sum(r.record.status == status for r in rows) for status in (NO_RESULTS, LOST))
    lines += [f"{len(rows)} submissions: {len(graded)} graded, {no_results} whose grader ended without results "
              f"(0 points), {lost} lost (every attempt's worker or node died).", ""]  # fmt: skip
    lines += [hardware_line(graded), ""]
    lines += ["## Points per exercise", "", "| exercise | max | mean | median | min | max earned | full marks | zero |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    columns = [(e, [row.points[e] for row in graded if e in row.points]) for e in exercises]
    columns.append(("**total**", [(row.earned, row.possible) for row in graded]))
    for name, values in columns:
        if not values:
            continue
        earned = [e for e, _ in values]
        possible = sorted({p for _, p in values})
        lines.append(f"| {name} | {' or '.join(_num(p) for p in possible)} | {statistics.mean(earned):.1f} | "
                     f"{_num(statistics.median(earned))} | {_num(min(earned))} | {_num(max(earned))} | "
                     f"{sum(e == p > 0 for e, p in values)} | {sum(e == 0 for e in earned)} |")  # fmt: skip
    lines += ["", "## Speed ratios", ""]
    if ratios:
        lines += ["Ratios measured in each submission's own run, on its own GPU (never seconds).", "",
                  "| exercise | ratio | student threshold | measured | min | median | max | meet it |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for name in ratios:
            values = [row.ratios[name] for row in graded if name in row.ratios]
            bar = thresholds.get(name)
            met = f"{sum(bar.passes(v) for v in values)}" if bar else "-"
            exercise, _, ratio = name.partition(" ")
            bar_text = f"{bar.symbol} {bar.value:g}" if bar else "?"
            lines.append(f"| {exercise} | {ratio} | {bar_text} | {len(values)} | {min(values):.3g} | "
                         f"{statistics.median(values):.3g} | {max(values):.3g} | {met} |")  # fmt: skip
    else:
        lines.append("No speed ratio was measured (speed is graded on CUDA GPUs only).")
    if chart:
        lines += ["", f"![points and speed ratios]({chart})"]
    lines += ["", "## Submissions", "", "| student | points | status | GPU | attempts | note |",
              "|---|---:|---|---|---:|---|"]  # fmt: skip
    for row in rows:
        r = row.record
        points = f"{_num(row.earned)} / {_num(row.possible)}" if r.status == GRADED else "0"
        lines.append(f"| {r.student} | {points} | {r.status} | {r.gpu or '-'} | {r.attempts} | "
                     f"{'; '.join(r.events).replace('|', '/')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def hardware_line(graded: list[Row]) -> str:
    """Whether every student was timed on the same kind of card (and at what copy bandwidth)."""
    gpus: dict[str, list[float]] = {}
    for row in graded:
        if row.record.gpu:
            gpus.setdefault(row.record.gpu, []).extend([row.record.copy_bandwidth] if row.record.copy_bandwidth
                                                       else [])  # fmt: skip
    without = sum(not row.record.gpu for row in graded)
    if not gpus:
        return "Hardware: no task had a CUDA GPU (speed on CUDA GPUs is not graded without one)."
    parts = []
    for name, bandwidths in sorted(gpus.items()):
        count = sum(row.record.gpu == name for row in graded)
        spread = (f", copy bandwidth {min(bandwidths) / 1e12:.2f}-{max(bandwidths) / 1e12:.2f} TB/s"
                  if bandwidths else "")  # fmt: skip
        parts.append(f"{count} on {name}{spread}")
    line = "Hardware: " + "; ".join(parts) + (f"; {without} without a GPU" if without else "")
    if len(gpus) > 1 or without:
        line += ". **Not every submission was timed on the same kind of card**: compare speed within a kind."
    return line


def write_chart(path: Path, rows: list[Row], exercises: list[str], ratios: list[str], thresholds: dict) -> str | None:
    """A points histogram per exercise, and every speed ratio against its threshold. None, or why there is none."""
    graded = [row for row in rows if row.record.status == GRADED]
    if not graded:
        return "no submission was graded"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    panels = [*exercises, "total"]
    columns = min(4, len(panels))
    histogram_rows = -(-len(panels) // columns)
    figure = plt.figure(figsize=(3.2 * columns, 2.4 * histogram_rows + (3.0 if ratios else 0)), layout="constrained")
    grid = figure.add_gridspec(histogram_rows + (1 if ratios else 0), columns)
    for i, name in enumerate(panels):
        axes = figure.add_subplot(grid[i // columns, i % columns])
        values = ([row.earned for row in graded] if name == "total"
                  else [row.points[name][0] for row in graded if name in row.points])  # fmt: skip
        top = max([row.possible if name == "total" else row.points.get(name, (0, 0))[1] for row in graded] + [1])
        bins = [i - 0.5 for i in range(int(top) + 2)] if top <= 40 else 40  # one bar per point, up to 40 points
        axes.hist(values, bins=bins, color="tab:blue")
        axes.yaxis.get_major_locator().set_params(integer=True)
        axes.set_title(f"exercise {name}" if name != "total" else "total", fontsize=9)
        axes.set_xlabel("points", fontsize=8)
        axes.tick_params(labelsize=7)
    if ratios:
        axes = figure.add_subplot(grid[histogram_rows, :])
        for x, name in enumerate(ratios):
            values = [row.ratios[name] for row in graded if name in row.ratios]
            bar = thresholds.get(name)
            colors = ["tab:green" if bar is None or bar.passes(v) else "tab:red" for v in values]
            jitter = [x + 0.25 * ((i * 0.618) % 1 - 0.5) for i in range(len(values))]
            axes.scatter(jitter, values, s=14, c=colors, zorder=3)
            if bar is not None:
                axes.hlines(bar.value, x - 0.35, x + 0.35, colors="black", linestyles="--", zorder=2)
        axes.set_xticks(range(len(ratios)), ratios, rotation=20, ha="right", fontsize=7)
        axes.set_ylabel("measured ratio", fontsize=8)
        axes.set_title("speed ratios (dashed: the student threshold; red: misses it)", fontsize=9)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def _num(value: float) -> str:
    return f"{value:g}"


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_bytes(data)
    partial.replace(path)  # a reader (or a run stopped halfway) never sees half a file
