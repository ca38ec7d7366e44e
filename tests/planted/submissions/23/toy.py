"""scale returns at once and leaves its work running on another stream (on the fake GPU of the planted course)."""

from pathlib import Path

import fake_gpu

exec((Path(__file__).resolve().parents[1] / "10" / "toy.py").read_text())  # the correct module; then the fault


def scale(x):
    fake_gpu.leave_work_running(0.005)
    return 2 * x
