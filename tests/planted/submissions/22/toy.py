"""scale returns the output of its first call every time after: caching outputs between timed calls."""

from pathlib import Path

exec((Path(__file__).resolve().parents[1] / "10" / "toy.py").read_text())  # the correct module; then the fault

_cache = []


def scale(x):
    if not _cache:
        _cache.append(2 * x)
    return _cache[0]
