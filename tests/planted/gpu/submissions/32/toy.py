"""triple launches a kernel that stores far outside its buffer: a CUDA illegal memory access."""

from pathlib import Path

import torch
import triton
import triton.language as tl

exec((Path(__file__).resolve().parents[1] / "30" / "toy.py").read_text())  # the correct module; then the fault


@triton.jit
def _store_out_of_bounds(ptr):
    tl.store(ptr + (1 << 40), 1.0)


def triple(x):
    buffer = torch.empty(1, device="cuda")
    _store_out_of_bounds[(1,)](buffer)
    torch.cuda.synchronize()
    return 3 * x
