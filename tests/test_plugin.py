"""The grader plugin, end to end, on throwaway courses made with pytester."""

import json
import textwrap

import pytest

# pytester's in-process runs drop modules first imported inside them; a native extension such as triton's aborts
# when imported a second time, so anything the inner runs might import is imported here first.
torch = pytest.importorskip("torch")
try:
    import triton  # noqa: F401
except ImportError:
    pass

GPU = torch.cuda.is_available()  # the toy course's speed test runs on a GPU and is skipped elsewhere

STUB = '''
def double(x):
    """Return 2 * x."""
    raise NotImplementedError("double: multiply by two")
'''
SOLUTION = """
def double(x):
    return 2 * x
"""
TESTS = """
import pytest

@pytest.fixture
def mod(impl):
    return impl("doubling")

@pytest.mark.points(3)
def test_doubles(mod):
    assert mod.double(2) == 4

def test_doubles_negative(mod):
    assert mod.double(-1) == -2

@pytest.mark.speed
def test_fast(mod, speed):
    speed.judge("speedup", mod.double(5.0))
"""
THRESHOLDS = """
[speedup]
what = "speedup over a baseline"
student = 2.0
solution = 4.0
"""


def expect(result, passed=0, failed=0):
    """Outcomes of the toy course: two correctness tests as given, and the speed test with them on a GPU."""
    speed_passes = passed > 0
    counts = dict(passed=passed + (GPU and speed_passes), failed=failed + (GPU and not speed_passes))
    result.assert_outcomes(**counts, skipped=0 if GPU else 1, errors=0)


@pytest.fixture
def course(pytester):
    """A course with one exercise, a stub, a solution and the grader plugin registered as in the repo."""
    pytester.makeconftest('pytest_plugins = ["grader.plugin"]')
    (pytester.path / "exercises" / "07").mkdir(parents=True)
    (pytester.path / "solutions" / "07").mkdir(parents=True)
    (pytester.path / "exercises/07/doubling.py").write_text(STUB)
    (pytester.path / "exercises/07/test_doubling.py").write_text(TESTS)
    (pytester.path / "exercises/07/thresholds.toml").write_text(THRESHOLDS)
    (pytester.path / "solutions/07/doubling.py").write_text(SOLUTION)
    return pytester


def test_stub_fails_every_test_with_the_hint(course):
    result = course.runpytest("-p", "no:cacheprovider")
    expect(result, failed=2)
    result.stdout.fnmatch_lines(["*not implemented yet: doubling.py:4 in double()*", "*double: multiply by two*"])
    result.stdout.fnmatch_lines(["*inferlab score (student implementation)*", f"07 *0 / {5 if GPU else 4}*"])


def test_solution_passes_and_scores_points(course):
    result = course.runpytest("--impl=solution")
    expect(result, passed=2)
    result.stdout.fnmatch_lines(["07 *5 / 5*" if GPU else "07 *4 / 4*"])


def test_impl_can_come_from_the_environment(course, monkeypatch):
    monkeypatch.setenv("INFERLAB_IMPL", "solution")
    expect(course.runpytest(), passed=2)


def test_private_solutions_tree(course, tmp_path):
    private = tmp_path / "private" / "07"
    private.mkdir(parents=True)
    private.joinpath("doubling.py").write_text("def double(x):\n    return x + x\n")
    (course.path / "solutions/07/doubling.py").unlink()
    expect(course.runpytest("--impl=solution", f"--solutions={tmp_path / 'private'}"), passed=2)


def test_missing_module_is_one_clear_failure_per_test_not_a_collection_error(course):
    (course.path / "exercises/07/doubling.py").unlink()
    result = course.runpytest()
    expect(result, failed=2)
    result.stdout.fnmatch_lines(["*student module not found: *exercises/07/doubling.py*"])


