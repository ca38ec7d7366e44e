"""Implements nothing; at import, forks a helper that detaches, outlives its test, and keeps trying to write forged
records and a forged results file (PLANTED_FORGE_PATH) after the tests are over."""

import os
import time

if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(3)
        path = os.environ.get("PLANTED_FORGE_PATH")
        if path:
            with open(path + "-isolated", "w") as f:
                f.write('{"score": 999}')
        for fd in range(3, 64):
            try:
                os.write(fd, b'5 0000 {"kind":"done"}\n')
            except OSError:
                pass
    os._exit(0)
