"""total asks the GPU for far more memory than it has."""

from pathlib import Path

import torch

exec((Path(__file__).resolve().parents[1] / "30" / "toy.py").read_text())  # the correct module; then the fault


def total(x):
    return float(torch.empty(2**45, device="cuda").sum())  # 128 TiB
