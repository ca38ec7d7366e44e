"""The GPU clock measures GPU time: it needs a GPU, so on CPU machines these are skipped."""

import pytest

from grader.timing import L2Flusher, time_calls

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu


def test_event_clock_sees_gpu_work_not_the_launch():
    """torch.cuda._sleep spins the GPU for a number of cycles: twice the cycles must time about twice as long."""
    setup = lambda: ((), {})  # noqa: E731
    flush = L2Flusher()
    short = time_calls(lambda: torch.cuda._sleep(1_000_000), setup, flush, rounds=10, warmup=2).median
    long = time_calls(lambda: torch.cuda._sleep(2_000_000), setup, flush, rounds=10, warmup=2).median
    assert short > 100e-6, f"a million-cycle spin took {short * 1e6:.0f} us: the clock timed the launch, not the kernel"
    assert 1.8 < long / short < 2.2, f"twice the cycles took {long / short:.2f}x the time"


def test_check_sees_every_timed_result():
    seen = []
    time_calls(lambda x: x * 2, lambda: ((torch.ones(4, device="cuda"),), {}), lambda: None, rounds=5, warmup=2,
               check=lambda out, x: seen.append(bool(torch.equal(out, x * 2))))  # fmt: skip
    assert seen == [True] * 7
