"""`python -m grader.batch SUBMISSIONS --out GRADEBOOK`: grade a whole class, one Ray task per submission.

    python -m grader.batch subs/ --out book/                        a local Ray cluster: this machine's CPUs and GPUs
    python -m grader.batch subs/ --out book/ --address auto         the Ray cluster this machine belongs to
    python -m grader.batch subs/ --out book/ --gpu-type H100        only on H100s (Ray's accelerator_type resource)
    python -m grader.batch subs/ --out book/ -- --test-timeout 60   anything after -- goes to python -m grader

SUBMISSIONS holds a folder per student (its name is the student's), laid out as `python -m grader.gradescope` reads
a submission: `exercises/NN/<module>.py`, `NN/<module>.py` or a bare `<module>.py`. Each submission is one task of a
Ray cluster that runs today's single-submission grader, unchanged, as a subprocess (`python -m grader.gradescope`
on a private copy of the course) and sends back its results.json and results.md; grader/gradebook.py turns them into
a CSV and a summary of the class.

- Fairness: on a cluster with GPUs every task holds one whole GPU (`num_gpus=1`; Ray sets its
  CUDA_VISIBLE_DEVICES), so speed tests of two submissions never share a card at the same time. Each record holds
  the GPU's name and its measured copy bandwidth; the grader applies thresholds keyed by that name.
- Failures: a task whose worker or node dies is submitted again, to whichever node has room (`--retries`, 2 by
  default), and recorded as "lost" if no attempt completes. A submission that crashes or hangs its tests is graded
  by its grader as always (0 for what crashed) and never retried; a grader that ends without results gives 0.
- Re-runs: a record keeps the hash of the graded modules with the grader's options and the secret; a re-run grades
  only submissions whose hash changed or that have no grade yet. A changed course or grader is reported, not acted
  on (a typo fixed in a test file would grade the whole class again): `--force` grades everything again.
- The course travels with the tasks: packed once without solutions/ and tests/ and unpacked privately for each
  task, so nodes need Python with the course's packages and Ray but no shared file system, and no submission can
  change the course that another one is graded with.

Exits 0 when every submission has a grade, 1 when some have none (lost, or no results: run it again), 2 on bad input.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .gradebook import GRADED, LOST, NO_RESULTS, Gradebook, Record
from .gradescope import stub_modules

GRADER_HOME = Path(__file__).resolve().parent.parent
# At the course's root, besides every hidden folder (.git, .venv, an instructor's scratch space):
NOT_SHIPPED = {"solutions", "tests", "bench", "autograder"}
NEVER_SHIPPED = {"__pycache__", ".pytest_cache", ".benchmarks", ".hypothesis", ".ruff_cache", ".mypy_cache"}
RESULT_FILES = ("results.json", "results.md", "results-roofline.png")
LOG_TAIL = 20_000  # characters of the grader's output kept in grader.log
STOP_GRACE = 15  # seconds a grader gets to stop its test processes after SIGINT

# Started in place of the grader, then replaced by it (exec): the grader gets SIGINT (it stops its test processes
# and exits, as on Ctrl-C) when the Ray worker that started it dies, so that no grading outlives a lost attempt.
ORPHAN_GUARD = """import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, int(signal.SIGINT))  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    os._exit(70)  # the worker died before the guard was set
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""

# The card's name and its device-to-device copy bandwidth (bytes read + written per second, median of 10 copies of
# 1 GiB): what every student's speed was measured on, recorded next to the grade.
GPU_PROBE = """import json, torch
if not torch.cuda.is_available():
    print("{}")
    raise SystemExit
src = torch.ones(2**28, dtype=torch.int32, device="cuda")
dst = torch.empty_like(src)
for _ in range(3):
    dst.copy_(src)
seconds = []
for _ in range(10):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    dst.copy_(src)
    end.record()
    end.synchronize()
    seconds.append(start.elapsed_time(end) / 1e3)
median = sorted(seconds)[len(seconds) // 2]
print(json.dumps({"gpu": torch.cuda.get_device_name(), "copy_bandwidth": 2 * src.numel() * 4 / median}))
"""


