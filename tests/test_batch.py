"""`python -m grader.batch`: a class graded on a local Ray cluster of 2 CPUs into one gradebook.

The planted submissions (tests/planted/batch, one folder per student: full marks, no module, a crash, a hang, a
forgery, a partial) are graded on the planted toy course (exercise 10: the toy tests and a speed test on the fake
GPU of tests/planted/course, 7 points, 2 s per test). Three runs of the real command, each with its own local Ray
cluster: the first grades all six, and the gradebook's numbers are what the single-submission grader gives each
(checked directly for one); the second, after files the grader never reads changed, grades none again; the third,
after one submission changed and an assassin (a submission that kills the Ray worker grading it) arrived, has the
changed submission's worker killed in mid-run by this test (it is retried and graded) and marks the assassin lost.
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from grader import batch

ROOT = Path(__file__).resolve().parent.parent
PLANTED = ROOT / "tests" / "planted"
LIMIT = 5  # seconds per test (the hang costs this long; 2 s is tight for a first test on a loaded machine)
SECRET = "planted batch"
PYTEST_ARGS = ["--", "-p", "no:hypothesispytest"]

CONTROL = PLANTED / "submissions" / "10" / "toy.py"  # the correct toy module: full marks

# student: (points of 7, phrases that its results.json outputs or its grader.log must contain)
EXPECTED = {
    "full": (7, ["toy.py from exercises/10/toy.py"]),
    "stubs": (0, ["toy.py not found in the submission (graded as the stub)", "not implemented yet"]),
    "crash": (5, ["SIGSEGV"]),
    "hang": (6, [f"timed out after {LIMIT} s", "in triple()"]),
    "forgery": (0, ["not graded", "results channel received"]),  # its "passed" records are not believed
    "partial": (3, ["toy.py from 10/toy.py", "assert 4 == 6"]),
}
RATIO = "10 scale_speedup"


def ray_installed() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


needs_ray = pytest.mark.skipif(not ray_installed(), reason="grading a class needs Ray (pip install ray)")


def batch_command(subs: Path, book: Path, course: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "grader.batch", str(subs), "--out", str(book), "--course", str(course),
            "--num-cpus", "2", "--secret-file", str(subs.parent / "secret.txt"), *extra,
            "--", "--test-timeout", str(LIMIT), *PYTEST_ARGS]  # fmt: skip


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "INFERLAB_"))}
    return {**env, "PYTHONPATH": str(ROOT)}


def run_batch(command: list[str], cwd: Path) -> dict:
    began = time.monotonic()
    done = subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=600)
    return dict(code=done.returncode, output=done.stdout + done.stderr, elapsed=time.monotonic() - began)


def snapshot(book: Path) -> dict:
    """The gradebook as it is now (later runs change it)."""
    rows = {row["student"]: row for row in csv.DictReader((book / "gradebook.csv").open())}
    results = {s: json.loads((book / "submissions" / s / "results.json").read_text()) for s in rows
               if (book / "submissions" / s / "results.json").is_file()}  # fmt: skip
    logs = {s: (book / "submissions" / s / "grader.log").read_text(errors="replace") for s in rows
            if (book / "submissions" / s / "grader.log").is_file()}
    return dict(rows=rows, results=results, logs=logs, csv=(book / "gradebook.csv").read_bytes(),
                summary=(book / "summary.md").read_text(), chart=book / "summary.png")  # fmt: skip


@pytest.fixture(scope="module")
def course(tmp_path_factory) -> Path:
    """The planted toy course as exercise 10 (a stub toy.py for students to replace)."""
    root = tmp_path_factory.mktemp("batch") / "course"
    folder = root / "exercises" / "10"
    folder.mkdir(parents=True)
    shutil.copy(PLANTED / "course" / "conftest_course.py", root / "conftest.py")
    shutil.copy(PLANTED / "course" / "fake_gpu.py", root / "fake_gpu.py")
    for spec, name in (("toy_spec.py", "test_toy.py"), ("toy_gpu_speed_spec.py", "test_toy_gpu_speed.py"),
                       ("thresholds.toml", "thresholds.toml")):  # fmt: skip
        shutil.copy(PLANTED / "course" / "spec" / spec, folder / name)
    (folder / "toy.py").write_text('def double(x):\n    raise NotImplementedError("double")\n')
    return root


@pytest.fixture(scope="module")
def first(course) -> dict:
    subs = course.parent / "submissions"
    shutil.copytree(PLANTED / "batch", subs, ignore=shutil.ignore_patterns("assassin", "README.md"))
    (subs / "full" / "exercises" / "10").mkdir(parents=True)
    shutil.copy(CONTROL, subs / "full" / "exercises" / "10" / "toy.py")  # as a repository holds it
    (course.parent / "secret.txt").write_text(SECRET)
    book = course.parent / "gradebook"
    run = run_batch(batch_command(subs, book, course), course.parent)
    assert run["code"] == 0, run["output"]
    return {**run, **snapshot(book), "subs": subs, "book": book}


@needs_ray
@pytest.mark.parametrize("student", EXPECTED)
def test_each_submission_gets_the_grade_its_fault_earns(first, student):
    points, phrases = EXPECTED[student]
    row, results = first["rows"][student], first["results"][student]
    assert (row["status"], row["points"], row["max_points"], row["10"], row["10 max"]) == (
        "graded", f"{points}", "7", f"{points}", "7"), f"{student}: {row}\n{first['output']}"  # fmt: skip
    assert results["score"] == points == sum(t["score"] for t in results["tests"])  # the CSV is its results.json
    said = first["logs"][student] + "\n".join(t["output"] for t in results["tests"])
    for phrase in phrases:
        assert phrase in said, f"{student}: {phrase!r} not in its grader's output:\n{said[-3000:]}"
    ratios = {entry["name"]: entry["value"] for entry in results.get("leaderboard", [])}
    assert row[RATIO] == (f"{ratios[RATIO]:.4g}" if RATIO in ratios else ""), row
    assert (RATIO in ratios) == (student in ("full", "hang")), ratios  # only they ran the speed test to the end


@needs_ray
def test_the_gradebook_equals_the_single_submission_grader(first, course, tmp_path):
    """The single-submission command, run by hand on one submission with the same secret and id: the same grade."""
    autograder = tmp_path / "autograder"
    shutil.copytree(course, autograder / "source")
    shutil.copytree(first["subs"] / "partial", autograder / "submission")
    (autograder / "source" / "seed_secret.txt").write_text(SECRET)
    (autograder / "submission_metadata.json").write_text(json.dumps({"id": "partial"}))
    done = subprocess.run([sys.executable, "-m", "grader.gradescope", "--autograder", str(autograder), "--jobs", "1",
                           "--test-timeout", str(LIMIT), *PYTEST_ARGS], env=environment(), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    alone = json.loads((autograder / "results" / "results.json").read_text())
    graded = first["results"]["partial"]
    differ = [(a["name"], f"alone {a['score']:g} / {a['max_score']:g}: {a['output'][-600:]!r}",
               f"in the batch {b['score']:g} / {b['max_score']:g}: {b['output'][-600:]!r}")
              for a, b in zip(alone["tests"], graded["tests"], strict=False)
              if (a["name"], a["score"], a["max_score"]) != (b["name"], b["score"], b["max_score"])]  # fmt: skip
    assert len(alone["tests"]) == len(graded["tests"]) and not differ, differ


@needs_ray
def test_the_summary_shows_the_class(first):
    summary = first["summary"]
    assert "6 submissions: 6 graded, 0 whose grader ended without results" in summary
    assert "| 10 | 7 | 3.5 | 4 | 0 | 7 | 1 | 2 |" in summary, summary  # 7 0 5 6 0 3: mean, median, ..., full, zero
    assert "| 10 | scale_speedup | ≥ 0 | 2 |" in summary, summary  # the toy threshold; two submissions measured
    assert first["chart"].read_bytes().startswith(b"\x89PNG"), "summary.png is not a PNG"
    assert "![points and speed ratios](summary.png)" in summary


@pytest.fixture(scope="module")
def second(first, course) -> dict:
    """Files the grader does not take changed (a README added, notes edited): nothing to grade again."""
    (first["subs"] / "full" / "README.md").write_text("# my solutions\n")
    (first["subs"] / "stubs" / "notes.md").write_text("Still not started.\n")
    run = run_batch(batch_command(first["subs"], first["book"], course), course.parent)
    return {**run, **snapshot(first["book"])}


@needs_ray
def test_a_second_run_grades_none_of_them_again(first, second):
    assert second["code"] == 0, second["output"]
    assert "6 submissions: 0 to grade, 6 unchanged" in second["output"], second["output"]
    assert "Ray cluster" not in second["output"], "no cluster is started when nothing changed"
    assert second["csv"] == first["csv"], "the gradebook changed although no submission did"


def graders_of(student: str) -> list[int]:
    """Processes running `python -m grader.gradescope` for this student's submission (a batch task's scratch)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"grader.gradescope" in command and f"inferlab-batch-{student}-".encode() in command:
            found.append(int(entry.name))
    return found


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def third(second, first, course) -> dict:
    """partial becomes correct, the assassin arrives; this test kills the worker grading partial once it runs."""
    shutil.copy(CONTROL, first["subs"] / "partial" / "10" / "toy.py")
    shutil.copytree(PLANTED / "batch" / "assassin", first["subs"] / "assassin")
    killed: dict = {}

    def kill_the_worker_grading_partial():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            for pid in graders_of("partial"):
                worker = parent_of(pid)
                if b"ray::" in Path(f"/proc/{worker}/cmdline").read_bytes():
                    os.kill(worker, signal.SIGKILL)
                    killed.update(worker=worker, grader=pid)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_worker_grading_partial, daemon=True)
    killer.start()
    run = run_batch(batch_command(first["subs"], first["book"], course, "--retries", "1"), course.parent)
    killer.join(timeout=1)
    return {**run, **snapshot(first["book"]), "killed": killed}


