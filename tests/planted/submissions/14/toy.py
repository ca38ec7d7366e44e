"""A segmentation fault in one function."""

import ctypes
from pathlib import Path

exec((Path(__file__).resolve().parents[1] / "10" / "toy.py").read_text())  # the correct module; then the fault


def scale(x):
    return ctypes.string_at(0)
