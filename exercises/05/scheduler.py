"""Exercise 05: continuous batching, with a token budget, chunked prefill and preemption.

A serving engine runs the model one *step* at a time, and a step can compute tokens for many requests at once: the
GPU reads the weights once per step however many tokens ride along, so a full step costs little more than an empty
one. Static batching takes a batch, runs it until its longest request finishes, and only then admits anyone: slots
freed by short answers sit empty. Continuous (iteration-level) batching decides again at every step: finished
requests leave at once and waiting ones join in their place.

Each step has a token budget, `max_num_batched_tokens`. A decode costs one token; a prompt costs its length. With
*chunked prefill* a long prompt is computed a budget-sized chunk at a time, so it never stalls the decodes of
everyone else for a whole long step; without it, a prompt that does not fit in what is left of the budget waits,
and (first come, first served) so does everyone behind it.

KV memory is a pool of `num_blocks` blocks of `block_size` tokens. When a running request needs a block and none is
free, the scheduler *preempts* the most recently admitted running request: frees its blocks, so its KV is gone
(num_computed goes back to 0: it will recompute its prompt and the output tokens it already produced, which it keeps)
and puts it back at the front of the waiting queue.

You build `Scheduler` (and `blocks_for`); a priority policy is the stretch goal. The simulator in
fixtures/serving_sim.py drives it on a simulated clock and checks every step; `pytest exercises/05` runs the
specification. Request and SchedulerOutput are given.
"""

from __future__ import annotations

from collections import deque  # noqa: F401  (a deque is a good waiting queue)
from dataclasses import dataclass, field

POLICIES = ("fcfs", "priority")


@dataclass
class Request:
    """One request: its sizes, and its progress (which only the scheduler changes).

    A request's known tokens are its prompt and the output tokens produced so far (`num_tokens`). To produce output
    token k + 1 the engine must have computed every known token: so a step that brings `num_computed` up to
    `num_tokens` produces one output token (`num_output` += 1). The first time, that is the end of the prompt; after
    that, every decode step computes exactly one token (the last one produced) and produces the next. The last
    output token's KV is never computed: a request computes prompt_len + output_len - 1 tokens in all.
    """

    request_id: int
    prompt_len: int  # >= 1
    output_len: int  # >= 1: output tokens the request will produce before it finishes
    arrival: float = 0.0
    priority: int = 0  # policy="priority" only: lower is served first
    num_computed: int = 0  # tokens whose KV is in the cache (0 while waiting; a preemption sets it back to 0)
    num_output: int = 0  # output tokens produced so far (kept across preemptions: they are recomputed, not lost)
    num_preemptions: int = 0  # times this request was preempted (+1 at each preemption)

    @property
    def num_tokens(self) -> int:
        """Known tokens: the prompt and the outputs so far."""
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
    """KV blocks that hold `num_tokens` tokens: ceil(num_tokens / block_size), rounded up (a partly filled block is
    still a block; 0 for 0 tokens)."""
    raise NotImplementedError("blocks_for: round up, in integers: -(-num_tokens // block_size)")


