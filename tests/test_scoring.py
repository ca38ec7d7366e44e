"""What a failure's message keeps when it is long, and what the score table says was not graded."""

from grader.scoring import MESSAGE_LIMIT, clip, not_graded_lines


def test_a_long_failure_keeps_its_assertion_at_the_end():
    message = "traceback line\n" * 1000 + "E   AssertionError: expected 4 cached tokens, got 8"
    clipped = clip(message)
    assert len(clipped) <= MESSAGE_LIMIT + 100 and clipped.endswith("expected 4 cached tokens, got 8")
    assert clip("short") == "short"


def test_skips_are_counted_by_reason():
    lines = not_graded_lines(["skipped: speed not graded on this hardware: no CUDA GPU"] * 2 + ["skipped: other"])
    assert lines[0] == "not graded here: 2 tests (speed not graded on this hardware: no CUDA GPU)"
    assert lines[1] == "not graded here: 1 test (other)" and "CUDA GPU" in lines[2]