@dataclass
class Submission:
    student: str
    files: dict[str, bytes]  # path inside the submission: contents (only the modules the grader can take)
    key: str = ""
    attempts: int = 0
    events: list[str] = field(default_factory=list)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m grader.batch", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("submissions", type=Path, help="a folder with one folder per student")
    parser.add_argument("--out", type=Path, required=True, help="the gradebook folder (kept between runs)")
    parser.add_argument("--course", type=Path, default=GRADER_HOME, help="the course to grade with (default: this "
                        "repository)")  # fmt: skip
    parser.add_argument("--exercises", nargs="+", default=[], metavar="NN", help="only these exercises")
    parser.add_argument("--address", help="a running Ray cluster ('auto', or host:port; default $RAY_ADDRESS, "
                        "else a local cluster on this machine)")  # fmt: skip
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local cluster (default: all)")
    parser.add_argument("--num-gpus", type=int, help="GPUs of the local cluster (default: all)")
    parser.add_argument("--cpus-per-submission", type=float, help="default: the cluster's CPUs per GPU, or 1 "
                        "without GPUs")  # fmt: skip
    parser.add_argument("--cpu-only", action="store_true", help="grade without GPUs even if the cluster has some")
    parser.add_argument("--gpu-type", help="only on GPUs of this accelerator type (e.g. H100, A100)")
    parser.add_argument("--retries", type=int, default=2, help="attempts after a lost one (default 2)")
    parser.add_argument("--submission-timeout", type=float, default=7200, metavar="SECONDS",
                        help="stop a grader that runs longer (default 7200; it then gets 0)")  # fmt: skip
    parser.add_argument("--secret-file", type=Path, help="the seed secret (default $INFERLAB_SEED_SECRET); each "
                        "submission's seeds mix it with the student's name")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="grade every submission again")
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    if args.retries < 0 or args.submission_timeout <= 0:
        parser.error("--retries must be >= 0 and --submission-timeout > 0")
    return args, argv[split + 1 :]


def main(argv: list[str] | None = None) -> int:
    args, grader_args = parse(list(sys.argv[1:] if argv is None else argv))
    course = args.course.resolve()
    try:
        submissions = find_submissions(args.submissions, course)
        secret = args.secret_file.read_text().strip() if args.secret_file else os.environ.get("INFERLAB_SEED_SECRET")
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    packed, course_hash = pack_course(course)
    options = _hash([json.dumps([args.exercises, grader_args]), hashlib.sha256((secret or "").encode()).hexdigest()])
    book = Gradebook(args.out)
    for submission in submissions:
        submission.key = _hash([content_hash(submission.files), options])
    todo = [s for s in submissions if args.force or not book.unchanged(s.student, s.key)]
    print(f"{len(submissions)} submissions: {len(todo)} to grade, {len(submissions) - len(todo)} unchanged since "
          f"their last grade", flush=True)  # fmt: skip
    header = [f"Graded with the course at {course}; grader options: {' '.join(grader_args) or '(defaults)'}."]
    stale = [s.student for s in submissions if s not in todo and (book.record(s.student) or Record("", "")).course
             != course_hash]  # fmt: skip
    if stale:  # a changed course does not grade the class again by itself: a typo fix would cost every GPU-hour
        header.append(f"{len(stale)} unchanged submissions were graded with other course or grader files than "
                      f"now ({', '.join(stale[:10])}{', ...' if len(stale) > 10 else ''}): --force grades them again.")
        print(header[-1])
    if todo:
        try:
            job = {"secret": secret, "exercises": args.exercises, "grader_args": grader_args,
                   "timeout": args.submission_timeout, "course": course_hash}  # fmt: skip
            header.append(grade_on_ray(todo, packed, job, args, book))
        except ClusterError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    for line in book.write([s.student for s in submissions], course, header):
        print(line)
    ungraded = [s.student for s in submissions if (book.record(s.student) or Record(s.student, "")).status != GRADED]
    if ungraded:
        print(f"not graded: {', '.join(ungraded)} (run the command again to try them again)")
    return 1 if ungraded else 0


