"""Every answer wrong, and a forged "passed" record written into each pipe the process holds, at import: the grader
trusts nothing the process reports after that, so the forgery earns nothing."""

import os
import stat

RECORD = b'1 0000 {"kind":"result","nodeid":"x","test":{"outcome":"passed"}}\n'


def double(x):
    return 0


triple = scale = total = double


def _pipes():
    for fd in range(3, 256):
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                yield fd
        except OSError:
            continue


for pipe in _pipes():
    os.write(pipe, RECORD)