def test_broken_module_is_reported_with_its_error(course):
    (course.path / "exercises/07/doubling.py").write_text("def double(x)\n    return 2 * x\n")
    result = course.runpytest()
    expect(result, failed=2)
    result.stdout.fnmatch_lines(["*could not import *doubling.py*", "*SyntaxError*"])


def test_speed_tests_are_skipped_without_cuda_with_a_reason(course):
    if GPU:
        pytest.skip("this machine has a GPU")
    result = course.runpytest("--impl=solution", "-rs")
    result.stdout.fnmatch_lines(["*speed not graded on this hardware: no CUDA GPU*"])
    result.stdout.fnmatch_lines([  # under the score table, so that "4 / 4" does not read as done
        "07 *4 / 4*", "total*", "not graded here: 1 test (speed not graded on this hardware: no CUDA GPU)",
        "the score counts only what ran: run on a CUDA GPU to be graded for speed too",
    ])  # fmt: skip


def test_results_json_is_gradescope_format(course):
    results = course.path / "out" / "results.json"
    course.runpytest("--impl=solution", f"--results={results}")
    data = json.loads(results.read_text())
    assert data["score"] == (5.0 if GPU else 4.0)
    assert {"score", "execution_time", "output", "visibility", "stdout_visibility", "tests"} <= data.keys()
    by_name = {t["name"]: t for t in data["tests"]}
    assert by_name["07 test_doubles"]["max_score"] == 3.0 and by_name["07 test_doubles"]["score"] == 3.0
    if GPU:
        assert (
            by_name["07 test_fast"]["score"] == 1.0
            and "speedup over a baseline: 10" in by_name["07 test_fast"]["output"]
        )
    else:
        assert by_name["07 test_fast"]["max_score"] == 0.0, "a skipped speed test must not count as possible points"
        assert by_name["07 test_fast"]["output"].startswith("skipped: ")


def test_deselected_tests_are_not_scored(course):
    result = course.runpytest("--impl=solution", "-k", "negative")
    result.stdout.fnmatch_lines(["07 *1 / 1*"])


