"""Planted faults that only a GPU shows, graded end to end by `python -m grader` (skipped without CUDA): work left
running on a side stream, a CUDA illegal memory access (it breaks the process's CUDA context), the GPU's memory
exhausted; and the report's roofline chart (or why there is none) on the run's speed-graded kernel."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from grader import cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PLANTED = Path(__file__).resolve().parent / "planted" / "gpu"
EXPECTED = {  # exercise: (score, maximum, {test: phrase its output must contain})
    "30": (5, 5, {}),
    "31": (4, 5, {"test_scale_speed": "work was left running on another CUDA stream"}),
    "32": (4, 5, {"test_triple": "illegal memory access"}),
    "33": (4, 5, {"test_total": "ran out of GPU memory"}),
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted-gpu") / "course"
    root.mkdir()
    shutil.copy(PLANTED / "conftest_course.py", root / "conftest.py")
    for exercise in EXPECTED:
        folder = root / "exercises" / exercise
        folder.mkdir(parents=True)
        shutil.copy(PLANTED / "thresholds.toml", folder)
        shutil.copy(PLANTED / "toy_cuda_spec.py", folder / f"test_toy_cuda_{exercise}.py")
    results = root.parent / "out" / "results.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "ROOT", root)
        code = cli.main([*EXPECTED, "--impl", "solution", "--solutions", str(PLANTED / "submissions"),
                         "--results", str(results), "--test-timeout", "120"])  # fmt: skip
    return code, json.loads(results.read_text()), results


@pytest.mark.parametrize("exercise", EXPECTED)
def test_each_gpu_fault_costs_exactly_what_it_should(graded, exercise):
    _, results, _ = graded
    earned, possible, phrases = EXPECTED[exercise]
    tests = [t for t in results["tests"] if t["tags"][0] == exercise]
    got = (sum(t["score"] for t in tests), sum(t["max_score"] for t in tests))
    detail = "; ".join(f"{t['name']}: {t['score']:g}/{t['max_score']:g} {t['output'][:200]!r}" for t in tests)
    assert got == (earned, possible), f"exercise {exercise}: expected {earned} / {possible}, got {got}: {detail}"
    outputs = {t["name"].split(" ", 1)[1]: t["output"] for t in tests}
    for name, phrase in phrases.items():
        assert phrase in outputs[name], f"exercise {exercise} {name}: {phrase!r} not in {outputs[name]!r}"


def test_the_broken_context_costs_one_test_and_the_report_draws_the_roofline(graded):
    code, results, path = graded
    assert code == 0
    assert "exercise 32: 2 test(s) run again in a fresh process (after a broken CUDA context)" in results["output"]
    report = path.with_suffix(".md").read_text()
    assert "| 30 | test_scale_speed | fraction of the copy bandwidth that 2 * x reaches |" in report
    chart = path.with_name("results-roofline.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "No roofline chart: matplotlib is not installed" in report
    else:
        assert chart.read_bytes()[:4] == b"\x89PNG" and "![roofline](results-roofline.png)" in report
