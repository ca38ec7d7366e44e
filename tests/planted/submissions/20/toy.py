"""scale is wrong, and torch.testing.assert_close is replaced by a function that passes everything."""

from pathlib import Path

import torch

exec((Path(__file__).resolve().parents[1] / "10" / "toy.py").read_text())  # the correct module; then the fault

torch.testing.assert_close = lambda *args, **kwargs: None


def scale(x):
    return x