@needs_ray
def test_a_killed_worker_is_retried_and_the_gradebook_is_complete(first, third):
    assert third["killed"], f"the grader of partial was never seen running:\n{third['output']}"
    assert "7 submissions: 2 to grade, 5 unchanged" in third["output"], third["output"]
    partial = third["rows"]["partial"]
    assert (partial["status"], partial["points"], partial["attempts"]) == ("graded", "7", "2"), partial
    assert "attempt 1 lost: WorkerCrashedError" in partial["note"], partial
    assert not alive(third["killed"]["grader"]), "the lost attempt's grader outlived its worker"
    for student in ("full", "stubs", "crash", "hang", "forgery"):  # not graded again: their rows are as they were
        assert third["rows"][student] == first["rows"][student]


@needs_ray
def test_a_submission_that_kills_every_worker_is_marked_lost_not_retried_forever(third):
    assert third["code"] == 1, third["output"]  # some submission has no grade
    assassin = third["rows"]["assassin"]
    assert (assassin["status"], assassin["points"], assassin["attempts"]) == ("lost", "0", "2"), assassin
    assert "never graded: every one of 2 attempts was lost" in assassin["note"], assassin
    assert "not graded: assassin" in third["output"]
    assert "| assassin | 0 | lost |" in third["summary"]