def test_cli_grades_and_exits_zero_whatever_the_score(course, monkeypatch, tmp_path):
    from grader import cli

    monkeypatch.setattr(cli, "ROOT", course.path)
    assert cli.main(["07"]) == 0
    assert cli.main(["07", "--strict"]) == 1
    assert cli.main(["07", "--impl", "solution", "--strict", "--results", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["score"] == (5.0 if GPU else 4.0)
    with pytest.raises(SystemExit):
        cli.main(["99"])
    assert cli.main(["07", "--results", str(tmp_path / "x.json"), "--", "-x"]) == 0  # the stub, stopping early
    outputs = [t["output"] for t in json.loads((tmp_path / "x.json").read_text())["tests"]]
    assert "not implemented yet" in outputs[0] and outputs[1].startswith("not run: the test session stopped")


def test_cli_keeps_grading_when_a_test_crashes_its_process(course, monkeypatch, tmp_path):
    """A crash costs the test in flight; the tests after it run again in a fresh process; the maximum stays."""
    from grader import cli

    (course.path / "exercises/08").mkdir()
    (course.path / "solutions/08").mkdir()
    (course.path / "solutions/08/crash.py").write_text("import os\n\n\ndef double(x):\n    os.abort()\n")
    (course.path / "exercises/08/test_crash.py").write_text(
        "def test_crash(impl):\n    impl('crash').double(1)\n\ndef test_other(impl):\n    pass\n"
    )
    monkeypatch.setattr(cli, "ROOT", course.path)
    results = tmp_path / "r.json"
    assert cli.main(["--impl", "solution", "--results", str(results)]) == 0
    tests = {t["name"]: t for t in json.loads(results.read_text())["tests"]}
    assert tests["07 test_doubles"]["score"] == 3.0, "exercise 07 must keep its points when exercise 08 crashes"
    assert tests["08 test_other"]["score"] == 1.0 and tests["08 test_other"]["max_score"] == 1.0
    assert tests["08 test_crash"]["max_score"] == 1.0 and "crashed" in tests["08 test_crash"]["output"]
    assert "SIGABRT" in tests["08 test_crash"]["output"]


def test_a_test_stopped_inside_an_import_leaves_the_rest_to_a_fresh_process(course, monkeypatch, tmp_path):
    """A limit that stops an import halfway leaves the process's modules half-made (an H100 run lost 33 tests of
    exercise 01 to one cold `transformers` import stopped this way): the tests after it run in a fresh process."""
    from grader import cli

    package = course.path / "exercises/08/halfway"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("state = {'whole': True}\n")
    (package / "slow.py").write_text("import halfway\n\nhalfway.state['whole'] = False\nwhile True:\n    pass\n")
    (course.path / "solutions/08").mkdir()
    (course.path / "exercises/08/test_import.py").write_text(
        "def test_slow_import(impl):\n    import halfway.slow  # noqa: F401\n\n"
        "def test_after(impl):\n    import halfway\n    assert halfway.state['whole']\n"
    )
    monkeypatch.setattr(cli, "ROOT", course.path)
    results = tmp_path / "r.json"
    assert cli.main(["08", "--impl", "solution", "--test-timeout", "2", "--results", str(results)]) == 0
    tests = {t["name"]: t for t in json.loads(results.read_text())["tests"]}
    assert "timed out" in tests["08 test_slow_import"]["output"]
    assert tests["08 test_after"]["score"] == 1.0, tests["08 test_after"]["output"]


def test_tests_that_never_ran_earn_nothing(course):
    results = course.path / "r.json"
    course.runpytest("--impl=solution", "--collect-only", f"--results={results}")
    data = json.loads(results.read_text())
    assert data["score"] == 0.0 and {t["max_score"] for t in data["tests"]} >= {3.0, 1.0}


def test_collect_only_prints_what_is_graded_not_a_failing_score(course):
    result = course.runpytest("--collect-only", "-q")
    result.stdout.fnmatch_lines(["inferlab: 2 graded tests collected, worth 4 points (nothing ran*"] if not GPU else
                                ["inferlab: 3 graded tests collected, worth 5 points (nothing ran*"])  # fmt: skip
    assert "inferlab score" not in result.stdout.str() and "0 / " not in result.stdout.str()


HANGING = """
import pytest

def test_loops(impl):
    impl("doubling").double(1)
    while True:
        pass

@pytest.mark.time_limit(30)
def test_long_but_allowed(impl):
    assert impl("doubling").double(1) == 2

def test_after(impl):
    assert impl("doubling").double(2) == 4
"""


def test_a_test_past_its_limit_fails_alone_and_says_so(course):
    """The in-process limit (SIGPROF, on CPU time) stops a Python loop, names where it was, and the session goes on."""
    (course.path / "exercises/07/test_hang.py").write_text(HANGING)
    result = course.runpytest("--impl=solution", "--test-timeout=1", "exercises/07/test_hang.py")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*timed out after 1 s: the test did not finish within its time limit (CPU time). It "
                                 "was stopped in test_hang.py:? in test_loops()*"])  # fmt: skip


