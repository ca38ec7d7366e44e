"""Keep a test process from writing into the course: an audit hook that refuses writes under the course's root.

A test process that rewrote a grader module, a test file or a cached .pyc would change what the next process (a
re-run after a crash) loads. Under `python -m grader`, the test process installs this hook before any student code
is imported; audit hooks cannot be removed, and every `open` for writing, rename, removal, link and permission change
that Python performs passes through it. Writes below the root are refused with PermissionError, except in the
caches that tests legitimately write (hypothesis's examples database). Native code and other programs started by the
code under test are not seen by the hook: the parent's manifest check (grader/sandbox.py) covers those.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

WRITABLE_DIRS = (".hypothesis", ".benchmarks")
PATH_EVENTS = {  # event -> positions of the path arguments that would be written
    "os.rename": (0, 1), "os.replace": (0, 1), "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,),
    "os.symlink": (1,), "os.link": (1,), "os.truncate": (0,), "os.chmod": (0,), "os.chown": (0,),
    "os.utime": (0,), "shutil.rmtree": (0,), "shutil.move": (0, 1), "shutil.copytree": (1,),
}  # fmt: skip
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def confine_writes(root: Path) -> None:
    root = Path(root).resolve()
    allowed = tuple(root / d for d in WRITABLE_DIRS)

    def refused(path) -> bool:
        if isinstance(path, int):
            return False
        try:
            target = Path(os.fsdecode(path))
            target = (target if target.is_absolute() else Path.cwd() / target).resolve()
        except (TypeError, ValueError, OSError):
            return False
        inside = target == root or root in target.parents
        return inside and not any(target == a or a in target.parents for a in allowed)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & WRITE_FLAGS
            )
            paths = (path,) if writing else ()
        else:
            positions = PATH_EVENTS.get(event)
            if positions is None:
                return
            paths = tuple(args[i] for i in positions if i < len(args))
        for path in paths:
            if refused(path):
                raise PermissionError(f"the grader does not let a test write into the course's files: {path}")

    sys.addaudithook(hook)
