"""inferlab's grader: a pytest plugin that grades exercises on correctness everywhere and on speed on GPUs.

Split by concern. In the test process: `plugin` (hooks and options), `impl` (which code the tests exercise), `device`
(CUDA, the Triton interpreter, the session header), `timing` (CUDA-event and host timing), `timed_inputs` (what the
code under test gets in a speed test), `thresholds` (speed thresholds per exercise), `speed` (the fixtures that time
and judge), `scoring` (points, tables, results.json), `limits` (time limits per test), `guard` (the grading helpers
stay the originals), `seeding` (the secret seed), `failures` (crashes, memory, broken CUDA contexts, in words),
`reporter` and `confine` (the test process's side of `python -m grader`). In the grader's process: `cli`,
`supervisor` (decides every score, re-runs what a fault left unrun), `child` (starts and follows one test
process), `channel` (signed records), `sandbox`
(process groups, orphans, the course's files), `reports` and `roofline` (what a course gets), `points`,
`gradescope` and `student_repo` (wiring a course).
"""

__version__ = "0.1.0"