def test_bad_input_is_refused_with_the_reason(tmp_path, capsys):
    assert batch.main([str(tmp_path / "missing"), "--out", str(tmp_path / "book")]) == 2
    assert "is not a folder of submissions" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert batch.main([str(tmp_path / "empty"), "--out", str(tmp_path / "book")]) == 2
    assert "holds no submission folders" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        batch.main([str(tmp_path / "empty"), "--out", str(tmp_path / "book"), "--retries", "-1"])
    assert not (tmp_path / "book").exists()


def test_only_the_modules_the_grader_takes_are_sent_and_hashed(tmp_path):
    """A submission's key covers the files named as the course's modules, wherever they are, and nothing else."""
    student = tmp_path / "subs" / "ada"
    (student / "10").mkdir(parents=True)
    (student / "10" / "toy.py").write_text("def double(x):\n    return 2 * x\n")
    (student / "notes.md").write_text("notes\n")
    (student / "helper.py").write_text("x = 1\n")
    (student / ".git").mkdir()
    (student / ".git" / "toy.py").write_text("old\n")
    course = tmp_path / "course"
    (course / "exercises" / "10").mkdir(parents=True)
    (course / "exercises" / "10" / "toy.py").write_text("# the stub\n")
    [found] = batch.find_submissions(tmp_path / "subs", course)
    assert found.student == "ada" and found.files == {"10/toy.py": b"def double(x):\n    return 2 * x\n"}
    before = batch.content_hash(found.files)
    (student / "notes.md").write_text("changed\n")
    assert batch.content_hash(batch.find_submissions(tmp_path / "subs", course)[0].files) == before
    (student / "10" / "toy.py").write_text("def double(x):\n    return x + x\n")
    assert batch.content_hash(batch.find_submissions(tmp_path / "subs", course)[0].files) != before
