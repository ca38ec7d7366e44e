"""Exercise 05 reference: an iteration-level scheduler with a token budget, chunked prefill and preemption.

Same public API as exercises/05/scheduler.py, whose docstrings are the specification.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

POLICIES = ("fcfs", "priority")


@dataclass
class Request:
    """One request: its sizes, and its progress (which only the scheduler changes)."""

    request_id: int
    prompt_len: int
    output_len: int
    arrival: float = 0.0
    priority: int = 0
    num_computed: int = 0
    num_output: int = 0
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + self.num_output

    @property
    def finished(self) -> bool:
        return self.num_output >= self.output_len


@dataclass
class SchedulerOutput:
    """What one step computes: {request_id: tokens} in schedule order, and who was preempted in this step."""

    num_scheduled_tokens: dict[int, int] = field(default_factory=dict)
    preempted: list[int] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


def blocks_for(num_tokens: int, block_size: int) -> int:
    """KV blocks that hold `num_tokens` tokens: ceil(num_tokens / block_size)."""
    return -(-num_tokens // block_size)


class Scheduler:
    def __init__(
        self,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        num_blocks: int,
        block_size: int,
        chunked_prefill: bool = True,
        policy: str = "fcfs",
    ):
        for name, value in (
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_num_seqs", max_num_seqs),
            ("num_blocks", num_blocks),
            ("block_size", block_size),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.chunked_prefill = chunked_prefill
        self.policy = policy
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._blocks: dict[int, int] = {}  # request_id -> blocks held (running requests only)
        self._free = num_blocks
        self._requests: dict[int, Request] = {}
        self._order: dict[int, int] = {}  # request_id -> arrival order, for policy="priority"
        self._arrivals = 0
        self._keys: list[tuple[int, int]] = []  # (priority, order) of `waiting`, sorted, for policy="priority"

    @property
    def num_free_blocks(self) -> int:
        return self._free

    def blocks_held(self, request_id: int) -> int:
        return self._blocks.get(request_id, 0)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"request_id {request.request_id} was already added")
        if request.prompt_len < 1 or request.output_len < 1:
            raise ValueError(
                f"request {request.request_id}: prompt_len and output_len must be >= 1, got "
                f"{request.prompt_len} and {request.output_len}"
            )
        longest = request.prompt_len + request.output_len - 1  # the last output token's KV is never computed
        needed = blocks_for(longest, self.block_size)
        if needed > self.num_blocks:
            raise ValueError(
                f"request {request.request_id} can never fit the KV pool: {longest} tokens need {needed} blocks "
                f"of {self.block_size}, and there are num_blocks = {self.num_blocks}"
            )
        if not self.chunked_prefill and longest > self.max_num_batched_tokens:
            raise ValueError(
                f"request {request.request_id} can never be scheduled without chunked prefill: recomputing its "
                f"{longest} tokens after a preemption needs one step of {longest} tokens, more than "
                f"max_num_batched_tokens = {self.max_num_batched_tokens}"
            )
        self._requests[request.request_id] = request
        self._order[request.request_id] = self._arrivals
        self._arrivals += 1
        self._enqueue(request, front=False)

    def _key(self, request: Request) -> tuple[int, int]:
        return request.priority, self._order[request.request_id]

    def _enqueue(self, request: Request, front: bool) -> None:
        if self.policy == "fcfs":
            self.waiting.appendleft(request) if front else self.waiting.append(request)
            return
        key = self._key(request)
        at = bisect.bisect(self._keys, key)
        self._keys.insert(at, key)
        self.waiting.insert(at, request)

    def _dequeue_head(self) -> Request:
        if self.policy != "fcfs":
            del self._keys[0]
        return self.waiting.popleft()

    def _victim(self) -> Request:
        """The running request to preempt: the newest (fcfs), or the least urgent, latest arrived (priority)."""
        if self.policy == "fcfs":
            return self.running.pop()
        victim = max(self.running, key=self._key)
        self.running.remove(victim)
        return victim

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        scheduled = out.num_scheduled_tokens
        budget = self.max_num_batched_tokens
        block_size = self.block_size
        blocks = self._blocks

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = request.num_tokens - request.num_computed
            if n > budget:
                n = budget
            rid = request.request_id
            need = -(-(request.num_computed + n) // block_size) - blocks[rid]
            if need <= self._free:
                self._free -= need
                blocks[rid] += need
                scheduled[rid] = n
                budget -= n
                i += 1
                continue
            victim = self._victim()
            self._preempt(victim)
            out.preempted.append(victim.request_id)
            if victim is request:
                continue  # its turn is over; running[i] is now the next request (fcfs: there is none)
            if victim.request_id in scheduled:  # priority: it ran earlier in this pass; give its tokens back
                budget += scheduled.pop(victim.request_id)
                i -= 1
            # try this request again, with the blocks (and budget) the victim gave back

        if out.preempted:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            n = request.num_tokens  # a waiting request has nothing computed
            if n > budget:
                if not self.chunked_prefill:
                    break  # strict FCFS: the head of the queue blocks everyone behind it
                n = budget
            need = -(-n // block_size)
            if need > self._free:
                break
            self._dequeue_head()
            self._free -= need
            blocks[request.request_id] = need
            self.running.append(request)
            scheduled[request.request_id] = n
            budget -= n
        return out

    def _preempt(self, request: Request) -> None:
        self._free += self._blocks.pop(request.request_id)
        request.num_computed = 0
        request.num_preemptions += 1
        self._enqueue(request, front=True)

    def update(self, output: SchedulerOutput) -> list[Request]:
        finished = []
        for rid, n in output.num_scheduled_tokens.items():
            request = self._requests[rid]
            request.num_computed += n
            if request.num_computed == request.num_tokens:
                request.num_output += 1
                if request.num_output >= request.output_len:
                    finished.append(request)
        if finished:
            done = {r.request_id for r in finished}
            self.running = [r for r in self.running if r.request_id not in done]
            for rid in done:
                self._free += self._blocks.pop(rid)
                del self._requests[rid], self._order[rid]
        return finished
