"""The clock is replaced: time.perf_counter stands still."""

import time
from pathlib import Path

exec((Path(__file__).resolve().parents[1] / "10" / "toy.py").read_text())  # the correct module; then the fault

time.perf_counter = lambda: 0.0
