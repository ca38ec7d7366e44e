"""Planted faulty submissions, graded end to end by `python -m grader`: every run ends within its limit, the results
files are valid, each exercise scores exactly what its fault should cost, and no forged score survives.

The planted course (tests/planted/course) is a toy exercise copied under many exercise numbers, with a fake GPU so
that speed tests run here too; each number gets one submission from tests/planted/submissions (or, for the syntax
error, one written here). One `python -m grader` run grades them all, in parallel, with a secret seed and 2 s of
CPU time per test.
"""

import json
import resource
import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from grader import cli

PLANTED = Path(__file__).resolve().parent / "planted"
LIMIT = 2  # seconds per test

# exercise: (spec files, expected score, expected maximum, {test name: phrases its output must contain})
EXPECTED = {
    "10": ("toy gpu host", 8, 8, {}),
    "11": ("toy", 0, 6, {"test_double": [f"timed out after {LIMIT} s", "toy.py:"],
                         "test_triple": [f"did not finish within {LIMIT} s"]}),
    "12": ("toy", 5, 6, {"test_triple": [f"timed out after {LIMIT} s", "stopped in toy.py:", "in triple()"]}),
    "13": ("toy", 5, 6, {"test_triple": [f"timed out after {LIMIT} s", "in triple()"]}),
    "14": ("toy", 5, 6, {"test_scale": ["SIGSEGV", "segmentation fault"]}),
    "15": ("toy", 0, 6, {"test_double": ["could not import", "SystemExit: 3"]}),
    "16": ("toy", 0, 6, {"test_total": ["could not import", "SyntaxError"]}),
    "17": ("toy", 4, 6, {"test_triple": ["SIGKILL", "out-of-memory killer"], "test_total": ["ran out of host memory"]}),
    "18": ("toy", 0, 6, {"test_double": ["assert 0 == 4"]}),
    "19": ("toy", 0, 6, {"test_double": ["not graded", "results channel received"], "test_total": ["not graded"]}),
    "20": ("toy", 3, 6, {"test_double": ["grading helpers were modified", "torch.testing.assert_close"],
                         "test_scale": ["Tensor-likes are not close"]}),
    "21": ("toy host", 4, 7, {"test_double": ["grading helpers were modified", "time.perf_counter"],
                              "test_host_speed": ["grading helpers were modified"]}),
    "22": ("toy gpu", 6, 7, {"test_scale_speed": ["Tensor-likes are not close"]}),
    "23": ("toy gpu", 6, 7, {"test_scale_speed": ["work was left running on another CUDA stream"]}),
    "24": ("toy", 5, 6, {"test_triple": ["illegal memory access", "fresh process"]}),
    "26": ("toy", 5, 6, {"test_scale": ["Tensor-likes are not close"]}),
}  # fmt: skip
SPECS = {"toy": "toy_spec.py", "gpu": "toy_gpu_speed_spec.py", "host": "toy_host_speed_spec.py"}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted") / "course"
    (root / "exercises").mkdir(parents=True)
    shutil.copy(PLANTED / "course" / "conftest_course.py", root / "conftest.py")
    shutil.copy(PLANTED / "course" / "fake_gpu.py", root / "fake_gpu.py")
    for exercise, (specs, *_) in EXPECTED.items():
        folder = root / "exercises" / exercise
        folder.mkdir()
        shutil.copy(PLANTED / "course" / "spec" / "thresholds.toml", folder)
        for spec in specs.split():
            name = SPECS[spec].removesuffix("_spec.py")
            shutil.copy(PLANTED / "course" / "spec" / SPECS[spec], folder / f"test_{name}_{exercise}.py")
    submissions = root.parent / "submissions"
    shutil.copytree(PLANTED / "submissions", submissions)
    (submissions / "16").mkdir()
    (submissions / "16" / "toy.py").write_text("def double(x)\n    return 2 * x\n")  # kept out of the repo: ruff
    results, junit, forge = root.parent / "out" / "results.json", root.parent / "out" / "junit.xml", root.parent / "f"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "ROOT", root)
        patch.setenv("PLANTED_FORGE_PATH", str(forge))
        patch.setenv("PLANTED_RESULTS_PATH", str(results))
        began, cpu_before = time.monotonic(), _children_cpu()
        code = cli.main([*EXPECTED, "--impl", "solution", "--solutions", str(submissions), "--results", str(results),
                         "--junitxml", str(junit), "--test-timeout", str(LIMIT), "--jobs", "2",
                         "--seed-secret", "planted", "--", "-p", "no:hypothesispytest"])  # fmt: skip
        elapsed, cpu = time.monotonic() - began, _children_cpu() - cpu_before
    return dict(code=code, elapsed=elapsed, cpu=cpu, results=json.loads(results.read_text()),
                report=results.with_suffix(".md"), junit=ET.parse(junit), forge=forge)  # fmt: skip


