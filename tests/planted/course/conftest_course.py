"""The planted course's conftest.py (copied in under that name): the grader plugin, and a fake GPU so that speed
tests run on any machine.

It stands in for the instructor's side (trusted): it is loaded before any student code, like the repo's own
conftest.py. The fake GPU (fake_gpu.py) times with the host clock and has no L2 to flush.
"""

import fake_gpu

fake_gpu.install()

pytest_plugins = ["grader.plugin"]
