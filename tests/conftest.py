"""The grader's own tests import their helpers (tests/mutation.py) by module name."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
