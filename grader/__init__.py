"""inferlab's grader: a pytest plugin that grades exercises on correctness everywhere and on speed on GPUs.

Two halves, one flat package (each module's name is the command or import path that courses use, so the halves are
listed here rather than nested):

In a test process (the pytest plugin, loaded by `pytest exercises/NN` and by every child of `python -m grader`):
  plugin         hooks, options, markers, the `impl` and speed fixtures
  impl           which code the tests exercise (student, reference, a private tree), imported or sandboxed
  isolation      which exercises run the student's module in a sandbox process, and what in-process tests may earn
  remote         the sandbox's connection: proxies, tensors through shared memory, callbacks, exceptions by value
  sandbox_process  starts and drives the sandbox process
  reporter, confine  the test process's side of `python -m grader`: signed records, no writes into the course
  device, timing, timed_inputs, speed, thresholds   CUDA and the interpreter, the timers, fresh inputs, judging
  guard, seeding, failures   the grading helpers stay the originals, the secret seed, faults in words

In the parent (`python -m grader`, which decides every score):
  cli            collect once, run batches, write the reports (python -m grader)
  supervisor     decides every score, re-runs what a fault left unrun
  child          starts and follows one test process (CPU-time deadlines, the wall-clock backstop)
  sandbox        process groups, orphans, the course's files fingerprinted
  reports, roofline   results.md, JUnit, the roofline chart

Shared by both: channel (signed records), limits (CPU-time limits per test), scoring (points, tables, results.json).

Commands for courses: gradescope, student_repo, points, batch and gradebook (a class on a cluster), times (record
the reference's time per test), new_exercise (the skeleton of a new exercise).
"""

__version__ = "0.1.0"