def find_submissions(folder: Path, course: Path) -> list[Submission]:
    """One submission per folder, holding every file named as a module students write (the grader picks from those)."""
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder of submissions")
    names = {f"{module}.py" for modules in stub_modules(course).values() for module in modules}
    if not names:
        raise ValueError(f"{course} has no exercises with modules to write (is --course a course?)")
    submissions = []
    for student in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = {}
        for directory, dirs, found in os.walk(student):  # does not follow links to folders
            dirs[:] = sorted(d for d in dirs if d not in NEVER_SHIPPED and d != ".git")
            for name in sorted(found):
                path = Path(directory, name)
                if name in names and path.is_file() and not path.is_symlink():
                    files[path.relative_to(student).as_posix()] = path.read_bytes()
        submissions.append(Submission(student.name, files))
    if not submissions:
        raise ValueError(f"{folder} holds no submission folders (one folder per student)")
    return submissions


def pack_course(course: Path) -> tuple[bytes, str]:
    """A tar of what every task grades with, and its hash: the course (no solutions, no grader self-tests, no
    caches) under `course/`, and this grader package under `home/grader/`. Packed once, the grading stays the same
    on every node, and while it runs the checkout can be edited."""
    buffer, digest = io.BytesIO(), hashlib.sha256()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for prefix, tree in (("course", course), ("home/grader", GRADER_HOME / "grader")):
            for directory, dirs, names in os.walk(tree):
                here = Path(directory)
                dirs[:] = sorted(d for d in dirs if d not in NEVER_SHIPPED and not d.endswith(".egg-info")
                                 and not (here / d / "pyvenv.cfg").exists()  # a virtual environment
                                 and not (here == course and (d in NOT_SHIPPED or d.startswith("."))))  # fmt: skip
                for name in sorted(names):
                    path = here / name
                    if path.suffix == ".pyc" or not path.is_file():
                        continue
                    relative = f"{prefix}/{path.relative_to(tree).as_posix()}"
                    data = path.read_bytes()
                    digest.update(f"{relative}\0{len(data)}\0".encode() + data)
                    info = tarfile.TarInfo(relative)
                    info.size, info.mode = len(data), 0o755 if os.access(path, os.X_OK) else 0o644
                    tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue(), digest.hexdigest()


def content_hash(files: dict[str, bytes]) -> str:
    return _hash([f"{path}\0{hashlib.sha256(data).hexdigest()}" for path, data in sorted(files.items())])


