"""Registers the grader plugin when the repo runs from a clone, without installing anything.

An installed copy registers the same module through its `pytest11` entry point, named `grader.plugin`, so pytest
sees it once either way.

It also keeps a run's tool state out of the course's tree: pytest-benchmark creates `.benchmarks/` at every start
(the course saves no benchmark runs: results go to `--benchmark-json`), and hypothesis keeps its example database and
caches in `.hypothesis/`: both go to the temp dir instead.
"""

import os
import tempfile

import pytest

pytest_plugins = ["grader.plugin"]


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "benchmark_storage", None) == "file://./.benchmarks":
        config.option.benchmark_storage = "file://" + os.path.join(tempfile.gettempdir(), "inferlab-benchmarks")
    if config.pluginmanager.has_plugin("hypothesispytest"):
        from hypothesis.configuration import set_hypothesis_home_dir

        set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "inferlab-hypothesis"))
