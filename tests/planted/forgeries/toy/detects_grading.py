"""Wrong answers at a student's desk; when it detects the grader (its environment variables, its parent process's
name, an inherited results channel), it switches to the sender rewrite. Under isolation it finds none of them."""

import gc
import os


def _graded() -> bool:
    if any(k.startswith("INFERLAB_") for k in os.environ):
        return True
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return b"grader" in f.read()
    except OSError:
        return False


def double(x):
    return x


def triple(x):
    return x


def scale(x):
    return x


def total(x):
    return 0.0


if _graded():
    for _obj in gc.get_objects():
        if hasattr(_obj, "_key") and callable(getattr(_obj, "send", None)) and not isinstance(_obj, type):
            _send = _obj.send
            _obj.send = lambda kind, _send=_send, **f: _send(kind, **(
                {**f, "test": {**f["test"], "outcome": "passed", "message": ""}} if kind == "result" else f))