def _hash(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class ClusterError(Exception):
    pass


def grade_on_ray(todo: list[Submission], packed: bytes, job: dict, args, book: Gradebook) -> str:
    """Grade every submission as a Ray task, retrying lost attempts; save each record as it arrives."""
    try:
        import ray
        from ray import exceptions as errors
    except ImportError as exc:
        raise ClusterError("grading a class needs Ray: pip install 'ray>=2.40'") from exc
    lost_errors = tuple(getattr(errors, name) for name in ("WorkerCrashedError", "NodeDiedError", "ObjectLostError",
                        "OutOfMemoryError", "RaySystemError") if hasattr(errors, name))  # fmt: skip
    address = args.address or os.environ.get("RAY_ADDRESS") or "local"  # "local": a new cluster, this machine only
    local = dict(num_cpus=args.num_cpus, num_gpus=args.num_gpus, object_store_memory=max(2**27, 4 * len(packed)))
    remote = address != "local"  # its nodes import this module from the copy Ray ships them
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             runtime_env={"py_modules": [str(GRADER_HOME / "grader")]} if remote else None,
             **({} if remote else local))  # fmt: skip
    try:
        options, cluster = task_options(args, ray.cluster_resources(), ray.nodes())
        grader_args = list(job["grader_args"])
        if "--jobs" not in grader_args:  # the grader runs as many exercises at once as the task has CPUs
            grader_args = ["--jobs", str(max(1, int(options["num_cpus"]))), *grader_args]
        job = {**job, "grader_args": grader_args}
        print(f"Ray cluster: {cluster}; each submission gets {options['num_cpus']:g} CPU"
              + (f" and a whole GPU{' (' + args.gpu_type + ')' if args.gpu_type else ''}" if options["num_gpus"]
                 else ", no GPU (speed on CUDA not graded)"), flush=True)  # fmt: skip
        task = ray.remote(grade_submission).options(max_retries=0, **options)
        course = ray.put(packed)
        pending = {}

        def submit(submission: Submission) -> None:
            submission.attempts += 1
            pending[task.remote(course, submission.student, submission.files, job)] = submission

        for submission in todo:
            submit(submission)
        done = 0
        try:
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                submission = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except lost_errors as exc:
                    submission.events.append(f"attempt {submission.attempts} lost: {_first_line(exc)}")
                    if submission.attempts <= args.retries:
                        submit(submission)
                        continue
                    outcome = {"status": LOST, "files": {}}
                except errors.RayTaskError as exc:  # this module's own code failed on the node: not the student's
                    outcome = {"status": NO_RESULTS, "files": {"grader.log": str(exc).encode()[-LOG_TAIL:]},
                               "event": f"the grading task failed: {_first_line(exc)}"}  # fmt: skip
                done += 1
                record = save(book, submission, outcome, job["course"])
                print(f"[{done}/{len(todo)}] {progress_line(record, book)}", flush=True)
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)  # the workers die, and their graders stop (ORPHAN_GUARD)
            raise
        return f"Last run: {len(todo)} submissions graded on a Ray cluster of {cluster}."
    finally:
        ray.shutdown()


