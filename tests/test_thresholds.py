"""Speed thresholds resolve per implementation and per GPU, from a file instructors edit."""

import pytest

from grader.thresholds import ThresholdError, resolve

TABLE = """
[speedup]
what = "speedup over recompute"
student = 2.0
solution = 5.0
[speedup.gpu."H100"]
student = 2.5
[speedup.gpu."H100 80GB"]
student = 3.0
[speedup.gpu."T4"]
solution = 1.5

[late_over_early]
compare = "at_most"
student = 1.3
solution = 1.2
"""


@pytest.fixture
def path(tmp_path):
    file = tmp_path / "thresholds.toml"
    file.write_text(TABLE)
    return file


def test_student_and_solution_values(path):
    assert resolve(path, "speedup", "student", None).value == 2.0
    assert resolve(path, "speedup", "solution", "NVIDIA H200").value == 5.0


def test_gpu_override_matches_part_of_the_name_and_the_longest_key_wins(path):
    assert resolve(path, "speedup", "student", "NVIDIA H100 PCIe").value == 2.5
    assert resolve(path, "speedup", "student", "NVIDIA H100 80GB HBM3").value == 3.0
    assert resolve(path, "speedup", "student", "Tesla T4").value == 2.0, "T4 overrides only the solution value"
    assert resolve(path, "speedup", "solution", "Tesla T4").value == 1.5


def test_at_least_and_at_most(path):
    at_least = resolve(path, "speedup", "student", None)
    assert at_least.passes(2.0) and not at_least.passes(1.99)
    at_most = resolve(path, "late_over_early", "student", None)
    assert at_most.passes(1.3) and not at_most.passes(1.31)
    assert at_most.symbol == "≤"


def test_unknown_name_lists_the_known_ones(path):
    with pytest.raises(ThresholdError, match="late_over_early, speedup"):
        resolve(path, "speed_up", "student", None)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ThresholdError, match="no thresholds file"):
        resolve(tmp_path / "thresholds.toml", "speedup", "student", None)
