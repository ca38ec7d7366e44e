"""scale launches its work on a side stream and returns without making the current stream wait for it."""

from pathlib import Path

import torch

exec((Path(__file__).resolve().parents[1] / "30" / "toy.py").read_text())  # the correct module; then the fault


def scale(x):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(2_000_000)  # about a millisecond of work the end stamp does not wait for
        out = 2 * x
    return out