def task_options(args, resources: dict, nodes: list[dict]) -> tuple[dict, str]:
    """What each task holds: a whole GPU when the cluster has any (unless --cpu-only), and its share of CPUs."""
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    cluster = f"{len([n for n in nodes if n.get('Alive')])} node(s), {cpus:g} CPUs, {gpus:g} GPUs"
    use_gpu = gpus > 0 and not args.cpu_only
    per_task = args.cpus_per_submission or (max(1, int(cpus // gpus)) if use_gpu else 1)
    options = {"num_cpus": per_task, "num_gpus": 1 if use_gpu else 0}
    if args.gpu_type:
        if not use_gpu:
            raise ClusterError(f"--gpu-type {args.gpu_type}: the cluster has no GPUs ({cluster})")
        options["accelerator_type"] = args.gpu_type
    wanted = {"CPU": per_task, "GPU": options["num_gpus"]}
    wanted.update({f"accelerator_type:{args.gpu_type}": 0.001} if args.gpu_type else {})
    if not any(all(n.get("Resources", {}).get(k, 0) >= v for k, v in wanted.items() if v) for n in nodes
               if n.get("Alive")):  # fmt: skip
        raise ClusterError(f"no node of the cluster can hold a submission's task ({_resources(wanted)}): {cluster}")
    return options, cluster


def save(book: Gradebook, submission: Submission, outcome: dict, course: str) -> Record:
    events = submission.events + ([outcome["event"]] if outcome.get("event") else [])
    if outcome["status"] == LOST:
        events.append(f"never graded: every one of {submission.attempts} attempts was lost")
    record = Record(submission.student, submission.key, outcome["status"], submission.attempts, events,
                    outcome.get("node", ""), outcome.get("gpu", ""), outcome.get("copy_bandwidth"),
                    outcome.get("seconds", 0.0), outcome.get("exit_code"),
                    datetime.now(timezone.utc).isoformat(timespec="seconds"), course)  # fmt: skip
    book.save(record, outcome["files"])
    return record


def progress_line(record: Record, book: Gradebook) -> str:
    row = book.row(record.student)
    grade = f"{row.earned:g} / {row.possible:g}" if record.status == GRADED else record.status
    where = f" on {record.node}" if record.node else ""
    where += f" ({record.gpu})" if record.gpu else ""
    attempts = f", attempt {record.attempts}" if record.attempts > 1 else ""
    return f"{record.student}: {grade}{where} in {record.seconds:.0f} s{attempts}"


def grade_submission(course: bytes, student: str, files: dict[str, bytes], job: dict) -> dict:
    """The task: on this node, grade one submission with `python -m grader.gradescope` and return its files."""
    import ray

    started = time.monotonic()
    gpus = [str(g) for g in ray.get_gpu_ids()]
    outcome: dict = {"node": socket.gethostname(), "files": {}}
    with tempfile.TemporaryDirectory(prefix=f"inferlab-batch-{student}-") as scratch:
        autograder = Path(scratch) / "autograder"
        source, submission, home = autograder / "source", autograder / "submission", Path(scratch) / "home"
        with tarfile.open(fileobj=io.BytesIO(course)) as tar:
            tar.extractall(scratch, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        autograder.mkdir()
        (Path(scratch) / "course").rename(source)
        if os.geteuid() == 0:  # the grader runs the tests as the user "student" where it exists: let it read them
            Path(scratch).chmod(0o755)
        for relative, data in files.items():
            target = submission / relative
            if ".." in Path(relative).parts or Path(relative).is_absolute():
                raise ValueError(f"a submitted path leaves the submission: {relative}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        submission.mkdir(parents=True, exist_ok=True)
        (autograder / "submission_metadata.json").write_text(json.dumps({"id": student}))
        if job["secret"]:
            (source / "seed_secret.txt").write_text(job["secret"])
        env = grader_environment(home, gpus)
        if gpus:
            outcome.update(gpu_probe(env, Path(scratch)))
        exercises = ["--exercises", *job["exercises"]] if job["exercises"] else []
        argv = [sys.executable, "-c", ORPHAN_GUARD, str(os.getpid()), "-m", "grader.gradescope",
                "--autograder", str(autograder), *exercises, *job["grader_args"]]  # fmt: skip
        log = Path(scratch) / "grader.log"
        outcome["exit_code"], event = run_grader(argv, env, Path(scratch), log, job["timeout"])
        for name in RESULT_FILES:
            path = autograder / "results" / name
            if path.is_file():
                outcome["files"][name] = path.read_bytes()
        outcome["files"]["grader.log"] = log.read_bytes()[-LOG_TAIL:]
    graded = "results.json" in outcome["files"] and outcome["exit_code"] == 0
    if not graded and event is None:
        event = f"the grader ended without results (exit code {outcome['exit_code']}): see grader.log"
    outcome.update(status=GRADED if graded else NO_RESULTS, event=event, seconds=time.monotonic() - started)
    return outcome


def grader_environment(grader_home: Path, gpus: list[str]) -> dict:
    """The worker's environment, without settings that would change the grade or reach the cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFERLAB_", "RAY_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(grader_home), env.get("PYTHONPATH")]))
    env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "") if gpus else ""  # Ray's choice, or none
    return env


def gpu_probe(env: dict, cwd: Path) -> dict:
    try:
        done = subprocess.run([sys.executable, "-c", GPU_PROBE], env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return {"gpu": "unknown (the GPU probe failed)"}


def run_grader(argv: list[str], env: dict, cwd: Path, log: Path, timeout: float) -> tuple[int | None, str | None]:
    """Run the grader to its end; stop it (as Ctrl-C does) past the timeout or when this task is cancelled."""
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        try:
            return process.wait(timeout=timeout), None
        except subprocess.TimeoutExpired:
            _stop(process)
            return process.returncode, f"the grader did not finish within {timeout:g} s and was stopped"
        except BaseException:
            _stop(process)
            raise


def _stop(process: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGINT, STOP_GRACE), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _resources(wanted: dict) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in wanted.items() if v)


if __name__ == "__main__":
    sys.exit(main())
