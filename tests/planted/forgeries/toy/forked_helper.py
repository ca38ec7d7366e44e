"""Implements nothing; at import, forks a helper that detaches (double fork, new session), waits until the test
process is gone, and then writes forged records into every descriptor it holds and a forged results file
(PLANTED_FORGE_PATH-isolated): the grader must kill it before then."""

import os
import time

_tests = os.getppid()  # the sandbox's parent: the test process
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        while os.path.exists(f"/proc/{_tests}"):
            time.sleep(0.2)
        time.sleep(1)
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
