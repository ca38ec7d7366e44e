"""Exercise 07: the engine's step loop, where the course's parts serve requests together.

A serving engine is a loop of *steps*. In each step the scheduler (exercise 05) decides how many tokens every
request computes: a decode computes one token (the last one sampled), a prefill computes a chunk of its prompt. The
model runner then computes all of them in ONE forward (the weights are read once per step, however many requests
ride along), the sampler turns the logits of every request that reached the end of its known tokens into one new
token each, and the step hands each request its new token. Requests join and leave between any two steps.

Two parts keep books on KV memory, and they must agree:
  - exercise 05's `Scheduler` counts blocks per request (ceil(tokens / block_size)) to decide admissions and
    preemptions. It owns the *decision*: who runs, how many tokens, whom to preempt.
  - exercise 02's `BlockManager` owns the real blocks: which block ids hold which tokens, shared prefixes, the
    prefix cache. The step loop *carries out* the scheduler's decision on it, so that after every step the block
    manager holds exactly the tokens the scheduler counts as computed (`sched.num_computed`) for every running
    request, and nothing for waiting ones.
  Both pools have the same number of blocks, and sharing only lowers the real count, so whatever the scheduler
  admits, the block manager can hold.

How they compose, request by request, in one step:
  - admitted in this step (its num_computed is 0, scheduled n tokens): `allocate(index, token_ids[:n])` gives its
    block table and how many leading tokens are already cached (a prefix-cache hit, a multiple of block_size). Their
    K and V are in the shared blocks already, so the runner computes only tokens cached .. n-1.
  - running (num_computed = c, scheduled n): `append_token` for each of tokens c .. c+n-1 (a new block every
    block_size tokens; refresh the table then); the runner computes exactly those.
  - preempted (in the plan's `preempted` list): `free` its blocks. It recomputes from scratch when readmitted (its
    full blocks stay cached, so the recompute may hit the prefix cache).
  - a request *samples* in this step when c + n reaches all its known tokens (prompt + outputs so far).
  The scheduler learns about each sampled token in `update(plan)`: it bumps num_output and finishes a request once
  num_output reaches `output_len`. A request that stops early (EOS, a stop string) must therefore lower its
  `sched.output_len` to the outputs it has *before* `update` is called; then free its blocks in the block manager.

The model runner (engine/model_runner.py), sampler (engine/sampler.py) and tokenizer (engine/tokenizer.py) are
given; `Engine.__init__` below builds them. You write the request bookkeeping and `step()`. `pytest exercises/07`
runs the specification; `python3 -m engine.server --model fixtures/course_model/target --impl student` serves your
loop over HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.model_runner import ModelRunner, SeqInput  # noqa: F401  (SeqInput: what runner.forward takes)
from engine.parts import load_parts
from engine.sampler import Sampler
from engine.tokenizer import load_tokenizer
from engine.types import EngineStats, RequestOutput, SamplingParams  # noqa: F401


@dataclass(eq=False)
class _Request:
    """One request's state in the engine (given; add fields if you need more).

    sched: exercise 05's Request for this request (request_id = its int index in the scheduler and the block
    manager, prompt_len, output_len = max_tokens, num_computed, num_output). token_ids: the prompt, then every
    output token so far. block_table: its block ids (empty while it holds no blocks). generator: its own random
    generator when it has a seed (Sampler.generator_for), else None.
    """

    request_id: str
    sched: object
    params: SamplingParams
    token_ids: list[int]
    prompt_len: int
    generator: torch.Generator | None
    block_table: list[int] = field(default_factory=list)
    num_output: int = 0


class Engine:
    """Continuous batching over a paged KV pool: add requests, call `step()` until none is left.

    Attributes the tests and the server read: runner (ModelRunner), tokenizer, sampler, block_manager (exercise 02),
    scheduler (exercise 05), eos_token_id (a request stops when it samples it, unless params.ignore_eos),
    max_model_len (the model's context), vocab_size.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        impl: str = "solution",
        device: str = "cpu",
        num_blocks: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        enable_prefix_caching: bool = True,
        chunked_prefill: bool = True,
        quantization: str | None = None,
    ):
        """Build the parts (given). impl chooses where exercises 02, 05, 06 and 03 come from: "solution" (the
        reference parts) or "student" (your own exercises/NN modules)."""
        self.parts = load_parts(impl)
        self.runner = ModelRunner(model_dir, device=device, block_size=block_size, num_blocks=num_blocks,
                                  max_num_seqs=max_num_seqs, parts=self.parts, quantization=quantization)  # fmt: skip
        self.tokenizer = load_tokenizer(model_dir, self.runner.config)
        self.sampler = Sampler(device)
        self.block_size = block_size
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.vocab_size
        self.eos_token_id = self.tokenizer.eos_token_id
        self.block_manager = self.parts.block_manager.BlockManager(self.runner.num_blocks, block_size,
                                                                   enable_prefix_caching)  # fmt: skip
        self.scheduler = self.parts.scheduler.Scheduler(max_num_batched_tokens, max_num_seqs, self.runner.num_blocks,
                                                        block_size, chunked_prefill)  # fmt: skip
        # TODO: your bookkeeping: requests by id, by scheduler index, the next index, counters for stats().

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request. It runs from the next step on.

        Refuses bad input with a ValueError (TypeError for a wrong type) that names the problem, and then changes
        nothing at all: a request_id already in the engine, an empty prompt, a token id outside 0 .. vocab_size - 1,
        a prompt whose length + params.max_tokens exceeds max_model_len (so a prompt as long as the context too),
        max_tokens < 1, temperature < 0, top_p outside (0, 1], stop not a list of non-empty strings. Exercise 05's
        `Scheduler.add_request` refuses requests that could never fit the pool: call it after your own checks, and
        before you record anything.
        """
        # TODO: check; make exercise 05's Request (self.parts.scheduler.Request) with a fresh int index; add it to
        #  the scheduler; remember the request (a _Request, its generator from self.sampler.generator_for(seed)).
        raise NotImplementedError("Engine.add_request: validate, then scheduler.add_request, then record it")

    def abort_request(self, request_id: str) -> None:
        """Drop a request now: every KV block it holds goes back at once, and the scheduler forgets it.

        A running request (it holds blocks): free them in the block manager; to finish it in the scheduler (which
        has no abort), set sched.output_len = sched.num_output + 1 and call scheduler.update with a SchedulerOutput
        giving it its remaining tokens (sched.num_tokens - sched.num_computed). A waiting request: remove it from
        scheduler.waiting. The next step() reports RequestOutput(request_id, [], True, "abort"). An unknown or
        already finished id is ignored (a client may hang up just as its request ends).
        """
        raise NotImplementedError("Engine.abort_request: free its blocks, take it out of the scheduler, report it")

    def has_unfinished_requests(self) -> bool:
        """Whether step() has anything to do: requests waiting or running, or abort reports not yet handed out."""
        raise NotImplementedError("Engine.has_unfinished_requests: any request left, or an abort to report?")

    def step(self) -> list[RequestOutput]:
        """One scheduler step; returns a RequestOutput per request that sampled a token (or was aborted).

        1. plan = scheduler.schedule(); free the blocks of every preempted request (block_manager.free).
        2. For each scheduled request, in the plan's order: carry out its share on the block manager (allocate when
           admitted, using the prefix-cache hit; append_token otherwise) and make its SeqInput: the tokens to compute,
           where they start, its block table, and whether it samples (its computed tokens reach all known tokens).
        3. One runner.forward(seqs) for all of them: float32 logits, one row per sampling request, in order.
        4. sampler.sample(logits, params, generators): one token each. Append it to the request's tokens. A request
           finishes with finish_reason "stop" when the token is eos_token_id (unless params.ignore_eos) or its output
           text now contains one of params.stop (decode with self.tokenizer; the token that completes it is still
           handed out), else "length" once it has max_tokens outputs. Lower sched.output_len of an early finisher.
        5. scheduler.update(plan); free the blocks of the finished requests and forget them.
        Outputs: aborted requests first (reported once), then one RequestOutput(request_id, [token], finished,
        finish_reason) per sampling request in plan order; a prefill chunk that does not reach its prompt's end
        reports nothing. A step with nothing scheduled returns just the abort reports (or []).
        """
        raise NotImplementedError("Engine.step: schedule, carry out the plan on the blocks, forward, sample, update")

    def stats(self) -> EngineStats:
        """A snapshot (engine/types.py): running and waiting counts from the scheduler; kv_cache_usage, prefix-cache
        queries and hits, free and total blocks from the block manager; preemptions, prompt tokens (a request's
        prompt length, counted when it samples its first token) and generation tokens (every sampled token) since
        the start; requests scheduled in the last step."""
        raise NotImplementedError("Engine.stats: read the scheduler, the block manager and your counters")
