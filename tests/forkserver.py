"""A fork server for the mutation runs: import torch, transformers, triton and pytest once, fork a pytest per run.

A fresh `python -m pytest exercises/NN` spends several CPU-seconds importing its libraries before it runs a test,
and a mutant's tests often take less than that: across the course's ~360 mutants the imports were most of the
mutation stage's time. This process imports the libraries once; each run is a forked child that starts with them
imported, takes the run's working directory and environment, calls `pytest.main` and exits with its code.

Nothing that a run could change is imported before the fork: no course module, no grader module, and nothing that
touches CUDA (a CUDA context does not survive a fork). Triton takes part of its interpreter mode from
TRITON_INTERPRET when it is imported (a kernel that calls another @triton.jit function then fails under the
interpreter with "Cannot call @triton.jit'd outside of the scope of a kernel"), so the server is started with the
environment its runs will have (`env`). CPU time and interval timers start from zero in a child, so the grader's
CPU-time limits count only the run.

Protocol, one JSON object per line: the parent writes {"args", "cwd", "env", "log"}; this process answers
{"pid": child} at once and {"rc": exit code} when the child ends. The child leads its own process group, so a
parent whose patience runs out kills the group, whatever the run started.

    server = ForkServer(); rc = server.run(args, cwd=..., env=..., log=..., timeout=300); server.close()
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

PRELOAD = ("numpy", "torch", "triton", "transformers", "hypothesis", "pytest", "_pytest.pytester", "pytest_benchmark")


class ForkServer:
    """The parent's handle: one server process, one run at a time (use one per worker thread)."""

    def __init__(self, env: dict[str, str] | None = None):
        self.process = subprocess.Popen([sys.executable, "-u", __file__], stdin=subprocess.PIPE, env=env,
                                        stdout=subprocess.PIPE, text=True, bufsize=1)  # fmt: skip

    def run(self, args: list[str], *, cwd: str, env: dict[str, str], log: str, timeout: float) -> int | None:
        """The run's exit code, or None if it ran past `timeout` seconds (then it is killed, with its group)."""
        request = {"args": args, "cwd": cwd, "env": env, "log": log}
        self.process.stdin.write(json.dumps(request) + "\n")
        pid = json.loads(self.process.stdout.readline())["pid"]
        deadline = time.monotonic() + timeout
        while not select.select([self.process.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            if time.monotonic() >= deadline:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                json.loads(self.process.stdout.readline())  # the server reaped it
                return None
        return json.loads(self.process.stdout.readline())["rc"]

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=30)


def _child(request: dict) -> None:
    code = 70
    try:
        os.setpgid(0, 0)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        # `python -m pytest` puts the working directory first on sys.path, then $PYTHONPATH.
        sys.path[:0] = [request["cwd"], *filter(None, request["env"].get("PYTHONPATH", "").split(os.pathsep))]
        sys.argv = ["pytest", *request["args"]]
        import pytest

        code = int(pytest.main(request["args"]))
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> None:
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    sys.path.pop(0)  # this file's folder (tests/) is no library of the runs; each run brings its own path
    serve()