class Scheduler:
    """First come, first served continuous batching over a pool of KV blocks.

    Attributes (read by tests and tools; keep them up to date):
        max_num_batched_tokens, max_num_seqs, num_blocks, block_size, chunked_prefill, policy: the configuration.
        waiting: the requests waiting to be admitted, in admission order (front first).
        running: the requests holding KV blocks, in the order they were (re)admitted.

    Block accounting: a running request that has c tokens computed and is scheduled n more in a step holds
    ceil((c + n) / block_size) blocks from the moment `schedule()` returns: blocks are reserved for the tokens a step
    will compute before it computes them. A waiting request holds none. `num_free_blocks` is what is left.
    """

    def __init__(
        self,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        num_blocks: int,
        block_size: int,
        chunked_prefill: bool = True,
        policy: str = "fcfs",
    ):
        """ValueError (naming the argument) unless the four sizes are positive ints (0, negatives, floats and bools
        are refused); ValueError for a policy not in POLICIES. Starts with every block free and both queues empty."""
        # TODO: validate, store the configuration, make the waiting queue and the running list, and whatever you
        #  need to count blocks per request and free blocks.
        raise NotImplementedError("Scheduler.__init__: store the configuration; empty queues; all blocks free")

    @property
    def num_free_blocks(self) -> int:
        """KV blocks not held by any running request."""
        raise NotImplementedError("Scheduler.num_free_blocks: num_blocks minus the blocks running requests hold")

    def blocks_held(self, request_id: int) -> int:
        """Blocks the request holds now: 0 if it is not running (waiting, preempted or finished)."""
        raise NotImplementedError("Scheduler.blocks_held: look the request's block count up (0 if not running)")

    def has_unfinished_requests(self) -> bool:
        """True while any request is waiting or running: an engine calls schedule() and update() until it is False."""
        raise NotImplementedError("Scheduler.has_unfinished_requests: anything waiting or running?")

    def add_request(self, request: Request) -> None:
        """Queue a new request at the back of the waiting queue.

        Refuses (ValueError, saying why) a request that could never run, instead of letting it wait forever:
          - one whose prompt_len + output_len - 1 tokens need more blocks than the whole pool has;
          - without chunked prefill, one whose prompt_len + output_len - 1 tokens exceed max_num_batched_tokens
            (after a preemption it must recompute all its known tokens in one step);
          - a request_id already added, or prompt_len or output_len < 1.
        A refused request changes nothing (the queue, the blocks and the ids already added stay as they were).
        """
        raise NotImplementedError("Scheduler.add_request: refuse what could never fit, else append to waiting")

    def schedule(self) -> SchedulerOutput:
        """Decide this step: how many tokens each request computes, and whom to preempt.

        1. Running requests first, in admission order: each gets min(tokens it has left, budget left), where tokens
           left = num_tokens - num_computed (1 for a decode). Reserve the blocks those tokens need. If there are not
           enough free blocks, preempt the most recently admitted running request (free its blocks, num_computed = 0,
           num_preemptions += 1, num_output kept, put it at the front of `waiting`) and try again, as many times as
           it takes: never reserve more blocks than are free. If the request that needs the blocks is itself the
           victim, its turn is over and the pass goes on with the next running request (under FCFS there is none:
           the victim is the newest). So every running request that is not preempted gets min(left, budget left),
           and a preempted request takes nothing.
        2. Only if nobody was preempted in this step: admit from the front of `waiting` while budget is left and
           fewer than max_num_seqs requests run. The head gets all its known tokens, or, if they do not fit in
           what is left of the budget, a chunk of exactly that much with chunked prefill, or else it waits and
           admission stops (strict FCFS: nobody overtakes it). Admission also stops when the head's blocks do not
           fit: it waits whole, it does not take a smaller chunk that would fit. An admitted request moves to the
           back of `running`.
        Preempted requests go back to the front of `waiting` so that the queue stays in admission order: several
        victims of one step are queued oldest admitted first, not in the order they were preempted. Return the
        schedule as a SchedulerOutput (running requests first, then admitted ones; only requests given at least
        one token appear in it). Do not change num_computed here except to reset it on preemption: `update`
        advances it.

        Stretch, policy="priority": `waiting` is ordered by (priority, arrival order) instead, and a preempted
        request goes back to its place in that order. Arrival order is the order of the add_request calls (not the
        `arrival` field: requests with the same priority that arrived at the same time are ranked by it; keep a
        counter, and never compare Request objects, which a heap of (priority, arrival, request) tuples does on a
        tie). The victim is the running request with the largest (priority, arrival order): the least urgent,
        latest added, even if it already got tokens in this step's pass (take them back: its tokens return to the
        budget and it leaves the schedule). Keep preempting until the blocks fit, as under FCFS; a request that is
        itself the victim leaves the pass, and the more urgent requests after it still get their tokens.
        """
        # TODO: the two passes above. Keep it O(running + admitted) per step: the speed test runs 256 decodes.
        raise NotImplementedError("Scheduler.schedule: running requests first (preempting if needed), then admit")

    def update(self, output: SchedulerOutput) -> list[Request]:
        """Feed back what the step computed. Returns the requests that finished in it (possibly none).

        For each scheduled request: num_computed += its tokens; if that reaches num_tokens, the step produced one
        output token (num_output += 1). A request with output_len tokens is finished: it leaves `running` and its
        blocks are freed.
        """
        raise NotImplementedError("Scheduler.update: advance num_computed, count output tokens, retire finished ones")
