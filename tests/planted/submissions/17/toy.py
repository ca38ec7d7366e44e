"""A huge allocation in one function (refused at once), and one that the out-of-memory killer would end (SIGKILL)."""

import os
import signal
from pathlib import Path

import torch

exec((Path(__file__).resolve().parents[1] / "10" / "toy.py").read_text())  # the correct module; then the fault


def triple(x):
    os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's out-of-memory killer does to a process that ate the RAM


def total(x):
    return float(torch.empty(2**46, dtype=torch.float32).sum())  # 256 TB
