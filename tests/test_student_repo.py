"""The repo handed to students grades their stubs at zero and a finished exercise at full marks, without solutions."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grader.student_repo import main, write_student_repo

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def student_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("course") / "repo"
    write_student_repo(repo)
    return repo


def grade(repo: Path, exercise: str) -> dict:
    results = repo / f"results-{exercise}.json"
    subprocess.run([sys.executable, "-m", "grader", exercise, f"--results={results}"], cwd=repo,
                   capture_output=True, text=True, timeout=600, check=True)  # fmt: skip
    return json.loads(results.read_text())


def test_the_student_repo_has_no_solutions_no_self_tests_and_no_history(student_repo):
    assert not (student_repo / "solutions").exists() and not (student_repo / "tests").exists()
    assert not (student_repo / ".git").exists() and not (student_repo / ".ci").exists()
    assert (student_repo / "exercises" / "02" / "block_manager.py").read_text() == (
        ROOT / "exercises" / "02" / "block_manager.py"
    ).read_text(), "the student gets the stub"


def test_the_stubs_score_zero_and_a_finished_exercise_full_marks(student_repo):
    stubs = grade(student_repo, "02")
    assert stubs["score"] == 0 and len(stubs["tests"]) >= 10
    shutil.copy(ROOT / "solutions" / "02" / "block_manager.py", student_repo / "exercises" / "02")
    finished = grade(student_repo, "02")
    possible = sum(t["max_score"] for t in finished["tests"])
    assert possible > 0 and finished["score"] == possible, (
        f"a finished exercise 02 scored {finished['score']} / {possible} in the student repo: "
        + "; ".join(t["name"] for t in finished["tests"] if t["score"] < t["max_score"])
    )


def test_it_refuses_to_write_over_a_folder_in_use(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main([str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
