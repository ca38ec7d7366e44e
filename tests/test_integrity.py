"""The pieces that keep a grade from being forged: the signed channel, the guard of the grading helpers, the secret
seed, and the confinement of a test process's writes. (End to end, with planted submissions: tests/test_planted.py.)
"""

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from grader.channel import Receiver, Sender, new_key
from grader.child import _Follower
from grader.guard import Guard, modified_message
from grader.seeding import Seeding, mix

# --- the channel: signed, numbered records ---------------------------------------------------------------------


def channel():
    key = new_key()
    read, write = os.pipe()
    return Sender(write, key), Receiver(key), read


def received(sender_records, extra: bytes = b""):
    sender, receiver, read = channel()
    for kind, fields in sender_records:
        sender.send(kind, **fields)
    os.write(sender._fd, extra)
    os.close(sender._fd)
    data = b"".join(iter(lambda: os.read(read, 65536), b""))
    os.close(read)
    records = receiver.feed(data)
    receiver.finish()
    return records, receiver.rejected


def test_signed_records_arrive_in_order():
    records, rejected = received([("collected", {"nodeids": ["a"]}), ("start", {"nodeid": "a"})])
    assert [(r.seq, r.kind) for r in records] == [(0, "collected"), (1, "start")] and not rejected


@pytest.mark.parametrize(
    "junk, why",
    [
        (b'2 0000 {"kind":"result"}\n', "wrong signature"),
        (b"not a record\n", "not a record"),
        (b'2 abcd {"kind"', "unterminated"),
    ],
)
def test_anything_not_signed_with_the_key_is_rejected(junk, why):
    records, rejected = received([("collected", {"nodeids": []}), ("start", {"nodeid": "a"})], junk)
    assert len(records) == 2 and len(rejected) == 1 and why in rejected[0], rejected


def test_a_replayed_record_is_rejected_and_so_is_everything_after_it():
    sender, receiver, read = channel()
    sender.send("collected", nodeids=[])
    sender.send("start", nodeid="a")
    os.close(sender._fd)
    lines = b"".join(iter(lambda: os.read(read, 65536), b"")).splitlines(keepends=True)
    records = receiver.feed(lines[0] + lines[1] + lines[1] + lines[0])
    assert [r.seq for r in records] == [0, 1] and "replayed or reordered" in receiver.rejected[0]
    assert len(receiver.rejected) == 2, "a line after a rejected one is rejected too"


def follow(*records):
    """Feed records (kind, fields) to the parent's checker; return its run."""
    follower = _Follower({"run": ["t1", "t2"]}, {"t1": 1.0, "t2": 1.0})
    for seq, (kind, fields) in enumerate(records):
        follower.handle(type("Record", (), {"seq": seq, "kind": kind, "fields": fields})())
    return follower


RESULT = {"nodeid": "t1", "exercise": "07", "name": "t1", "points": 1.0, "outcome": "passed", "message": ""}


@pytest.mark.parametrize(
    "records, why",
    [
        ([("start", {"nodeid": "t1"})], "record number 0"),
        ([("collected", {"nodeids": ["t1", "t2"]}), ("start", {"nodeid": "t2"})], "out of the plan's order"),
        ([("collected", {"nodeids": ["t1", "t2"]}), ("result", {"nodeid": "t1", "test": RESULT})], "not the test in"),
        ([("collected", {"nodeids": ["t1", "t2"]}), ("start", {"nodeid": "t1"}), ("result", {"nodeid": "t1", "test":
          RESULT}), ("result", {"nodeid": "t1", "test": RESULT})], "not the test in flight"),
        ([("collected", {"nodeids": ["t1", "t2"]}), ("start", {"nodeid": "t1"}),
          ("result", {"nodeid": "t1", "test": {**RESULT, "nodeid": "t2"}})], "whose test is"),
        ([("collected", {"nodeids": ["t1"]}), ("collected", {"nodeids": ["t1"]})], "record number 1"),
    ],
    ids=["start before collection", "out of order", "result before start", "duplicate", "other test", "twice"],
)  # fmt: skip
def test_the_parent_rejects_records_that_do_not_fit_the_run(records, why):
    follower = follow(*records)
    assert follower.run.ending == "forged" and why in follower.run.rejected[0], follower.run.rejected


def test_records_after_done_change_nothing():
    follower = follow(("collected", {"nodeids": ["t1"]}), ("start", {"nodeid": "t1"}),
                      ("result", {"nodeid": "t1", "test": RESULT}), ("done", {}),
                      ("result", {"nodeid": "t1", "test": {**RESULT, "outcome": "failed"}}))  # fmt: skip
    assert follower.run.results["t1"].outcome == "passed" and follower.run.after_done


# --- the guard: the grading helpers are what they were --------------------------------------------------------


@pytest.fixture
def guard():
    guard = Guard()
    guard.snapshot()
    yield guard
    guard.restore()


