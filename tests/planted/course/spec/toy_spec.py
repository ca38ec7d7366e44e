"""A toy exercise for the grader's own tests: each planted submission (tests/planted/submissions/NN/toy.py) breaks
it in one way, and tests/test_planted.py checks the grade it gets."""

import pytest
import torch


@pytest.fixture
def toy(impl):
    return impl("toy")


@pytest.mark.points(2)
def test_double(toy):
    assert toy.double(2) == 4


def test_double_negative(toy):
    assert toy.double(-3) == -6


def test_triple(toy):
    assert toy.triple(2) == 6


def test_scale(toy):
    x = torch.randn(5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(toy.scale(x), 2 * x)


def test_total(toy):
    assert toy.total(torch.arange(4.0)) == 6.0
