"""Speed thresholds: one TOML file per exercise (`exercises/NN/thresholds.toml`), editable without touching tests.

Each table names one judged ratio, never a time in seconds:

    [decode_speedup_over_recompute]
    what = "tokens/s of cached generate / tokens/s of recomputing the prefix every step"
    compare = "at_least"            # or "at_most"
    student = 2.0                   # what a student must reach
    solution = 4.0                  # what the reference solution is held to (run with --impl=solution)
    [decode_speedup_over_recompute.gpu."H100"]
    student = 2.5                   # per-GPU override: the key is matched against the CUDA device name

A GPU key matches when it is contained in the device name ("H100" matches "NVIDIA H100 80GB HBM3"); the longest
matching key wins, so instructors can be as specific as they need.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

COMPARES = ("at_least", "at_most")


@dataclass(frozen=True)
class Threshold:
    name: str
    what: str
    compare: str
    value: float
    source: str  # where the value came from, for the failure message and the speed table

    def passes(self, measured: float) -> bool:
        return measured >= self.value if self.compare == "at_least" else measured <= self.value

    @property
    def symbol(self) -> str:
        return "≥" if self.compare == "at_least" else "≤"


class ThresholdError(Exception):
    pass


def load_table(path: Path) -> dict:
    if not path.is_file():
        raise ThresholdError(f"no thresholds file at {path}")
    with path.open("rb") as f:
        return tomllib.load(f)


def resolve(path: Path, name: str, impl: str, gpu: str | None) -> Threshold:
    table = load_table(path)
    if name not in table:
        raise ThresholdError(f"{path} has no threshold named [{name}] (has: {', '.join(sorted(table))})")
    entry = table[name]
    compare = entry.get("compare", "at_least")
    if compare not in COMPARES:
        raise ThresholdError(f"{path} [{name}]: compare must be one of {COMPARES}, got {compare!r}")
    if impl not in entry:
        raise ThresholdError(f"{path} [{name}] has no value for {impl!r}")
    value, source = entry[impl], f"{path.parent.name}/{path.name} [{name}].{impl}"
    matches = [key for key in entry.get("gpu", {}) if gpu and key in gpu]
    if matches:
        key = max(matches, key=len)
        if impl in entry["gpu"][key]:
            value, source = entry["gpu"][key][impl], f'{source} for gpu "{key}"'
    return Threshold(name, entry.get("what", name), compare, float(value), source)
