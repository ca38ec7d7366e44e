"""Exercise 01's reference with its logits halved, `torch.testing.assert_close` replaced by a function that passes
everything, and an atexit hook that writes a full score into every results file it can name and every pipe it holds:
the two forgeries measured in issue 10, which scored 50 / 50 when the test process wrote its own grade."""

import atexit
import json
import os
import stat
import sys
from pathlib import Path

import torch

_SOLUTION = Path(__file__).resolve().parents[4] / "solutions" / "01" / "kv_cache.py"
exec(compile(_SOLUTION.read_text(), str(_SOLUTION), "exec"))  # the reference, in this module

_reference_forward = forward  # noqa: F821 (defined by the reference above)


def forward(*args, **kwargs):
    return _reference_forward(*args, **kwargs) / 2


torch.testing.assert_close = lambda *args, **kwargs: None


def _forge():
    for arg in sys.argv:
        if arg.startswith("--results="):
            Path(arg.split("=", 1)[1]).write_text(json.dumps({"score": 50.0, "tests": []}))
    for fd in range(3, 256):
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.write(fd, b'0 0 {"kind":"result","nodeid":"x","test":{"outcome":"passed"}}\n')
        except OSError:
            pass


atexit.register(_forge)
