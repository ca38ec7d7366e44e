"""The sandbox (grader/sandbox_process.py, grader/remote.py, grader/isolation.py): what crosses, what it cannot reach,
and forgeries graded end to end.

The first tests drive a real sandbox process over its real socket; the last ones run `python -m grader` on the
planted toy course with every exercise isolated ($INFERLAB_ISOLATE), one planted forgery per exercise
(tests/planted/forgeries/), and on exercise 01 with the sender rewrite of issue 22.
"""

import json
import os
import pickle
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

from grader import cli, isolation, limits
from grader.remote import HEADER, RemoteError, SandboxDied
from grader.sandbox_process import Sandbox

PLANTED = Path(__file__).resolve().parent / "planted"
STUDENT = '''
import os, sys, time
from fractions import Fraction


class CapacityError(ValueError):
    pass


class Cache:
    def __init__(self, n):
        if n <= 0:
            raise CapacityError(f"capacity must be positive, got {n}")
        self.keys = __import__("torch").zeros(3, n)
        self.seen = []

    def view(self, row):
        return self.keys[row]

    def fill(self, value):
        self.keys.fill_(value)
        return self

    def __len__(self):
        return self.keys.shape[1]


def echo(*args, **kwargs):
    return args, kwargs


def call_back(function, *args):
    return function(*args) + 1


def scale_in_place(x, factor):
    x.mul_(factor)


def spin():
    while True:
        pass


def crash():
    os._exit(3)


def environment():
    names = sorted(k for k in os.environ if k.startswith("INFERLAB"))
    return names, sorted(int(f) for f in os.listdir("/proc/self/fd"))


def draw(generator):
    return __import__("torch").rand(3, generator=generator)


def not_yet():
    raise NotImplementedError("write this")
'''


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    root = tmp_path_factory.mktemp("sandbox")
    (root / "student.py").write_text(STUDENT)
    sandbox = Sandbox(root)
    try:
        yield sandbox
    finally:
        sandbox.kill()


@pytest.fixture
def student(sandbox):
    """(the sandbox, the student's module in it): a fresh sandbox after a test that killed it."""
    yield sandbox, sandbox.load(sandbox.root / "student.py", "inferlab_test_student")
    sandbox.end_test()


def test_plain_values_cross_by_value(student):
    _, module = student
    values = (1, 2**70, -0.5, 1 + 2j, "text", b"bytes", None, True, [1, (2, 3)], {"a": {4}}, frozenset({5}),
              slice(1, None, 2), range(3), ..., torch.float16, torch.device("meta"), torch.Size([2, 3]))  # fmt: skip
    args, kwargs = module.echo(*values, key=[1])
    assert args == values and kwargs == {"key": [1]}
    assert type(args[1]) is int and type(args[8][1]) is tuple


def test_tensors_are_shared_and_views_stay_views(student):
    _, module = student
    cache = module.Cache(4)
    keys = cache.keys
    row = cache.view(1)
    assert row.data_ptr() == keys[1].data_ptr(), "a view the sandbox returns must be a view of the same storage here"
    cache.fill(7.0)
    assert torch.equal(keys, torch.full((3, 4), 7.0)), "the sandbox writes into the memory the test process sees"
    x = torch.ones(5)
    before = x.data_ptr()
    module.scale_in_place(x, 3)
    assert torch.equal(x, torch.full((5,), 3.0)), "an in-place change in the sandbox shows in the test's tensor"
    assert x.data_ptr() == module.echo(x)[0][0].data_ptr(), "a tensor that comes back home is the same storage"
    assert before != 0 and len(cache) == 4
    meta = torch.empty(2, 3, device="meta")
    assert module.echo(meta)[0][0].device.type == "meta"


def test_generators_cross_by_value_and_come_back_advanced(student):
    _, module = student
    generator, twin = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(module.draw(generator), torch.rand(3, generator=twin))
    assert torch.equal(module.draw(generator), torch.rand(3, generator=twin)), "the state the sandbox left came back"


def test_exceptions_keep_their_type_message_and_the_sandbox_traceback(student):
    _, module = student
    with pytest.raises(ValueError, match="capacity must be positive, got 0") as raised:
        module.Cache(0)
    assert "student.py" in str(raised.value.__cause__) and "CapacityError" in str(raised.value.__cause__)
    with pytest.raises(NotImplementedError) as raised:
        module.not_yet()
    assert "raise NotImplementedError" in raised.value.remote_frames[-1][3]
    with pytest.raises(AttributeError):
        module.missing_function  # noqa: B018


def test_callbacks_run_in_the_test_process_and_nest(student):
    _, module = student
    seen = []
    assert module.call_back(lambda x: seen.append(x) or x * 2, 20) == 41
    assert seen == [20], "the callback ran here, where the test reads its recording"
    assert module.call_back(lambda: module.call_back(lambda: 1)) == 3, "test -> sandbox -> test -> sandbox -> test"


