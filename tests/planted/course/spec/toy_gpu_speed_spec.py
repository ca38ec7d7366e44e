"""A speed test of the toy exercise on the (fake) GPU clock."""

import pytest
import torch


@pytest.fixture
def toy(impl):
    return impl("toy")


@pytest.mark.speed
def test_scale_speed(toy, speed):
    def setup():
        return (torch.randn(64),), {}

    def check(out, x):
        torch.testing.assert_close(out, 2 * x)

    baseline = speed.time(lambda x: x * 2, setup, rounds=5, warmup=1)
    timing = speed.bench(toy.scale, setup, rounds=5, warmup=1, check=check)
    speed.judge("scale_speedup", baseline.median / timing.median)
