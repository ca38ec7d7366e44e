"""A hang in one function, in Python: SIGALRM stops it inside the test process."""

from pathlib import Path

exec((Path(__file__).resolve().parents[1] / "10" / "toy.py").read_text())  # the correct module; then the fault


def triple(x):
    while x > 0:
        x = x + 1
    return x
