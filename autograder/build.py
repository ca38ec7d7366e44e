"""Build the zip Gradescope's "Configure Autograder" page takes: the course as students get it, plus this folder's
setup.sh and run_autograder at the top, plus the seed secret if you give one.

    python3 autograder/build.py autograder.zip --secret-file ~/course-secret.txt

The course is the student repo (python -m grader.student_repo: stubs, tests, fixtures, grader; no solutions), so
the zip gives nothing away that students do not already have, except the secret (keep it out of any repository).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grader.student_repo import write_student_repo  # noqa: E402

SCRIPTS = ("setup.sh", "run_autograder")


def build(zip_path: Path, secret_file: Path | None = None) -> list[str]:
    with tempfile.TemporaryDirectory() as scratch:
        course = Path(scratch) / "course"
        write_student_repo(course)
        names = []
        with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(course.rglob("*")):
                if path.is_file():
                    name = str(path.relative_to(course))
                    archive.write(path, name)
                    names.append(name)
            for script in SCRIPTS:
                info = zipfile.ZipInfo(script)
                info.external_attr = 0o100755 << 16  # executable, as Gradescope runs them
                archive.writestr(info, (ROOT / "autograder" / script).read_text())
                names.append(script)
            if secret_file is not None:
                archive.writestr("seed_secret.txt", Path(secret_file).read_text().strip() + "\n")
                names.append("seed_secret.txt")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("zip", type=Path, help="the zip to write, e.g. autograder.zip")
    parser.add_argument("--secret-file", type=Path, help="a file holding the instructor's seed secret")
    args = parser.parse_args(argv)
    names = build(args.zip, args.secret_file)
    print(f"wrote {args.zip}: {len(names)} files" + (" (with the seed secret)" if args.secret_file else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
