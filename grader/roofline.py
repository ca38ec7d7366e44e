"""The roofline chart of a graded run: every roofline-judged kernel against the limit measured on its GPU.

A speed test that judges a fraction of the copy bandwidth (`speed.bandwidth_fraction` then `speed.judge(...,
roofline=fraction)`) records what the kernel achieved (bytes moved per second) and the device-to-device copy
bandwidth measured on the same GPU in the same process: the roof a memory-bound kernel can reach. The chart draws one
bar per such measurement, the roof as a dashed line, and each test's threshold as a tick on its bar, one panel per
GPU (bench/03_awq_roofline.py draws the same view for exercise 03's reference and its baselines). matplotlib is
optional: without it the chart is skipped and the report says why.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from .scoring import Scoreboard


def measurements(scores: Scoreboard) -> dict[str, list[dict]]:
    """{hardware: [{label, bytes_per_s, copy_bandwidth, threshold, passed}]} for every roofline-judged result."""
    panels: dict[str, list[dict]] = {}
    for test in scores.tests.values():
        for s in test.speed:
            if s.roofline is None or not s.bytes_per_s or not s.copy_bandwidth:
                continue
            panels.setdefault(s.hardware or "GPU", []).append(
                dict(label=f"{test.exercise} {s.threshold.name}", bytes_per_s=s.bytes_per_s,
                     copy_bandwidth=s.copy_bandwidth, threshold=s.threshold.value, passed=s.passed)
            )  # fmt: skip
    return panels


def write_chart(path: Path | None, scores: Scoreboard) -> str | None:
    """Draw the chart at `path`; return None when written, else why not (for the report)."""
    panels = measurements(scores)
    if path is None:
        return "no output path"
    if not panels:
        return "no roofline-judged speed test was measured in this run (speed is graded on a CUDA GPU only)"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib to get it)"
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(7.0, 0.9 * max(map(len, panels.values())) + 3), 4.6 *
                             len(panels)), squeeze=False)  # fmt: skip
    for ax, (hardware, rows) in zip(axes[:, 0], panels.items(), strict=True):
        roof = statistics.median(r["copy_bandwidth"] for r in rows) / 1e12
        xs = range(len(rows))
        colors = ["tab:green" if r["passed"] else "tab:red" for r in rows]
        bars = ax.bar(xs, [r["bytes_per_s"] / 1e12 for r in rows], 0.6, color=colors)
        ax.bar_label(bars, [f"{r['bytes_per_s'] / r['copy_bandwidth']:.0%}" for r in rows], fontsize=8)
        ax.hlines([r["threshold"] * r["copy_bandwidth"] / 1e12 for r in rows], [x - 0.3 for x in xs],
                  [x + 0.3 for x in xs], colors="black", linewidth=2, label="threshold")  # fmt: skip
        ax.axhline(roof, color="black", linestyle="--", linewidth=1, label="measured copy bandwidth")
        ax.set_xticks(list(xs), [r["label"] for r in rows], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("TB/s moved")
        ax.set_ylim(0, roof * 1.3)
        ax.set_title(f"{hardware}: speed-graded kernels against the measured copy bandwidth\n"
                     "(labels: fraction of it; green passed, red failed)", fontsize=9)  # fmt: skip
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
