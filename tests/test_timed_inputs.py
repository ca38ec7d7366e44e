"""What the code under test gets and may do in a GPU speed test: fresh inputs, inputs left as they were, no work left
running on another stream, every output checked. (On a fake GPU, end to end: tests/test_planted.py, 22 and 23.)"""

import pytest
import torch

from grader.speed import Speed
from grader.timed_inputs import InputsReused, TimedInputs
from grader.timing import STRAY_FLOOR, stray_work_message


def test_fresh_inputs_every_call_pass_and_a_reused_pool_is_fine():
    pool = torch.randn(64)
    inputs = TimedInputs(lambda: ((torch.randn(4), pool), {}))
    for _ in range(3):
        args, _ = inputs()
        inputs.verify()
    assert args[1] is pool


def test_a_setup_that_hands_back_only_old_buffers_is_a_mistake_in_the_test():
    x = torch.randn(4)
    inputs = TimedInputs(lambda: ((x,), {}))
    inputs()
    with pytest.raises(InputsReused, match="only buffers it had already been given"):
        inputs()


def test_a_function_that_writes_into_its_input_fails():
    pool = torch.randn(8)
    inputs = TimedInputs(lambda: ((torch.randn(2), pool), {}))
    inputs()
    inputs.verify()
    (x, p), _ = inputs()
    p[0] += 1  # e.g. a layout converted in place during a warm-up call
    with pytest.raises(AssertionError, match=r"wrote into its input \(argument 1, \[8\] torch.float32\)"):
        inputs.verify()


def test_inputs_written_by_design_are_named_and_not_checked():
    inputs = TimedInputs(lambda: ((torch.randn(2), torch.zeros(3)), {}), inputs_written=(1,))
    (_, out), _ = inputs()
    out += 1
    inputs.verify()


def test_nan_inputs_compare_by_their_bits():
    inputs = TimedInputs(lambda: ((torch.full((3,), float("nan")),), {}))
    inputs()
    inputs.verify()


def test_work_left_on_another_stream_is_caught_and_honest_timings_are_not():
    honest = [(40e-6, 6e-6)] * 9 + [(40e-6, 80e-6)]  # one slow synchronize: the median ignores it
    assert stray_work_message(honest) is None
    assert stray_work_message([(1e-3, 30e-6)] * 5) is None  # a long kernel, a little jitter
    assert stray_work_message([(12.7e-6, 36.8e-6)] * 5) is None  # measured on an H200: driver work after many tests
    sneaky = [(3e-6, 150e-6)] * 10  # returns at once, and the device stays busy for the real work
    message = stray_work_message(sneaky)
    assert message and "work was left running on another CUDA stream" in message and "wait_stream" in message
    assert stray_work_message([(0.0, STRAY_FLOOR)]) is None


def test_bench_needs_a_check():
    with pytest.raises(TypeError, match="every timed output is re-checked"):
        Speed.bench(object(), lambda x: x, lambda: ((torch.ones(1),), {}))
