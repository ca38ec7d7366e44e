"""The course-facing outputs: Gradescope's run (only the student's modules are taken from a submission), the zip
for Gradescope, GitHub Classroom's workflow in the student repo, and the points gate it uses."""

import json
import shutil
import stat
import zipfile
from pathlib import Path

import pytest

from grader import gradescope, points
from grader.student_repo import write_student_repo

ROOT = Path(__file__).resolve().parent.parent
PLANTED = ROOT / "tests" / "planted"


def results_file(tmp_path: Path) -> Path:
    tests = [
        {"name": "01 a", "score": 2.0, "max_score": 2.0, "tags": ["01"]},
        {"name": "01 b", "score": 0.0, "max_score": 1.0, "tags": ["01"]},
        {"name": "02 c", "score": 3.0, "max_score": 3.0, "tags": ["02"]},
        {"name": "02 speed", "score": 0.0, "max_score": 0.0, "tags": ["02", "speed"]},
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"score": 5.0, "tests": tests}))
    return path


def test_the_points_gate_passes_full_exercises_and_fractions(tmp_path, capsys):
    path = str(results_file(tmp_path))
    assert points.main([path, "02", "--full"]) == 0
    assert points.main([path, "01", "--full"]) == 1
    assert points.main([path, "--min", "0.8"]) == 0 and points.main([path, "--min", "0.9"]) == 1
    assert points.main([path]) == 0
    assert "total" in capsys.readouterr().out
    assert points.main([path, "07"]) == 2 and points.main([str(tmp_path / "missing.json")]) == 2


def test_only_the_students_modules_are_taken_from_a_submission(tmp_path):
    course = tmp_path / "source"
    write_student_repo(course)
    stub = (course / "exercises" / "02" / "block_manager.py").read_text()
    submission = tmp_path / "submission"
    (submission / "exercises" / "01").mkdir(parents=True)
    (submission / "exercises" / "01" / "kv_cache.py").write_text("# mine\n")
    (submission / "block_manager.py").write_text("# an upload, not in a folder\n")
    (submission / "conftest.py").write_text("import os\nos._exit(0)\n")
    (submission / "grader").mkdir()
    (submission / "grader" / "plugin.py").write_text("# a grader that passes everything\n")
    (submission / "exercises" / "01" / "test_kv_cache.py").write_text("def test_nothing():\n    pass\n")
    lines = gradescope.copy_submission(submission, course)
    assert (course / "exercises" / "01" / "kv_cache.py").read_text() == "# mine\n"
    assert (course / "exercises" / "02" / "block_manager.py").read_text() == "# an upload, not in a folder\n" != stub
    assert "test_nothing" not in (course / "exercises" / "01" / "test_kv_cache.py").read_text()
    assert not (course / "grader" / "plugin.py").read_text().startswith("# a grader")
    assert "os._exit" not in (course / "conftest.py").read_text()
    assert "exercise 01: kv_cache.py from exercises/01/kv_cache.py" in lines
    assert any("awq.py not found in the submission (graded as the stub)" in line for line in lines)


def test_the_seed_secret_is_the_instructors_mixed_with_the_submission(tmp_path):
    assert gradescope.seed_secret(tmp_path, tmp_path / "meta.json") is None
    (tmp_path / "seed_secret.txt").write_text("hunter2\n")
    (tmp_path / "meta.json").write_text(json.dumps({"id": 123456}))
    assert gradescope.seed_secret(tmp_path, tmp_path / "meta.json") == "hunter2:123456"


def test_a_gradescope_run_grades_the_submission_with_the_courses_tests(tmp_path, monkeypatch):
    """End to end on the planted toy course: a correct module, next to a conftest.py that would fake the grade."""
    autograder = tmp_path / "autograder"
    source = autograder / "source"
    (source / "exercises" / "10").mkdir(parents=True)
    shutil.copy(PLANTED / "course" / "conftest_course.py", source / "conftest.py")
    shutil.copy(PLANTED / "course" / "fake_gpu.py", source / "fake_gpu.py")
    shutil.copy(PLANTED / "course" / "spec" / "toy_spec.py", source / "exercises" / "10" / "test_toy.py")
    (source / "exercises" / "10" / "toy.py").write_text("def double(x):\n    raise NotImplementedError('double')\n")
    (source / "seed_secret.txt").write_text("s3cret")
    submission = autograder / "submission"
    submission.mkdir()
    shutil.copy(PLANTED / "submissions" / "10" / "toy.py", submission / "toy.py")
    (submission / "conftest.py").write_text("import pytest\n\n@pytest.fixture\ndef toy():\n    return None\n")
    (autograder / "submission_metadata.json").write_text(json.dumps({"id": 7}))
    monkeypatch.delenv("INFERLAB_SEED_SECRET", raising=False)
    assert gradescope.main(["--autograder", str(autograder)]) == 0
    results = json.loads((autograder / "results" / "results.json").read_text())
    assert results["score"] == 6.0 == sum(t["max_score"] for t in results["tests"]), results["output"]
    assert (autograder / "results" / "results.md").is_file()
    import os

    assert os.environ.pop("INFERLAB_SEED_SECRET") == "s3cret:7"


def test_the_gradescope_zip_has_the_scripts_on_top_and_no_solutions(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("autograder_build", ROOT / "autograder" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    secret = tmp_path / "secret.txt"
    secret.write_text("course secret\n")
    archive = tmp_path / "autograder.zip"
    build.build(archive, secret)
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
        modes = {name: z.getinfo(name).external_attr >> 16 for name in ("setup.sh", "run_autograder")}
        assert z.read("seed_secret.txt") == b"course secret\n"
    assert {"setup.sh", "run_autograder", "grader/gradescope.py", "exercises/02/block_manager.py"} <= names
    assert all(mode & stat.S_IXUSR for mode in modes.values())
    assert not any(n.startswith(("solutions/", "tests/")) for n in names)


def test_the_student_repo_carries_the_classroom_workflow(tmp_path):
    repo = tmp_path / "repo"
    write_student_repo(repo)
    workflow = (repo / ".github" / "workflows" / "classroom.yml").read_text()
    assert "python -m grader --results results.json" in workflow
    for exercise in sorted(p.name for p in (ROOT / "exercises").glob("[0-9][0-9]")):  # every exercise
        assert f"python -m grader.points results.json {exercise} --full" in workflow
    assert "GITHUB_STEP_SUMMARY" in workflow


@pytest.mark.parametrize("script", ["setup.sh", "run_autograder"])
def test_the_gradescope_scripts_are_executable_bash(script):
    path = ROOT / "autograder" / script
    assert path.read_text().startswith("#!/usr/bin/env bash") and path.stat().st_mode & stat.S_IXUSR
