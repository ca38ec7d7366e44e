"""inferlab's grader: a pytest plugin that grades exercises on correctness everywhere and on speed on GPUs.

Split by concern: `plugin` (hooks and options), `impl` (which code the tests exercise), `device` (CUDA, the Triton
interpreter, the session header), `timing` (CUDA-event timing), `thresholds` (speed thresholds per exercise),
`speed` (the fixture that times and judges), `scoring` (points, tables, results.json) and `cli`.
"""

__version__ = "0.1.0"
