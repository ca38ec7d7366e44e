"""A speed test of the toy exercise on the host clock."""

import pytest


@pytest.fixture
def toy(impl):
    return impl("toy")


def test_host_speed(toy, host_speed):
    timings = host_speed.compare({"double": (toy.double, lambda: ((3,), {})),
                                  "triple": (toy.triple, lambda: ((3,), {}))}, rounds=5, warmup=1)  # fmt: skip
    host_speed.judge("triple_over_double", timings["triple"].median / timings["double"].median)
