"""`python -m grader`: grade the current implementation and print the score table.

    python -m grader                      grade every exercise (the student's code)
    python -m grader 01 03                grade some exercises
    python -m grader --impl solution      grade the reference solutions
    python -m grader --results out.json   also write Gradescope's results.json, the report out.md beside it, and
                                          out-roofline.png when speed was graded
    python -m grader --junitxml out.xml   also write JUnit XML: one test suite per exercise
    python -m grader --timeout 300        give each exercise at most 300 s
    python -m grader --test-timeout 30    give each test at most 30 s (default 120; @time_limit raises it)
    python -m grader --seed-secret TEXT   mix a secret into every seed (or $INFERLAB_SEED_SECRET)
    python -m grader --jobs 4             grade up to 4 exercises' correctness at once (default: one per core)

Tests run in child pytest processes, and this process decides the score (grader/supervisor.py): a test that hangs
costs that test ("timed out after N s"), a crash costs the test in flight, and the tests after it run again in a
fresh process; results travel over a signed channel that the code under test cannot rewrite after the fact; the
maximum comes from collecting the tests before any student code runs. Correctness of different exercises runs in
parallel; speed tests run afterwards, one process per GPU (several GPUs: `CUDA_VISIBLE_DEVICES` spreads them), and
host-clock speed tests last, alone. Anything after `--` goes to pytest unchanged. Exits 0 when grading ran, whatever
the score: a failing student test is a grade, not an error (`--strict` exits 1 on any failure instead).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import isolation, limits, reports, sandbox
from .child import ChildCommand, run_child
from .impl import IMPL_ENV
from .scoring import Scoreboard, TestResult, not_graded_lines, table_lines
from .seeding import SECRET_ENV
from .supervisor import Batch, Budget, Compromised, grade_batch

ROOT = Path(__file__).resolve().parent.parent
GRADER_HOME = ROOT  # where the grader package lives; tests point ROOT at a throwaway course
SUMMARY_ENV = "INFERLAB_SUMMARY"  # "off": the per-exercise processes leave the table to this command


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str], argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(prog="python -m grader", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("exercises", nargs="*", help="exercise numbers, e.g. 01 03 (default: all)")
    parser.add_argument("--impl", choices=("student", "solution"), help="default: student (or $INFERLAB_IMPL)")
    parser.add_argument("--solutions", metavar="PATH", help="private solutions tree for --impl solution")
    parser.add_argument("--results", metavar="PATH", help="write Gradescope's results.json here, the report beside it")
    parser.add_argument("--junitxml", metavar="PATH", help="write JUnit XML here (one test suite per exercise)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS", help="time limit for each exercise")
    parser.add_argument("--test-timeout", type=float, metavar="SECONDS", help="time limit for each test (default 120)")
    parser.add_argument("--seed-secret", metavar="TEXT", help=f"mix this into every seed (default ${SECRET_ENV})")
    parser.add_argument("--jobs", type=int, metavar="N", help="exercises graded for correctness at once (default: "
                        "the number of cores)")  # fmt: skip
    parser.add_argument("--run-as", metavar="USER", help="run the test processes as this user (needs root)")
    parser.add_argument("--memory-limit", type=float, metavar="GB", help="address space of each test process "
                        "(CPU-only machines: CUDA reserves far more than it uses)")  # fmt: skip
    parser.add_argument("--course", metavar="DIR", help="grade the course at DIR (its exercises, tests and fixtures) "
                        "instead of the one this grader belongs to")  # fmt: skip
    parser.add_argument("--strict", action="store_true", help="exit 1 if any graded test fails")
    split = argv.index("--") if "--" in argv else len(argv)
    return parser.parse_args(argv[:split]), argv[split + 1 :], parser


def main(argv: list[str] | None = None) -> int:
    args, pytest_args, parser = parse(list(sys.argv[1:] if argv is None else argv))
    root = Path(args.course).resolve() if args.course else ROOT
    available = sorted(p.name for p in (root / "exercises").iterdir() if p.name.isdigit())
    exercises = args.exercises or available
    missing = [e for e in exercises if e not in available]
    if missing:
        parser.error(f"no such exercise: {', '.join(missing)} (have: {', '.join(available)})")
    outputs = reports.Outputs.beside(args.results, args.junitxml)
    started = time.monotonic()
    sandbox.become_subreaper()
    with tempfile.TemporaryDirectory(prefix="inferlab-grade-") as scratch_dir:
        scratch = Path(scratch_dir)
        command = child_command(args, scratch, root)
        compromised = Compromised(watched_files(root, exercises, outputs))
        grading = Grading(root, exercises, command, scratch, compromised, args, pytest_args)
        try:
            grading.run()
        except KeyboardInterrupt:
            sandbox.stop_all()
            print("\ngrading interrupted: no results written", file=sys.stderr)
            return 130
    impl = args.impl or os.environ.get(IMPL_ENV) or "student"
    scores = Scoreboard(impl)
    for test in grading.final_results():
        scores.add(test)
    elapsed = time.monotonic() - started
    happened = grading.events + (["the course's files changed during grading: " + compromised.message()]
                                 if compromised.changes else [])  # fmt: skip
    summary = summary_lines(scores, happened)
    print("\n".join(["", "=" * 20 + " inferlab score " + "=" * 20, *summary]))
    written = outputs.write(scores, elapsed, summary, happened, grading.header())
    for line in written:
        print(line)
    failed = any(t.outcome != "passed" and t.outcome != "skipped" for t in scores.tests.values())
    return 1 if args.strict and failed else 0


def watched_files(root: Path, exercises: list[str], outputs: reports.Outputs) -> sandbox.Manifest:
    """What a test process loads from the course: the grader, the fixtures, the graded exercises, the root's config."""
    trees = [GRADER_HOME / "grader", root / "grader", root / "fixtures", root / "conftest.py", root / "pyproject.toml"]
    trees += [root / "exercises" / e for e in exercises]
    return sandbox.Manifest(root, list(dict.fromkeys(trees)), [root, root / "exercises"], ignore=outputs.paths())