def test_the_sandbox_has_no_grader_variables_and_only_its_two_descriptors(student, monkeypatch):
    sandbox, module = student
    names, fds = module.environment()
    assert names == [], f"the sandbox sees the grader's variables {names}"
    assert len([fd for fd in fds if fd > 2]) <= 3, f"the sandbox holds descriptors {fds}"  # socket, dump, listdir's


def test_a_hang_is_stopped_with_where_it_was_and_the_sandbox_replaced(student):
    sandbox, module = student
    began = time.monotonic()
    sandbox.begin_test(seed=1, limit=1.0)  # CPU seconds, the sandbox's counted as the test's
    with pytest.raises(limits.TimeLimitExceeded) as raised:
        module.spin()
    assert time.monotonic() - began < 10
    assert "student.py" in raised.value.sandbox_stack and "spin" in raised.value.sandbox_stack
    assert sandbox.process is None, "a sandbox stopped in the middle of a call is killed"
    sandbox.end_test()
    fresh = sandbox.load(sandbox.root / "student.py", "inferlab_test_student")
    assert fresh.echo(1) == ((1,), {}), "the next use starts a fresh sandbox"


def test_a_crash_costs_the_call_and_says_why(student):
    sandbox, module = student
    with pytest.raises(SandboxDied, match="exit"):
        module.crash()
    assert sandbox.load(sandbox.root / "student.py", "inferlab_test_student").echo(2) == ((2,), {})


def test_what_the_sandbox_sends_is_not_trusted(student):
    sandbox, module = student
    endpoint = sandbox.endpoint
    refused = []
    evil = pickle.dumps(("a", ("r", 1, 0, "x")), protocol=2).replace(b"\x80\x02", b"\x80\x02cos\nsystem\n", 1)
    for message in (evil, pickle.dumps(("a", ("y", 10**6)))):
        a, b = socket.socketpair()
        a.sendall(HEADER.pack(len(message), 0) + message)
        endpoint.connection.sock, saved = b, endpoint.connection.sock
        try:
            endpoint.depth = 1
            endpoint._receive() if message is evil else endpoint.decode(pickle.loads(message)[1], [])
        except (RemoteError, pickle.UnpicklingError) as exc:
            refused.append(str(exc))
        finally:
            endpoint.connection.sock = saved
            a.close()
            b.close()
    assert len(refused) == 2 and "refused" in refused[0] and "did not hand out" in refused[1], refused
    r, w = os.pipe()
    try:
        with pytest.raises(RemoteError, match="not a shared file"):
            endpoint._shared_storage([r], 0, 16)
    finally:
        os.close(r)
        os.close(w)


def test_isolation_switch_and_batches():
    assert isolation.isolated("01", "test_prefill_logits_match_transformers", "")
    assert not isolation.isolated("01", "test_append_work_is_proportional_to_the_new_tokens_not_the_cache", "")
    assert not isolation.isolated("01", "test_decode_speed", "gpu") and not isolation.isolated("03", "test_x", "")
    assert set(isolation.NOT_ISOLATED_YET).isdisjoint(isolation.ISOLATED)
    gpu_test = "test_awq_export_decodes_through_exercise_03s_gemv_like_its_fake_quantized_copy"
    assert not isolation.isolated("08", gpu_test, ""), "a GPU test stays in-process until the CUDA path is proven"


# --- graded end to end --------------------------------------------------------------------------------------------

LIMIT = 3  # seconds per test
# exercise: (submission, spec files, expected score, expected maximum, {test name: phrases its output must contain})
FORGERIES = {
    "40": ("submissions/10", "toy gpu host", 8, 8, {}),  # the control: correct, isolated, speed tests counted
    "41": ("forgeries/toy/sender_rewrite", "toy gpu host", 0, 8, {"test_host_speed": ["not counted"]}),
    "42": ("forgeries/toy/patch_pytest", "toy", 0, 6, {}),
    "43": ("forgeries/toy/inherited_fds", "toy", 0, 6, {}),
    "44": ("forgeries/toy/parent_memory", "toy", 0, 6, {}),
    "45": ("forgeries/toy/forked_helper", "toy", 0, 6, {}),
    "46": ("forgeries/toy/detects_grading", "toy", 0, 6, {}),
    "47": ("submissions/19", "toy", 6, 6, {}),  # writes into every pipe: in the sandbox there is none that matters
    "48": ("submissions/12", "toy", 5, 6, {"test_triple": [f"timed out after {LIMIT} s", "stopped in toy.py:",
                                                           "in triple()"]}),
    "49": ("submissions/14", "toy", 5, 6, {"test_scale": ["SIGSEGV", "segmentation fault"]}),
    "50": ("submissions/15", "toy", 0, 6, {"test_double": ["could not import", "SystemExit: 3"]}),
    "51": ("submissions/11", "toy", 0, 6, {"test_double": [f"timed out after {LIMIT} s"],
                                           "test_triple": [f"did not finish within {LIMIT} s"]}),
    "52": ("submissions/17", "toy", 4, 6, {"test_triple": ["SIGKILL", "out-of-memory killer"]}),
}  # fmt: skip
SPECS = {"toy": "toy_spec.py", "gpu": "toy_gpu_speed_spec.py", "host": "toy_host_speed_spec.py"}


