"""Correct answers, but a forged record written into every pipe at import: the grade must not be trusted."""

import os
import stat
from pathlib import Path

exec((Path(__file__).resolve().parents[1] / "10" / "toy.py").read_text())  # the correct module; then the fault

for fd in range(3, 256):
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.write(fd, b'1 0000 {"kind":"result","nodeid":"x","test":{"outcome":"passed"}}\n')
    except OSError:
        pass
