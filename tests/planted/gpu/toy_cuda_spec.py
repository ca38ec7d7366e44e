"""A toy exercise on a real GPU, for the grader's own tests (tests/test_planted_gpu.py): each planted submission in
tests/planted/gpu/submissions breaks it in one way that only a GPU shows."""

import pytest
import torch


@pytest.fixture
def toy(impl):
    return impl("toy")


def test_double(toy):
    assert toy.double(2) == 4


def test_triple(toy):
    assert toy.triple(2) == 6


def test_total(toy):
    assert toy.total(torch.arange(4.0, device="cuda")) == 6.0


def test_after(toy):
    assert toy.double(3) == 6


@pytest.mark.speed
def test_scale_speed(toy, speed):
    n = 1 << 24

    def setup():
        return (torch.randn(n, device="cuda"),), {}

    def check(out, x):
        torch.testing.assert_close(out, 2 * x)

    timing = speed.bench(toy.scale, setup, rounds=10, warmup=2, check=check)
    fraction = speed.bandwidth_fraction(timing, 2 * n * 4)
    speed.judge("scale_roofline", fraction, roofline=fraction)