def planted_course(root: Path, exercises: dict) -> Path:
    """The planted toy course (tests/planted/course) at `root`, one folder per exercise with its spec files, and each
    exercise's submission as solutions/NN/toy.py; returns the solutions folder."""
    spec = PLANTED / "course" / "spec"
    (root / "exercises").mkdir(parents=True)
    for name, target in (("conftest_course.py", "conftest.py"), ("fake_gpu.py", "fake_gpu.py")):
        shutil.copy(PLANTED / "course" / name, root / target)
    solutions = root.parent / "submissions"
    shutil.copytree(PLANTED / "submissions" / "10", solutions / "10")  # several submissions execute 10's file
    for exercise, (submission, specs, *_) in exercises.items():
        files = {f"test_{SPECS[k].removesuffix('_spec.py')}_{exercise}.py": spec / SPECS[k] for k in specs.split()}
        files["thresholds.toml"] = spec / "thresholds.toml"
        for target, source in files.items():
            (root / "exercises" / exercise).mkdir(exist_ok=True)
            shutil.copy(source, root / "exercises" / exercise / target)
        source = PLANTED / submission
        (solutions / exercise).mkdir(parents=True)
        source = source / "toy.py" if source.is_dir() else source.with_suffix(".py")
        shutil.copy(source, solutions / exercise / "toy.py")
    return solutions


@pytest.fixture(scope="module")
def forged(tmp_path_factory):
    root = tmp_path_factory.mktemp("forged") / "course"
    submissions = planted_course(root, FORGERIES)
    results, forge = root.parent / "out" / "results.json", root.parent / "forge"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "ROOT", root)
        patch.setenv("PLANTED_FORGE_PATH", str(forge))
        patch.setenv(isolation.ISOLATE_ENV, "all")
        began = time.monotonic()
        code = cli.main([*FORGERIES, "--impl", "solution", "--solutions", str(submissions), "--results", str(results),
                         "--test-timeout", str(LIMIT), "--jobs", "2", "--seed-secret", "forged",
                         "--", "-p", "no:hypothesispytest"])  # fmt: skip
        elapsed = time.monotonic() - began
    return dict(code=code, elapsed=elapsed, results=json.loads(results.read_text()), forge=forge)


@pytest.mark.parametrize("exercise", FORGERIES)
def test_each_forgery_scores_only_what_it_earned(forged, exercise):
    _, _, earned, possible, phrases = FORGERIES[exercise]
    tests = {t["name"].split(" ", 1)[1]: t for t in forged["results"]["tests"] if t["tags"][0] == exercise}
    total = (sum(t["score"] for t in tests.values()), sum(t["max_score"] for t in tests.values()))
    shown = "; ".join(f"{name}: {t['score']:g}/{t['max_score']:g} {t['output'][:200]!r}" for name, t in tests.items())
    assert total == (earned, possible), f"exercise {exercise}: expected {earned} / {possible}, got {total}: {shown}"
    missing = [f"{name}: {p!r}" for name, needed in phrases.items() for p in needed if p not in tests[name]["output"]]
    assert not missing, f"exercise {exercise}: phrases missing from the output ({missing}): {shown}"


def test_the_forged_run_ends_and_no_helper_outlives_it(forged):
    assert forged["code"] == 0 and forged["elapsed"] < 900, f"the forged run took {forged['elapsed']:.0f} s"
    time.sleep(2)  # the helper writes a second after its test process is gone, if it is still alive
    assert not Path(str(forged["forge"]) + "-isolated").exists(), "a helper forked in the sandbox outlived the run"


def test_the_sender_rewrite_of_issue_22_scores_zero_on_exercise_01(tmp_path, monkeypatch):
    """The 25-line forgery that scored 76 / 76 when the student's module ran in the test process."""
    root = tmp_path / "course"
    (root / "exercises").mkdir(parents=True)
    shutil.copytree(cli.GRADER_HOME / "exercises" / "01", root / "exercises" / "01")
    for name in ("conftest.py", "pyproject.toml"):
        shutil.copy(cli.GRADER_HOME / name, root / name)
    shutil.copytree(cli.GRADER_HOME / "fixtures", root / "fixtures")
    monkeypatch.setattr(cli, "ROOT", root)
    results = tmp_path / "results.json"
    assert cli.main(["01", "--impl", "solution", "--solutions", str(PLANTED / "forgeries"), "--results",
                     str(results)]) == 0  # fmt: skip
    data = json.loads(results.read_text())
    passed = [t["name"] for t in data["tests"] if t["score"] > 0]
    assert data["score"] == 0 and not passed, f"the sender rewrite earned {data['score']}: {passed}"
    assert len(data["tests"]) >= 70

