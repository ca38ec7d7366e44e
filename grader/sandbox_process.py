"""The sandbox process: where the student's modules are imported and run under `python -m grader`.

The test process starts one sandbox, lazily, on the first `impl(...)` of an isolated test (grader/isolation.py), as a
fresh interpreter (`subprocess`, never a fork of a process that holds the channel's key). The sandbox gets one Unix
socket to the test process and one pipe on which it dumps its stack when asked (so a hang can say where it was);
every other descriptor is closed, its environment has none of the grader's variables (the seed secret included), it
refuses writes into the course (grader/confine.py), it is the out-of-memory killer's first choice, it dies with
the test process (PR_SET_PDEATHSIG, and the grader kills the test process's group), and the test process marks
itself non-dumpable first, so that a sandbox running as the same user can neither ptrace it nor read its memory or
its descriptors through /proc (with `--run-as`, both run as the unprivileged user; as root without it, nothing stops
root). The test process calls into the sandbox through grader/remote.py.

A sandbox call that hangs is the test's hang: the test's time limit interrupts the test process while it waits, the
sandbox dumps its stack (the frame in the student's file becomes "stopped in ..."), and it is killed. A sandbox that
dies costs the call in flight ("the process running the code under test died: ..."). Either way the next test
starts a fresh sandbox and re-imports the modules.
"""

from __future__ import annotations

import ctypes
import faulthandler
import importlib.util
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from . import failures, limits
from .remote import Connection, Endpoint, RemoteError, SandboxDied

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
DUMP_WAIT = 2.0  # seconds to wait for the stack of a sandbox that ran out of time
START_ENV_DROPPED = ("INFERLAB_",)  # the grader's variables: the sandbox must not tell it is graded from them


