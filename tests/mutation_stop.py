"""A pytest plugin for mutant runs: stop the session at the first failure that names the mutant's mistake.

tests/mutation.py loads it (`-p mutation_stop`) with the phrase in $INFERLAB_MUTANT_DIAGNOSIS. A failure that does
not name it lets the run go on, so that a later test can; tests left unrun are not counted as failures.
"""

import os

import pytest

PHRASE_ENV = "INFERLAB_MUTANT_DIAGNOSIS"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    phrase = os.environ.get(PHRASE_ENV, "").lower()
    if phrase and report.failed and phrase in f"{item.name}\n{report.longreprtext}".lower():
        item.session.shouldstop = "the mutant's mistake was named"
    return report
