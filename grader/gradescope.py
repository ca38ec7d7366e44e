"""`python -m grader.gradescope`: grade one Gradescope submission (what autograder/run_autograder runs).

Gradescope unpacks the autograder zip into /autograder/source (the course as students got it, plus setup.sh and
run_autograder: see autograder/build.py) and the student's submission into /autograder/submission, and reads
/autograder/results/results.json afterwards. This command:

1. copies from the submission only the modules students write: for each stub `exercises/NN/<module>.py` of the
   course, the submission's `exercises/NN/<module>.py` (a repository), else `NN/<module>.py`, else a single file
   named `<module>.py` anywhere in it (an upload). Everything else the submission holds (its own tests, conftest.py,
   a modified grader, pytest.ini) is ignored: the grade comes from the course's tests and grader;
2. derives the seed secret from the instructor's secret (`seed_secret.txt` in the zip, never in the repo) and the
   submission's id, so that inputs are unknown in advance and differ between submissions, yet a regrade of the same
   submission sees the same ones;
3. runs `python -m grader` with the test processes as the unprivileged user `student` (setup.sh creates it), who
   can neither write the course, the packages or the results nor signal the grader, and writes results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import sys
from pathlib import Path

from . import cli

STUDENT_USER = "student"


def stub_modules(course: Path) -> dict[str, list[str]]:
    """{exercise: [module names]}: the files students complete, as the course's exercises hold them."""
    modules = {}
    for folder in sorted(p for p in (course / "exercises").iterdir() if p.name.isdigit()):
        files = sorted(folder.glob("*.py"))
        names = [p.stem for p in files if not p.name.startswith("test_") and p.name != "conftest.py"]
        if names:
            modules[folder.name] = names
    return modules


def find_submitted(submission: Path, exercise: str, module: str) -> Path | None:
    for candidate in (submission / "exercises" / exercise / f"{module}.py", submission / exercise / f"{module}.py"):
        if candidate.is_file() and not candidate.is_symlink():
            return candidate
    matches = [p for p in submission.rglob(f"{module}.py") if p.is_file() and not p.is_symlink()]
    return matches[0] if len(matches) == 1 else None


def copy_submission(submission: Path, course: Path) -> list[str]:
    """Copy the submitted modules over the stubs; return a line per module saying what happened."""
    lines = []
    for exercise, modules in stub_modules(course).items():
        for module in modules:
            found = find_submitted(submission, exercise, module)
            target = course / "exercises" / exercise / f"{module}.py"
            if found is None:
                lines.append(f"exercise {exercise}: {module}.py not found in the submission (graded as the stub)")
                continue
            shutil.copyfile(found, target)
            lines.append(f"exercise {exercise}: {module}.py from {found.relative_to(submission)}")
    return lines


def seed_secret(source: Path, metadata: Path) -> str | None:
    secret_file = source / "seed_secret.txt"
    if not secret_file.is_file():
        return None
    submission_id = ""
    if metadata.is_file():
        submission_id = str(json.loads(metadata.read_text()).get("id", ""))
    return f"{secret_file.read_text().strip()}:{submission_id}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grader.gradescope", description=__doc__.split("\n\n")[0])
    parser.add_argument("--autograder", type=Path, default=Path("/autograder"), help="Gradescope's root folder")
    parser.add_argument("--exercises", nargs="*", default=[], help="only these exercises (default: all)")
    args, grader_args = parser.parse_known_args(argv)
    source, root = args.autograder / "source", args.autograder
    for line in copy_submission(root / "submission", source):
        print(line)
    command = [*args.exercises, "--course", str(source), "--results", str(root / "results" / "results.json")]
    secret = seed_secret(source, root / "submission_metadata.json")
    if secret:
        os.environ["INFERLAB_SEED_SECRET"] = secret
    if os.geteuid() == 0 and _user_exists(STUDENT_USER):
        command += ["--run-as", STUDENT_USER]
    sys.stdout.flush()
    return cli.main([*command, *grader_args])


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