def test_a_replaced_helper_is_named_and_put_back(guard):
    original = torch.testing.assert_close
    torch.testing.assert_close = lambda *a, **k: None
    torch.Tensor.allclose = lambda *a, **k: True  # shadows the method torch.Tensor inherits
    changed = guard.modified()
    assert "torch.testing.assert_close" in changed and "torch.Tensor.allclose" in changed
    assert "the grading helpers were modified" in modified_message(changed)
    guard.restore()
    assert torch.testing.assert_close is original and "allclose" not in vars(torch.Tensor)
    assert guard.modified() == []


def test_the_graders_own_globals_and_clocks_are_watched(guard, monkeypatch):
    import time

    from grader import scoring, timing

    monkeypatch.setattr(time, "perf_counter", lambda: 0.0)
    monkeypatch.setattr(scoring.Scoreboard, "record_phase", lambda *a: None)
    monkeypatch.setattr(timing, "perf_counter", lambda: 0.0)
    assert {"time.perf_counter", "grader.scoring.Scoreboard.record_phase", "grader.timing.perf_counter"} <= set(
        guard.modified()
    )


def test_a_wrapper_that_pretends_to_be_the_original_is_still_caught(guard, monkeypatch):
    import functools

    fake = functools.wraps(torch.testing.assert_close)(lambda *a, **k: None)
    monkeypatch.setattr(torch.testing, "assert_close", fake)
    assert guard.modified() == ["torch.testing.assert_close"]


def test_overrides_the_grader_installs_are_expected(guard):
    seeding = Seeding("secret")
    seeding.begin("t")
    try:
        assert "torch.manual_seed" in guard.modified(), "without overrides, the seeding's patch is a change"
        assert guard.modified(seeding.overrides) == []
    finally:
        seeding.end()


# --- the secret seed -------------------------------------------------------------------------------------------


def draws():
    return (torch.randn(3, generator=torch.Generator().manual_seed(7)).tolist(),
            random.Random(7).random(), torch.manual_seed(7) and torch.rand(2).tolist())  # fmt: skip


def test_a_secret_changes_every_seeded_draw_and_keeps_it_repeatable():
    public = draws()
    seeding = Seeding("course secret")
    seeding.begin("exercises/01/test_x.py::test_y")
    try:
        secret = draws()
        again = draws()
        generator = torch.Generator()
        assert isinstance(generator, torch.Generator) and isinstance(torch.default_generator, torch.Generator)
        assert isinstance(random.Random(1), random.Random)
    finally:
        seeding.end()
    assert secret == again, "the same seed must give the same inputs within a run"
    names = ("Generator().manual_seed", "random.Random", "torch.manual_seed")
    for name, a, b in zip(names, public, secret, strict=True):
        assert a != b, f"{name}(7) gave the public stream under a secret"
    assert draws() == public, "seeds are left alone once the test is over"
    assert torch.Generator is torch._C.Generator and random.Random.__module__ == "random"


def test_a_test_with_public_seeds_keeps_them_under_a_secret():
    public = draws()
    seeding = Seeding("course secret")
    seeding.begin("exercises/08/test_q.py::test_hand_picked", mix_secret=False)
    try:
        assert draws() == public and not seeding.overrides
    finally:
        seeding.end()


def test_without_a_secret_only_the_global_generators_are_seeded_per_test():
    seeding = Seeding(None)
    seeding.begin("a")
    first = torch.rand(2).tolist(), random.random()
    seeding.end()
    seeding.begin("a")
    assert (torch.rand(2).tolist(), random.random()) == first, "a test sees the same inputs in any order"
    assert not seeding.overrides and torch.Generator is torch._C.Generator
    seeding.end()
    assert mix("s", 1) != mix("t", 1) and mix("s", 1) != mix("s", 2) and 0 <= mix("s", 1) < 2**63


def test_hypothesis_examples_depend_on_the_secret():
    hypothesis_core = pytest.importorskip("hypothesis.core")

    def f():
        pass

    public = hypothesis_core.function_digest(f)
    seeding = Seeding("secret")
    seeding.begin("t")
    try:
        assert hypothesis_core.function_digest(f) != public
    finally:
        seeding.end()
    assert hypothesis_core.function_digest(f) == public


# --- confinement: a test process does not write the course ------------------------------------------------------


def test_a_test_process_cannot_write_under_the_root(tmp_path):
    (tmp_path / "grader.py").write_text("x = 1\n")
    script = textwrap.dedent(
        f"""
        import os, shutil, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from grader.confine import confine_writes
        confine_writes({str(tmp_path)!r})
        refused = []
        for attempt in (lambda: open({str(tmp_path / "grader.py")!r}, "w"),
                        lambda: os.open({str(tmp_path / "new.py")!r}, os.O_WRONLY | os.O_CREAT),
                        lambda: os.remove({str(tmp_path / "grader.py")!r}),
                        lambda: os.rename({str(tmp_path / "grader.py")!r}, {str(tmp_path / "x.py")!r})):
            try:
                attempt()
            except PermissionError:
                refused.append(1)
        os.makedirs({str(tmp_path / ".hypothesis")!r})
        open({str(tmp_path / ".hypothesis" / "db")!r}, "w").write("examples")
        open({str(tmp_path / "grader.py")!r}).read()
        print(len(refused))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "4", out.stderr
    assert (tmp_path / "grader.py").read_text() == "x = 1\n"
