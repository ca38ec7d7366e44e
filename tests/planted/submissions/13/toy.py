"""A hang in one function that the test process cannot interrupt (as a hang in native code would be): SIGALRM is
blocked (and SIGPROF, the CPU-time limit's signal), so only the parent's kill ends it."""

import signal
from pathlib import Path

exec((Path(__file__).resolve().parents[1] / "10" / "toy.py").read_text())  # the correct module; then the fault


def triple(x):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGPROF})
    while x > 0:
        x = x + 1
    return x