def test_a_replaced_comparison_fails_the_test_and_is_put_back(course):
    (course.path / "solutions/07/doubling.py").write_text(
        "import torch\n\ntorch.testing.assert_close = lambda *a, **k: None\n\n\ndef double(x):\n    return 2 * x\n"
    )
    (course.path / "exercises/07/test_close.py").write_text(
        "import torch\n\ndef test_first(impl):\n    impl('doubling')\n\n"
        "def test_close(impl):\n    torch.testing.assert_close(torch.ones(1), torch.zeros(1))\n"
    )
    result = course.runpytest("--impl=solution", "exercises/07/test_close.py")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*the grading helpers were modified while this test ran (torch.testing.assert_close*"])
    assert "Tensor-likes are not close" in result.stdout.str(), "the real assert_close must be back for later tests"


POISONING = """
def test_breaks_the_context(impl):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")

def test_after(impl):
    assert impl("doubling").double(2) == 4
"""


def test_after_a_broken_cuda_context_the_next_tests_say_why_they_did_not_run(course):
    (course.path / "exercises/07/test_poison.py").write_text(POISONING)
    result = course.runpytest("--impl=solution", "exercises/07/test_poison.py")
    result.assert_outcomes(failed=1, errors=1)
    result.stdout.fnmatch_lines(["*the CUDA context was broken by an earlier test (*test_breaks_the_context)*"])


def test_a_skip_raised_by_the_code_under_test_is_a_failure(course):
    (course.path / "solutions/07/doubling.py").write_text("import pytest\n\ndef double(x):\n    pytest.skip('no')\n")
    result = course.runpytest("--impl=solution")
    expect(result, failed=2)
    result.stdout.fnmatch_lines(["*skipped while running, which counts as a failure*"])


def test_tests_outside_exercises_may_skip_themselves(course):
    course.makepyfile(test_outside="import pytest\n\ndef test_later():\n    pytest.skip('not today')\n")
    course.runpytest("test_outside.py").assert_outcomes(skipped=1)


def test_a_module_that_skips_itself_is_a_failure(course):
    (course.path / "solutions/07/doubling.py").write_text(
        "import pytest\n\npytest.skip('x', allow_module_level=True)\n"
    )
    expect(course.runpytest("--impl=solution"), failed=2)


def test_not_implemented_from_a_library_keeps_its_traceback(course):
    """Only a stub's own `raise NotImplementedError` reads as "not implemented yet"."""
    (course.path / "solutions/07/doubling.py").write_text(
        "import io\n\n\ndef double(x):\n    io.RawIOBase().readinto(bytearray(1))\n"
    )
    result = course.runpytest("--impl=solution")
    expect(result, failed=2)
    assert "not implemented yet" not in result.stdout.str()
    result.stdout.fnmatch_lines(["*NotImplementedError*"])


def test_plugin_is_registered_once_when_installed_and_from_the_conftest(course):
    """The entry point is named after the module, so both registrations resolve to one plugin."""
    course.makeconftest(
        textwrap.dedent(
            """
            pytest_plugins = ["grader.plugin"]

            def pytest_configure(config):
                import grader.plugin
                assert config.pluginmanager.get_plugin("grader.plugin") is grader.plugin
            """
        )
    )
    expect(course.runpytest("--impl=solution"), passed=2)


HOST_SPEED_TESTS = """
def test_host_ratio(impl, host_speed):
    double = impl("doubling").double
    timings = host_speed.compare({"one": (double, lambda: ((1,), {})), "two": (double, lambda: ((2,), {}))}, rounds=5)
    assert set(timings) == {"one", "two"} and all(len(t.samples) == 5 for t in timings.values())
    host_speed.judge("speedup", double(2.5))
"""


def test_host_speed_is_graded_on_any_machine_and_says_where_it_ran(course):
    (course.path / "exercises/07/test_host.py").write_text(HOST_SPEED_TESTS)
    passed = course.runpytest("--impl=solution", "exercises/07/test_host.py")  # 5.0 against the solution's 4.0
    passed.assert_outcomes(passed=1)
    passed.stdout.fnmatch_lines(["*07 test_host_ratio*5*≥ 4*pass*"])
    failed = course.runpytest("--impl=solution", "exercises/07/test_host.py", "--benchmark-disable")
    failed.assert_outcomes(passed=1)  # timing still runs when pytest-benchmark is off
    (course.path / "exercises/07/thresholds.toml").write_text(THRESHOLDS.replace("4.0", "6.0"))
    failed = course.runpytest("--impl=solution", "exercises/07/test_host.py")
    failed.assert_outcomes(failed=1)
    failed.stdout.fnmatch_lines(["*speedup over a baseline: measured 5, needs ≥ 6*host CPU*"])