class Sandbox:
    """The test process's handle on its sandbox: started on first use, replaced after it died or was killed."""

    def __init__(self, root: Path, seed: int | None = None):
        self.root = Path(root)
        self.process: subprocess.Popen | None = None
        self.endpoint: Endpoint | None = None
        self.modules: dict[tuple[str, str], object] = {}
        self._dump_fd: int | None = None
        self.seed = seed
        self._budget: tuple[float, float] | None = None  # (CPU seconds allowed, the test's CPU clock at its start)
        self._sandbox_cpu_base = 0.0  # the sandbox's CPU time when the test started

    # --- life cycle ----------------------------------------------------------------------------------------------

    def start(self) -> Endpoint:
        if self.endpoint is not None and not self.endpoint.closed and self.process.poll() is None:
            return self.endpoint
        self.kill()
        _undumpable()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        dump_r, dump_w = os.pipe()
        env = {k: v for k, v in os.environ.items() if not k.startswith(START_ENV_DROPPED)}
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        argv = [sys.executable, "-m", "grader.sandbox_process", str(theirs.fileno()), str(dump_w), str(self.root)]
        try:
            self.process = subprocess.Popen(argv, env=env, cwd=self.root, pass_fds=(theirs.fileno(), dump_w),
                                            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)  # fmt: skip
        finally:
            theirs.close()
            os.close(dump_w)
        self._dump_fd = dump_r
        os.set_blocking(dump_r, False)
        self.endpoint = Endpoint(Connection(ours), trusting=False)
        self.endpoint.watch = self._check_time
        self.endpoint.on_failure = self._on_failure
        self._sandbox_cpu_base = 0.0
        self.modules.clear()
        return self.endpoint

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.endpoint is not None:
            self.endpoint.closed = True
            self.endpoint.connection.sock.close()
        if self._dump_fd is not None:
            os.close(self._dump_fd)
        self.process, self.endpoint, self._dump_fd = None, None, None
        self.modules.clear()

    def death(self) -> str:
        """Why the sandbox is gone, in words."""
        code = self.process.wait(timeout=5) if self.process is not None else None
        return failures.crash_message(code).replace("the test process", "the sandbox (the process running the code)")

    def stack(self) -> str:
        """Ask a live sandbox for its Python stack (faulthandler), waiting up to DUMP_WAIT seconds."""
        if self.process is None or self.process.poll() is not None or self._dump_fd is None:
            return ""
        try:
            self.process.send_signal(signal.SIGUSR1)
        except OSError:
            return ""
        chunks, deadline = [], time.monotonic() + DUMP_WAIT
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self._dump_fd], [], [], 0.1)
            if ready:
                try:
                    data = os.read(self._dump_fd, 65536)
                except BlockingIOError:
                    continue
                if not data:
                    break
                chunks.append(data)
                if b"File" in b"".join(chunks) and not select.select([self._dump_fd], [], [], 0.2)[0]:
                    break
        return b"".join(chunks).decode(errors="replace")

    # --- time -------------------------------------------------------------------------------------------------------

    def begin_test(self, seed: int, limit: float) -> None:
        """A test starts: its seed for the sandbox's generators, and its CPU-time limit (0: none), which counts the
        sandbox's CPU time as the test's own (grader/limits.py counts only the test process's)."""
        self.seed = seed
        self._budget = (limit, limits.clock()) if limit else None
        self._sandbox_cpu_base = self.cpu_seconds()

    def cpu_seconds(self) -> float:
        """The sandbox's CPU time so far (user and system), from /proc; 0 when there is none."""
        if self.process is None:
            return 0.0
        try:
            with open(f"/proc/{self.process.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return 0.0

    def _check_time(self) -> None:
        if self._budget is None:
            return
        limit, began = self._budget
        if limits.clock() - began + self.cpu_seconds() - self._sandbox_cpu_base > limit:
            raise limits.TimeLimitExceeded(limit)

    # --- use -----------------------------------------------------------------------------------------------------

    def call(self, op: str, *args):
        """One request; a dead sandbox raises SandboxDied with the cause, and is replaced on the next call."""
        return self.start().request(op, *args)

    def _on_failure(self, exc: BaseException) -> BaseException | None:
        if isinstance(exc, SandboxDied):  # the sandbox is gone: say why
            why = self.death()
            self.kill()
            return SandboxDied(why)
        exc.sandbox_stack = self.stack()  # the test's time limit (or Ctrl-C) while the sandbox ran: where was it?
        self.kill()
        return None

    def load(self, path: Path, name: str):
        """The module at `path`, imported in the sandbox as `name` (cached for this sandbox's life)."""
        key = (str(path), name)
        if self.seed is not None:  # once per test, before its first use of the sandbox
            seed, self.seed = self.seed, None
            self.call("seed", seed)
        if key not in self.modules or self.modules[key]._endpoint is not self.endpoint:
            self.modules[key] = self.call("load", str(path), name)
        return self.modules[key]

    def end_test(self) -> None:
        """Forget this test's objects on both sides (the modules stay)."""
        self._budget = None
        if self.endpoint is None or self.endpoint.closed:
            return
        try:
            self.call("forget")
        except Exception:  # noqa: BLE001 - a sandbox that cannot forget is replaced
            self.kill()
        if self.endpoint is not None:
            self.endpoint.forget()


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _undumpable() -> None:
    """Keep processes of the same user (the sandbox) out of this one: no ptrace, no /proc/<pid>/mem, fd or environ."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass


# --- the sandbox's side -------------------------------------------------------------------------------------------


def _load(endpoint: Endpoint, path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise RemoteError(f"not a Python module: {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and Triton's source inspection look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    endpoint.pinned.add(endpoint.export(module))
    return module


def main(argv: list[str]) -> None:
    fd, dump_fd, root = int(argv[0]), int(argv[1]), Path(argv[2])
    low, high = sorted((fd, dump_fd))
    for start, stop in ((3, low), (low + 1, high), (high + 1, os.sysconf("SC_OPEN_MAX"))):
        os.closerange(start, stop)  # only the connection and the dump pipe stay open
    dump = os.fdopen(dump_fd, "w")
    faulthandler.register(signal.SIGUSR1, file=dump, all_threads=False)
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    from .confine import confine_writes

    confine_writes(root)
    import torch  # noqa: F401 - tensors are decoded from the first message on

    endpoint = Endpoint(Connection(socket.socket(fileno=fd)), trusting=True)
    endpoint.handlers["load"] = lambda path, name: _load(endpoint, path, name)
    endpoint.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