def child_command(args: argparse.Namespace, scratch: Path, root: Path) -> ChildCommand:
    env = dict(os.environ, **{SUMMARY_ENV: "off", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1"})
    # The course first, then this grader (the one that grades: a course copied elsewhere still runs this code).
    paths = [str(root), str(GRADER_HOME), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(filter(None, paths)))
    secret = args.seed_secret or os.environ.get(SECRET_ENV)
    if secret:
        env[SECRET_ENV] = secret
    # Measured once here, so that every test process derives the same limits (grader/limits.py).
    env[limits.SCALE_ENV] = f"{limits.machine_scale():.6g}"
    if args.run_as:
        home = scratch / "home"
        home.mkdir()
        shutil.chown(home, user=args.run_as)
        scratch.chmod(0o755)
        env.update(HOME=str(home), TMPDIR=str(home))
    argv = [sys.executable, "-m", "pytest", "--rootdir", str(root), "-p", "no:cacheprovider",
            "-W", "ignore::pytest.PytestAssertRewriteWarning"]  # fmt: skip
    argv += [f"--impl={args.impl}"] if args.impl else []
    argv += [f"--solutions={args.solutions}"] if args.solutions else []
    argv += [f"--test-timeout={args.test_timeout:g}"] if args.test_timeout is not None else []
    memory = int(args.memory_limit * 2**30) if args.memory_limit else None
    return ChildCommand(argv, env, root, run_as=args.run_as, memory_limit=memory)


class Grading:
    """Collect once, then run each exercise's batches: correctness in parallel, speed tests one per GPU, host last."""

    def __init__(self, root: Path, exercises, command: ChildCommand, scratch: Path, compromised: Compromised, args,
                 pytest_args):  # fmt: skip
        self.root = root
        self.exercises = exercises
        self.command = command
        self.scratch = scratch
        self.compromised = compromised
        self.args = args
        self.pytest_args = pytest_args
        self.collected: dict[str, list[TestResult]] = {e: [] for e in exercises}
        self.results: dict[str, TestResult] = {}
        self.events: list[str] = []
        self.gpus: list[str] = []
        self.budgets = {e: Budget(args.timeout) for e in exercises}
        self._print = threading.Lock()

    def run(self) -> None:
        self.collect()
        batches = {"correctness": [], "in-process": [], "speed (GPU)": [], "speed (host)": []}
        for exercise in self.exercises:
            for label in batches:
                tests = [
                    t for t in self.collected[exercise]
                    if isolation.batch_label(t) == label and t.nodeid not in self.results
                ]  # skipped at collection, or could not be collected
                if tests:
                    batches[label].append(Batch(exercise, label, tests))
        jobs = max(1, min(self.args.jobs or os.cpu_count() or 1, len(batches["correctness"]) or 1))
        for i, batch in enumerate(batches["correctness"]):
            if self.gpus:
                batch.env["CUDA_VISIBLE_DEVICES"] = self.gpus[i % len(self.gpus)]
            if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
                batch.env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
        self._run_parallel(batches["correctness"], jobs)
        self._run_parallel(batches["in-process"], jobs)  # they import the student's module: never with the above
        self._run_on_gpus(batches["speed (GPU)"])
        self._run_parallel(batches["speed (host)"], 1)  # host-clock timing wants the machine to itself
        self.events += isolation.gate(self.results, self.collected)  # in-process points need the isolated ones

    def collect(self) -> None:
        paths = [str(self.root / "exercises" / e) for e in self.exercises]
        argv = [*self.command.argv, *paths, "--collect-only", "-q", "--continue-on-collection-errors",
                *self.pytest_args]  # fmt: skip
        command = ChildCommand(**{**self.command.__dict__, "argv": argv, "output": subprocess.DEVNULL})
        run = run_child(command, {"collect_only": True}, self.scratch / "plan-collect.json", {})
        if run.collected_tests is None:
            why = f"collecting the tests failed ({run.ending}, exit code {run.returncode})"
            why += f": {run.tracebacks.strip()[-1000:]}" if run.tracebacks.strip() else ""
            for exercise in self.exercises:
                self._could_not_collect(exercise, why)
            return
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        self.gpus = (visible or [str(i) for i in range(run.gpus)])[: run.gpus]
        for record in run.collected_tests:
            test = TestResult.from_record(record)
            if test.exercise in self.collected:
                self.collected[test.exercise].append(test)
                if test.skip_reason:
                    self.results[test.nodeid] = _skipped(test)
        for error in run.collect_errors:
            parts = Path(error.get("path", "")).parts
            exercise = parts[1] if len(parts) > 1 and parts[0] == "exercises" else None
            if exercise in self.collected:
                self._could_not_collect(exercise, error.get("message", "collection error"))

    def _could_not_collect(self, exercise: str, why: str) -> None:
        test = TestResult(f"exercises/{exercise}::(could not collect)", exercise, "(could not collect)", 1.0)
        test.outcome, test.message = "failed", why
        self.collected[exercise].append(test)
        self.results[test.nodeid] = test

    def _run_parallel(self, batches: list[Batch], jobs: int) -> None:
        if jobs == 1:
            for batch in batches:
                self._grade(batch, stream=True)
            return
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            _interruptible(pool.map(lambda b: self._grade(b, stream=False), batches))

    def _run_on_gpus(self, batches: list[Batch]) -> None:
        """One speed process per GPU, and nothing else on that GPU while it runs."""
        if len(self.gpus) <= 1:
            for batch in batches:
                batch.env.update({"CUDA_VISIBLE_DEVICES": self.gpus[0]} if self.gpus else {})
            self._run_parallel(batches, 1)
            return
        free = list(self.gpus)
        lock = threading.Condition()

        def on_a_free_gpu(batch: Batch) -> None:
            with lock:
                lock.wait_for(lambda: free)
                gpu = free.pop()
            batch.env["CUDA_VISIBLE_DEVICES"] = gpu
            try:
                self._grade(batch, stream=False)
            finally:
                with lock:
                    free.append(gpu)
                    lock.notify()

        with ThreadPoolExecutor(max_workers=len(self.gpus)) as pool:
            _interruptible(pool.map(on_a_free_gpu, batches))

    def _grade(self, batch: Batch, stream: bool) -> None:
        began = time.monotonic()
        log = None if stream else open(self.scratch / f"log-{batch.exercise}-{id(batch)}.txt", "w")
        if stream:
            self._say(f"exercise {batch.exercise} ({batch.label}):")
        argv = [*self.command.argv, str(self.root / "exercises" / batch.exercise), "-q", "--tb=no", "-rN",
                *self.pytest_args]  # fmt: skip
        command = ChildCommand(**{**self.command.__dict__, "argv": argv, "output": log})
        solutions = Path(self.args.solutions).resolve() if self.args.solutions else self.root / "solutions"
        roots = [solutions, self.root / "exercises", self.root]
        try:
            grade_batch(batch, command, self.scratch, self.budgets[batch.exercise], self.compromised, roots)
        finally:
            if log is not None:
                log.close()
        self.results.update(batch.results)
        outcomes = [r.outcome for r in batch.results.values()]
        line = (f"exercise {batch.exercise} ({batch.label}): {outcomes.count('passed')} passed, "
                f"{len(outcomes) - outcomes.count('passed')} failed [{time.monotonic() - began:.0f} s"
                + (f", {batch.processes} processes]" if batch.processes > 1 else "]"))  # fmt: skip
        self._say("\n".join([line, *(f"  {event}" for event in batch.events)]))
        self.events += batch.events

    def _say(self, text: str) -> None:
        with self._print:
            print(text, flush=True)

    def final_results(self) -> list[TestResult]:
        ordered = []
        for exercise in self.exercises:
            for test in self.collected[exercise]:
                ordered.append(self.results.get(test.nodeid) or _never_ran(test))
        return ordered

    def header(self) -> dict:
        return {"exercises": self.exercises, "gpus": self.gpus, "secret": bool(self.command.env.get(SECRET_ENV))}


def _interruptible(results) -> None:
    """Wait for the pool; on Ctrl-C, kill every test process first, so that the pool's threads end at once."""
    try:
        list(results)
    except KeyboardInterrupt:
        sandbox.stop_all()
        raise


def _skipped(test: TestResult) -> TestResult:
    return TestResult(**{**test.__dict__, "outcome": "skipped", "message": f"skipped: {test.skip_reason}"})


def _never_ran(test: TestResult) -> TestResult:
    return TestResult(**{**test.__dict__, "outcome": "failed", "message": "not run: the grader did not get to it"})


def summary_lines(scores: Scoreboard, happened: list[str]) -> list[str]:
    lines = table_lines(scores.totals())
    lines += not_graded_lines([t.message for t in scores.tests.values() if t.outcome == "skipped"])
    speed = scores.speed_lines()
    if speed:
        lines += ["", "speed (ratios measured in this run; roofline = fraction of copy bandwidth)", *speed]
    if happened:
        lines += ["", "what happened:", *(f"  {event}" for event in happened)]
    return lines
