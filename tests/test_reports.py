"""What `python -m grader` writes beside results.json, and how it words what went wrong."""

import xml.etree.ElementTree as ET

import pytest

from grader import failures, reports, roofline
from grader.child import where_it_hung
from grader.sandbox import Manifest
from grader.scoring import Scoreboard, SpeedResult
from grader.scoring import TestResult as Result
from grader.thresholds import Threshold


def scoreboard() -> Scoreboard:
    scores = Scoreboard("solution")
    passed = Result("exercises/03/test_awq.py::test_a", "03", "test_a", 2.0, outcome="passed", message="",
                        path="exercises/03/test_awq.py", duration=1.5)  # fmt: skip
    fraction = Threshold("dequant_roofline", "fraction of copy bandwidth", "at_least", 0.6, "03/thresholds.toml")
    speedup = Threshold("gemv_speedup", "speedup over dequantize + matmul", "at_least", 3.0, "03/thresholds.toml")
    passed.speed = [SpeedResult(fraction, 0.8, True, 0.8, "", 3.2e12, 4.0e12, "GPU NVIDIA H200"),
                    SpeedResult(speedup, 2.5, False, None, "", None, None, "GPU NVIDIA H200")]  # fmt: skip
    failed = Result("exercises/03/test_awq.py::test_b", "03", "test_b", 1.0, outcome="failed",
                        message="E   AssertionError: wrong nibble order", path="exercises/03/test_awq.py")  # fmt: skip
    hidden = Result("exercises/03/test_awq.py::test_h", "03", "test_h", 1.0, outcome="failed",
                        message="secret detail", visibility="hidden")  # fmt: skip
    skipped = Result("exercises/01/t.py::test_s", "01", "test_s", 1.0, outcome="skipped",
                         message="skipped: speed not graded on this hardware: no CUDA GPU")  # fmt: skip
    for test in (passed, failed, hidden, skipped):
        scores.add(test)
    return scores


def test_a_result_survives_its_trip_through_the_channel():
    test = scoreboard().tests["exercises/03/test_awq.py::test_a"]
    assert Result.from_record(test.to_record()) == test


def test_the_report_has_scores_speed_ratios_events_and_failures_but_no_hidden_message():
    text = reports.markdown(scoreboard(), 12.0, ["03 test_x: timed out after 60 s"], {"exercises": ["01", "03"]},
                            None, "matplotlib is not installed")  # fmt: skip
    assert "| 03 | 2 / 4 | 1 | 2 | 0 |" in text and "| **total** | **2 / 4** |" in text
    assert "| 03 | test_a | fraction of copy bandwidth | 0.8 | ≥ 0.6 | 80% | pass |" in text
    assert "| 03 | test_a | speedup over dequantize + matmul | 2.5 | ≥ 3 | - | FAIL |" in text
    assert "No roofline chart: matplotlib is not installed." in text and "- 03 test_x: timed out" in text
    assert "wrong nibble order" in text and "secret detail" not in text and "(a hidden test" in text
    assert "Not graded here: 1 test (speed not graded on this hardware: no CUDA GPU)." in text


def test_junit_has_one_suite_per_exercise_and_the_points():
    root = ET.fromstring(reports.junit_xml(scoreboard(), 3.0).split("\n", 1)[1])
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert set(suites) == {"exercise 03", "exercise 01"}
    assert suites["exercise 03"].get("tests") == "3" and suites["exercise 03"].get("failures") == "2"
    case = suites["exercise 03"].find("testcase[@name='test_b']")
    assert case.get("classname") == "exercises.03.test_awq" and "wrong nibble order" in case.find("failure").text
    assert suites["exercise 03"].find("testcase[@name='test_h']").find("failure").text == "(a hidden test)"
    assert suites["exercise 01"].find("testcase/skipped") is not None
    points = {p.get("name"): p.get("value") for p in suites["exercise 03"].find("testcase/properties")}
    assert points == {"points": "2", "score": "2", "max_score": "2"}


def test_the_roofline_chart_draws_each_roofline_judged_kernel(tmp_path):
    pytest.importorskip("matplotlib")
    expected = dict(label="03 dequant_roofline", bytes_per_s=3.2e12, copy_bandwidth=4.0e12, threshold=0.6, passed=True)
    assert roofline.measurements(scoreboard()) == {"GPU NVIDIA H200": [expected]}
    chart = tmp_path / "r-roofline.png"
    assert roofline.write_chart(chart, scoreboard()) is None and chart.read_bytes()[:4] == b"\x89PNG"
    assert "no roofline-judged" in roofline.write_chart(chart, Scoreboard("student"))


def test_outputs_sit_beside_results_json(tmp_path):
    outputs = reports.Outputs.beside(str(tmp_path / "results.json"), None)
    assert (outputs.report.name, outputs.chart.name, outputs.junit) == ("results.md", "results-roofline.png", None)


def test_where_a_hung_test_was_stopped_comes_from_the_traceback_dump(tmp_path):
    student = tmp_path / "solutions" / "01" / "kv_cache.py"
    dump = (
        "Timeout (0:00:03)!\nThread 0x01 (most recent call first):\n  File \"/x/threading.py\", line 3 in wait\n"
        f"Current thread 0x02 (most recent call first):\n  File \"{student}\", line 12 in kv_cache_bytes\n"
        f"  File \"{tmp_path / 'exercises/01/test_kv.py'}\", line 40 in test_bytes\n"
    )  # fmt: skip
    assert where_it_hung(dump, [tmp_path / "solutions", tmp_path]) == "kv_cache.py:12 in kv_cache_bytes()"
    assert where_it_hung("", [tmp_path]) is None


@pytest.mark.parametrize(
    "code, words",
    [(-11, "SIGSEGV (a segmentation fault"), (-9, "out-of-memory killer"), (-6, "SIGABRT"), (3, "exited with code 3")],
)
def test_a_crash_is_described_in_words(code, words):
    message = failures.crash_message(code, importing="01/kv_cache" if code == 3 else None)
    assert words in message and "Only this test is charged" in message
    assert ("while importing 01/kv_cache.py" in message) == (code == 3)


def test_memory_and_cuda_failures_are_recognised():
    assert failures.out_of_memory(MemoryError()) == "host"
    assert failures.out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) == "GPU"
    assert failures.out_of_memory(ValueError("no blocks left: out of memory in the pool")) is None
    assert failures.poisons_cuda("RuntimeError: CUDA error: an illegal memory access was encountered")
    assert not failures.poisons_cuda("RuntimeError: CUDA error: invalid argument")


def test_the_manifest_sees_written_added_and_removed_files(tmp_path):
    (tmp_path / "grader").mkdir()
    (tmp_path / "grader" / "plugin.py").write_text("a")
    (tmp_path / "README.md").write_text("r")
    manifest = Manifest(tmp_path, [tmp_path / "grader"], [tmp_path])
    (tmp_path / "README.md").write_text("edited by a person: not loaded by tests")
    assert manifest.changes() == []
    (tmp_path / "grader" / "plugin.py").write_text("b")
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = -p evil\n")
    assert manifest.changes() == ["grader/plugin.py (written)", "pytest.ini (added)"]
