"""Which tests run the student's code in a sandbox process, and what tests that cannot may earn.

Under `python -m grader`, the tests of an isolated exercise never import the student's module into the test process:
`impl(...)` returns a proxy of the module imported in a sandbox process (grader/sandbox_process.py, grader/remote.py),
so code under test cannot reach the results channel, its key, pytest or the grader. Plain `pytest exercises/NN` (a
student at their desk, the mutation runs) imports in-process as before.

Two kinds of test of an isolated exercise still run the code in the test process, in batches of their own:
- speed tests: the kernels must launch in the process that records the CUDA events (and host-clock timings must
  not include a round trip);
- tests that instrument the code under test in-process (a TorchDispatchMode that counts the work of a call, a
  monkeypatched torch function around it): `IN_PROCESS` names them.
Such a test earns its points only when every isolated correctness test of its exercise passed in the same run
(`gate`): a submission that forges results from inside the test process wins nothing it did not earn in the
sandbox; what remains forgeable is those tests' own verdicts, for a submission that is otherwise correct.

`ISOLATED` is the roll-out switch. Exercises 03 and 06 are not isolated yet: their correctness tests watch every
tensor allocation and Triton launch of a call (exercise 03's `KernelCall`) and poison outputs in place (06's
`poisoned`) in the test process; that instrumentation has to move into the sandbox first. 04 passes in full under
isolation (`INFERLAB_ISOLATE=04 python -m grader 04 --impl solution`), but its decoding loops cross the process
boundary per token and took about 3x as long on a loaded 2-core machine: it stays in-process until that cost is
measured unloaded. 05 passes too, but its simulator reads every request's fields at every step, one round trip
each: about 12x as long, past what a Gradescope run can afford, until those reads are batched. $INFERLAB_ISOLATE adds
exercises ("04" or "all"); nothing turns isolation off.
"""

from __future__ import annotations

import os

ISOLATE_ENV = "INFERLAB_ISOLATE"
ISOLATED = frozenset({"00", "01", "02", "08"})
IN_PROCESS = {  # exercise -> tests (names before any [parameters]) that run the code in the test process, and why
    "01": ("test_append_work_is_proportional_to_the_new_tokens_not_the_cache",  # a TorchDispatchMode counts its work
           "test_generate_on_a_gpu_matches_transformers_logits_at_every_step"),  # CUDA IPC not yet proven on a GPU
    "08": ("test_awq_export_decodes_through_exercise_03s_gemv_like_its_fake_quantized_copy",),  # a GPU, as above
}
NOT_ISOLATED_YET = {
    "03": "its tests watch every tensor allocation and Triton launch of a call in the test process",
    "04": "passes isolated, but its decoding loops cross the process boundary per token: about 3x slower (measured)",
    "05": "passes isolated, but its simulator reads every request's fields at every step across the process boundary: "
    "about 12x slower (measured; reads batched per step would fix it)",
    "06": "its tests poison outputs in place and watch launches in the test process",
    "07": "its tests drive a real server over HTTP; the engine imports the other exercises' modules itself",
    "09": "not reviewed yet",
}


def isolated_exercise(exercise: str | None) -> bool:
    if exercise is None:
        return False
    extra = os.environ.get(ISOLATE_ENV, "")
    return exercise in ISOLATED or extra.strip() == "all" or exercise in {e.strip() for e in extra.split(",")}


def runs_in_process(exercise: str | None, name: str, speed_kind: str) -> bool:
    """True for a test of an isolated exercise that must run the code in the test process (module docstring)."""
    return bool(speed_kind) or name.split("[")[0] in IN_PROCESS.get(exercise or "", ())


def isolated(exercise: str | None, name: str, speed_kind: str) -> bool:
    """Whether this test reaches the student's code through the sandbox (under `python -m grader`)."""
    return isolated_exercise(exercise) and not runs_in_process(exercise, name, speed_kind)


def batch_label(test) -> str:
    """The batch a collected test (grader.scoring.TestResult) runs in: isolated correctness tests never share a
    process with tests that import the student's module."""
    if test.speed_kind:
        return {"gpu": "speed (GPU)", "host": "speed (host)"}[test.speed_kind]
    if isolated_exercise(test.exercise) and runs_in_process(test.exercise, test.name, ""):
        return "in-process"
    return "correctness"


def gate(results: dict, collected: dict) -> list[str]:
    """Withdraw the points of in-process tests (speed, instrumented) of an isolated exercise whose isolated
    correctness tests did not all pass; returns what happened, in words. `results`: nodeid -> TestResult (final),
    `collected`: exercise -> [TestResult]."""
    events = []
    for exercise, tests in collected.items():
        if not isolated_exercise(exercise):
            continue
        checked = [t for t in tests if not runs_in_process(exercise, t.name, t.speed_kind)]
        failed = [t.name for t in checked if (results.get(t.nodeid) is None or
                                              results[t.nodeid].outcome not in ("passed", "skipped"))]  # fmt: skip
        if not failed:
            continue
        withdrawn = 0
        for test in tests:
            result = results.get(test.nodeid)
            if result is None or result.outcome != "passed" or not runs_in_process(exercise, test.name,
                                                                                   test.speed_kind):  # fmt: skip
                continue
            result.outcome = "failed"
            shown = ", ".join(failed[:3]) + (f" and {len(failed) - 3} more" if len(failed) > 3 else "")
            result.message = (
                f"not counted: this test runs the code under test in the test process (to time it, or to watch it), "
                f"so it earns its points only when every isolated correctness test of exercise {exercise} passed; "
                f"these did not: {shown}"
            )
            withdrawn += 1
        if withdrawn:
            events.append(f"exercise {exercise}: {withdrawn} in-process test(s) not counted, because isolated "
                          f"correctness tests failed")  # fmt: skip
    return events
