"""The results channel: how a test process tells the grader what happened, in records the grader can check.

The parent (`python -m grader`) opens a pipe and hands its write end to the child pytest process, along with a
per-run key sent through a second pipe that the child reads and closes before any student code is imported. The
child sends one line per event as it happens: `collected`, then `start` and `result` for each test, `importing` and
`imported` around each student module, `done` at the end. Each line is a JSON record with a sequence number and an
HMAC-SHA256 of both under the key.

The parent accepts a record only if its MAC is right, its sequence number is the next one, and it fits the run: a
`result` must be for the test that `start`ed last, once; a `start` must be the next test of the plan; nothing may
follow `done`. So an `atexit` hook, a file rewritten after the fact, or a line written into the inherited pipe by the
code under test is rejected (grader/supervisor.py decides what a rejection costs). What the key cannot stop is code
that reads it out of the child's memory: in an isolated exercise (grader/isolation.py) the student's code runs in a
sandbox process that holds neither the key nor the pipe, and cannot read the test process's memory; in the batches
that still import it into the test process (speed tests, in-process instrumentation), it can, and those tests earn
their points only when the isolated correctness tests of their exercise all passed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field

KEY_BYTES = 32
CHANNEL_FD_ENV = "INFERLAB_GRADER_CHANNEL_FD"
KEY_FD_ENV = "INFERLAB_GRADER_KEY_FD"
TRACEBACK_FD_ENV = "INFERLAB_GRADER_TRACEBACK_FD"
PLAN_ENV = "INFERLAB_GRADER_PLAN"
MAX_LINE = 1 << 20  # a record longer than this is not one of ours


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def _mac(key: bytes, seq: int, payload: bytes) -> str:
    return hmac.new(key, str(seq).encode() + b"\0" + payload, hashlib.sha256).hexdigest()


class Sender:
    """The child's end: signs and writes records. Writes go straight to the file descriptor, unbuffered."""

    def __init__(self, fd: int, key: bytes):
        self._fd = fd
        self._key = key
        self._seq = 0

    def send(self, kind: str, **fields) -> None:
        payload = json.dumps({"kind": kind, **fields}, separators=(",", ":"), default=str).encode()
        line = b"%d %s %s\n" % (self._seq, _mac(self._key, self._seq, payload).encode(), payload)
        self._seq += 1
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view) :]


@dataclass
class Record:
    seq: int
    kind: str
    fields: dict


@dataclass
class Receiver:
    """The parent's end: splits the byte stream into lines and verifies each one.

    `feed` returns the verified records; a line that fails verification lands in `rejected` with the reason, and
    every later line is rejected too (the stream cannot be trusted past the first bad line).
    """

    key: bytes
    rejected: list[str] = field(default_factory=list)
    _buffer: bytes = b""
    _next_seq: int = 0

    def feed(self, data: bytes) -> list[Record]:
        self._buffer += data
        records = []
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            record = self._verify(line)
            if record is not None:
                records.append(record)
        if len(self._buffer) > MAX_LINE:
            self._reject(f"an unterminated line of {len(self._buffer)} bytes")
            self._buffer = b""
        return records

    def finish(self) -> None:
        """The stream ended: a partial last line is a rejection (a record cut off, or junk written into the pipe)."""
        if self._buffer.strip():
            self._reject(f"an unterminated line at the end: {self._buffer[:80]!r}")
        self._buffer = b""

    def _verify(self, line: bytes) -> Record | None:
        if self.rejected:
            self._reject(f"a line after a rejected one: {line[:80]!r}")
            return None
        try:
            seq_text, mac, payload = line.split(b" ", 2)
            seq = int(seq_text)
        except ValueError:
            self._reject(f"a line that is not a record: {line[:80]!r}")
            return None
        if not hmac.compare_digest(mac.decode(errors="replace"), _mac(self.key, seq, payload)):
            self._reject(f"a record with a wrong signature: {line[:80]!r}")
            return None
        if seq != self._next_seq:
            self._reject(f"record number {seq} where {self._next_seq} was due (replayed or reordered)")
            return None
        self._next_seq += 1
        try:
            fields = json.loads(payload)
            kind = fields.pop("kind")
        except (ValueError, KeyError, AttributeError):
            self._reject(f"a signed record that is not valid: {payload[:80]!r}")
            return None
        return Record(seq, kind, fields)

    def _reject(self, why: str) -> None:
        self.rejected.append(why)