def _children_cpu() -> float:
    """CPU seconds of this process's finished children: what the planted run cost, whatever else the machine does."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def by_exercise(results: dict) -> dict[str, list[dict]]:
    tests: dict[str, list[dict]] = {}
    for test in results["tests"]:
        tests.setdefault(test["tags"][0], []).append(test)
    return tests


@pytest.mark.parametrize("exercise", EXPECTED)
def test_each_fault_costs_exactly_what_it_should(graded, exercise):
    _, earned, possible, phrases = EXPECTED[exercise]
    tests = by_exercise(graded["results"])[exercise]
    got = (sum(t["score"] for t in tests), sum(t["max_score"] for t in tests))
    detail = "; ".join(f"{t['name']}: {t['score']:g}/{t['max_score']:g} {t['output'][:160]!r}" for t in tests)
    assert got == (earned, possible), f"exercise {exercise}: expected {earned} / {possible}, got {got}: {detail}"
    outputs = {t["name"].split(" ", 1)[1]: t["output"] for t in tests}
    for name, needed in phrases.items():
        for phrase in needed:
            assert phrase in outputs[name], f"exercise {exercise} {name}: {phrase!r} not in {outputs[name]!r}"


def test_the_run_ends_in_time_and_its_files_are_valid(graded):
    assert graded["code"] == 0
    results = graded["results"]
    assert results["score"] == sum(t["score"] for t in results["tests"]) == sum(e[1] for e in EXPECTED.values())
    assert {"score", "execution_time", "output", "tests"} <= results.keys()
    # In CPU time, so that a busy machine (which stretches the wall clock) cannot fail it: on an idle 2-core machine the
    # run takes about 60 s of wall time and 90 s of CPU; a grader that waits out full limits or restarts too often
    # would spend far more.
    assert graded["cpu"] < 300, f"the planted run's processes used {graded['cpu']:.0f} s of CPU time"
    suites = graded["junit"].getroot().findall("testsuite")
    assert [s.get("name") for s in suites] == [f"exercise {e}" for e in EXPECTED]
    failures = sum(int(s.get("failures")) for s in suites)
    assert failures == sum(t["score"] < t["max_score"] for t in results["tests"])
    report = graded["report"].read_text()
    assert "## Score" in report and "| 13 | 5 / 6 |" in report and "## What happened" in report


def test_no_forged_score_survives(graded):
    """The atexit hook's records are rejected, and its detached helper is killed before the results exist."""
    time.sleep(3)  # a surviving helper would write within 50 ms of seeing the results file
    assert not graded["forge"].exists(), "a helper forked by the submission outlived its test process"
    output = graded["results"]["output"]
    assert "rejected" in output and "after the test process had finished" in output


def test_re_runs_and_hangs_are_reported_in_the_summary(graded):
    output = graded["results"]["output"]
    assert "exercise 13: 2 test(s) run again in a fresh process" in output
    assert "exercise 24: 2 test(s) run again in a fresh process (after a broken CUDA context)" in output


def test_exercise_01_forgeries_from_the_issue_score_what_the_code_earns(tmp_path, monkeypatch):
    """The reference with halved logits, a no-op assert_close and an atexit forger (tests/planted/ex01): the grade
    is what the code earns, on a few of exercise 01's real tests. Exercise 01 runs in the sandbox
    (grader/isolation.py): the replaced assert_close and the atexit hook act there, where nothing grades."""
    root = tmp_path / "course"
    (root / "exercises").mkdir(parents=True)
    shutil.copytree(cli.GRADER_HOME / "exercises" / "01", root / "exercises" / "01")
    for name in ("conftest.py", "pyproject.toml"):
        shutil.copy(cli.GRADER_HOME / name, root / name)
    monkeypatch.setattr(cli, "ROOT", root)
    results = tmp_path / "results.json"
    assert cli.main(["01", "--impl", "solution", "--solutions", str(PLANTED / "ex01"), "--results", str(results),
                     "--", "-k", "bytes or prefill_logits"]) == 0  # fmt: skip
    data = json.loads(results.read_text())
    tests = {t["name"].split(" ", 1)[1]: t for t in data["tests"]}
    prefill = tests["test_prefill_logits_match_transformers"]
    assert prefill["score"] == 0 and "Tensor-likes are not close" in prefill["output"], prefill
    others = [t for t in data["tests"] if t is not prefill]
    assert len(others) >= 6 and all(t["score"] == t["max_score"] > 0 for t in others), others
    assert data["score"] == sum(t["max_score"] for t in others) < sum(t["max_score"] for t in data["tests"])
