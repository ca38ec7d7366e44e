"""Starting and stopping test processes so that nothing they leave behind outlives them or changes the grader.

- Each test process starts in its own session (process group), and when it ends the whole group is killed.
- The grader makes itself a *subreaper* (Linux): a process the test process forks and abandons (double fork,
  setsid) is re-parented to the grader instead of to init, so the grader finds it and kills it too. A forked helper
  that sleeps and then rewrites results.json therefore dies before results.json is written.
- `Manifest` fingerprints the files a test process runs or configures itself from (modules, .pyc, .pth, native
  libraries, ini/cfg/toml: size, mtime, ctime, inode) before the first test process starts, and is checked after
  each one ends: a test process that rewrote a grader module, a fixture, a test file or a cached .pyc (so that the
  next process would load it), or added a module, a conftest.py or a pytest.ini to the root (where it would shadow a
  package or change pytest's options), is detected, and nothing it reported is trusted. Test processes run with
  PYTHONDONTWRITEBYTECODE and cannot write under the root from Python (grader/confine.py), so a legitimate one
  changes nothing there. Only the grader, the fixtures, the graded exercises and the root are watched, so that an
  instructor editing another exercise, the solutions or a data file while a run goes on does not void it.
- With `--run-as USER` (as root, e.g. in a Gradescope container) the test processes run as an unprivileged user who
  cannot write the grader's files, the installed packages or the results, nor signal the grader.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
SKIPPED_DIRS = {".git", ".hypothesis", ".benchmarks", ".pytest_cache", ".ruff_cache", ".mypy_cache"}

LOADED_SUFFIXES = {".py", ".pyc", ".pth", ".ini", ".cfg", ".toml", ".so"}

_live_children: set[int] = set()
_lock = threading.Lock()


def become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def track(pid: int) -> None:
    with _lock:
        _live_children.add(pid)


def untrack(pid: int) -> None:
    with _lock:
        _live_children.discard(pid)


stopping = threading.Event()  # set on Ctrl-C: no new test process starts, the running ones are killed


def stop_all() -> None:
    stopping.set()
    with _lock:
        live = list(_live_children)
    for pid in live:
        kill_group(pid)


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def reap_orphans() -> int:
    """Kill and reap every process re-parented to the grader that is not one of its test processes."""
    me = os.getpid()
    killed = 0
    with _lock:
        live = set(_live_children)
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit() or int(entry.name) in live:
            continue
        try:
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == me:
            pid = int(entry.name)
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                killed += 1
            except (ProcessLookupError, ChildProcessError, PermissionError):
                pass
    return killed


class Manifest:
    """Fingerprints of every file under the `trees`, and of the entries (not the contents) of the `listings`."""

    def __init__(self, root: Path, trees: list[Path], listings: list[Path], ignore: tuple[Path, ...] = ()):
        self.root = root
        self.trees = trees
        self.listings = listings
        self.ignore = tuple(p.resolve() for p in ignore)
        self.files = self._scan()

    def _scan(self) -> dict[str, tuple]:
        files = {}
        for listing in self.listings:
            for entry in sorted(listing.iterdir()) if listing.is_dir() else ():
                if entry.name not in SKIPPED_DIRS and not self._ignored(entry):
                    loaded = entry.is_file() and entry.suffix in LOADED_SUFFIXES  # a module, a .pth, pytest's config
                    files[self._name(entry)] = self._fingerprint(entry, contents=loaded)
        for tree in self.trees:
            walk = os.walk(tree) if tree.is_dir() else [(str(tree.parent), [], [tree.name])] if tree.exists() else []
            for directory, dirs, names in walk:
                dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not self._ignored(Path(directory, d))]
                for name in names:
                    path = Path(directory, name)
                    if not self._ignored(path) and path.suffix in LOADED_SUFFIXES:
                        files[self._name(path)] = self._fingerprint(path, contents=True)
        return files

    def _name(self, path: Path) -> str:
        return os.path.relpath(path, self.root) if self.root in path.parents else str(path)

    @staticmethod
    def _fingerprint(path: Path, contents: bool) -> tuple:
        try:
            st = path.lstat()
        except OSError:
            return ("gone",)
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) if contents else ("entry",)

    def _ignored(self, path: Path) -> bool:
        return any(path == p or p in path.parents for p in self.ignore)

    def changes(self) -> list[str]:
        """Files added, removed or written since the manifest was taken."""
        now = self._scan()
        changed = [f"{name} (written)" for name in self.files if name in now and now[name] != self.files[name]]
        changed += [f"{name} (removed)" for name in self.files if name not in now]
        changed += [f"{name} (added)" for name in now if name not in self.files]
        return sorted(changed)
