"""Registers the grader plugin when the repo runs from a clone, without installing anything.

An installed copy registers the same module through its `pytest11` entry point, named `grader.plugin`, so pytest
sees it once either way.

It also keeps a run's tool state out of the course's tree: pytest-benchmark creates `.benchmarks/` at every start
(the course saves no benchmark runs: results go to `--benchmark-json`), and hypothesis keeps its example database and
caches in `.hypothesis/`: both go to the temp dir instead.

Under pytest-xdist (`pytest -n 2`), the workers' markers are taken out of the environment that processes started by
a test inherit: pytest-benchmark switches itself off in any process that sees PYTEST_XDIST_WORKER, so the
grader runs a test starts (planted faults, forgeries, a class's submissions) would lose their speed tests. The
worker itself still knows it is one (xdist's `workerinput`), and the grader self-times speed there.
"""

import os
import tempfile

import pytest

pytest_plugins = ["grader.plugin"]


XDIST_MARKERS = ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    for name in XDIST_MARKERS:
        os.environ.pop(name, None)
    if getattr(config.option, "benchmark_storage", None) == "file://./.benchmarks":
        config.option.benchmark_storage = "file://" + os.path.join(tempfile.gettempdir(), "inferlab-benchmarks")
    if config.pluginmanager.has_plugin("hypothesispytest"):
        from hypothesis.configuration import set_hypothesis_home_dir

        set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "inferlab-hypothesis"))
