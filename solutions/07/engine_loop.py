"""Exercise 07 reference: the engine's step loop, built from exercise 02's block manager and 05's scheduler.

Same public API as exercises/07/engine_loop.py, whose docstrings are the specification.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.model_runner import ModelRunner, SeqInput
from engine.parts import load_parts
from engine.sampler import Sampler
from engine.tokenizer import load_tokenizer
from engine.types import EngineStats, RequestOutput, SamplingParams


@dataclass(eq=False)
class _Request:
    """One request's state in the engine (the scheduler's exercise 05 Request rides along as `sched`)."""

    request_id: str
    sched: object  # exercise 05's Request: its index is the scheduler's request_id
    params: SamplingParams
    token_ids: list[int]  # the prompt, then every output token so far
    prompt_len: int
    generator: torch.Generator | None
    block_table: list[int] = field(default_factory=list)  # empty while it holds no blocks (waiting)
    num_output: int = 0


class Engine:
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
        self.requests: dict[str, _Request] = {}
        self._by_index: dict[int, _Request] = {}
        self._next_index = 0
        self._aborted: list[RequestOutput] = []
        self._counters = dict(preemptions=0, prompt_tokens=0, generation_tokens=0, last_step=0)

    # --- requests in and out ----------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in the engine: ids must be unique")
        prompt = _check_prompt(prompt_token_ids, self.vocab_size)
        _check_params(params)
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens and max_tokens is {params.max_tokens}: together more than the "
                f"model's context of {self.max_model_len} tokens"
            )
        index = self._next_index
        sched = self.parts.scheduler.Request(request_id=index, prompt_len=len(prompt), output_len=params.max_tokens)
        self.scheduler.add_request(sched)  # refuses (ValueError) what could never fit, before anything changed
        self._next_index += 1
        request = _Request(request_id, sched, params, prompt, len(prompt), self.sampler.generator_for(params.seed))
        self.requests[request_id] = request
        self._by_index[index] = request

    def abort_request(self, request_id: str) -> None:
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
        request = self.requests.get(request_id)
        if request is None:
            return  # unknown, or finished already: a client may hang up just as its request ends
        sched = request.sched
        if request.block_table:  # running: every block goes back now; the scheduler finishes it at once
            self.block_manager.free(request.sched.request_id)
            sched.output_len = sched.num_output + 1
            rest = self.parts.scheduler.SchedulerOutput({sched.request_id: sched.num_tokens - sched.num_computed})
            self.scheduler.update(rest)
        else:
            self.scheduler.waiting.remove(sched)
        self._forget(request)
        self._aborted.append(RequestOutput(request_id, [], True, "abort"))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests or self._aborted)

    # --- one step ---------------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        outputs, self._aborted = self._aborted, []
        plan = self.scheduler.schedule()
        for index in plan.preempted:  # recomputed later: its blocks go back (the full ones stay cached)
            request = self._by_index[index]
            self.block_manager.free(index)
            request.block_table = []
        self._counters["preemptions"] += len(plan.preempted)
        scheduled = plan.num_scheduled_tokens
        self._counters["last_step"] = len(scheduled)
        if not scheduled:
            return outputs

        seqs, sampling = [], []
        for index, n in scheduled.items():
            request = self._by_index[index]
            start = request.sched.num_computed
            end = start + n
            if start == 0:  # admitted in this step: the block manager may already hold its first blocks
                request.block_table, cached = self.block_manager.allocate(index, request.token_ids[:end])
                first = cached
            else:
                self._append(request, start, end)
                first = start
            sample = end == len(request.token_ids)
            seqs.append(SeqInput(request.token_ids[first:end], first, request.block_table, sample))
            if sample:
                sampling.append(request)

        logits = self.runner.forward(seqs)
        tokens = self.sampler.sample(logits, [r.params for r in sampling], [r.generator for r in sampling])
        finishing = {}  # scheduler index -> finish reason
        for request, token in zip(sampling, tokens, strict=True):
            request.token_ids.append(token)
            request.num_output += 1
            if request.num_output == 1:
                self._counters["prompt_tokens"] += request.prompt_len
            reason = self._finish_reason(request, token)
            if reason is not None:
                request.sched.output_len = request.num_output  # the scheduler finishes it in update()
                finishing[request.sched.request_id] = reason
        self._counters["generation_tokens"] += len(tokens)

        self.scheduler.update(plan)
        for request, token in zip(sampling, tokens, strict=True):
            reason = finishing.get(request.sched.request_id)
            if reason is not None:
                self.block_manager.free(request.sched.request_id)
                self._forget(request)
            outputs.append(RequestOutput(request.request_id, [token], reason is not None, reason))
        return outputs

    def stats(self) -> EngineStats:
        manager = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=manager.usage,
            prefix_cache_queries=manager.prefix_cache_queries,
            prefix_cache_hits=manager.prefix_cache_hits,
            num_preemptions=self._counters["preemptions"],
            prompt_tokens=self._counters["prompt_tokens"],
            generation_tokens=self._counters["generation_tokens"],
            num_free_blocks=manager.num_free_blocks,
            num_total_blocks=manager.num_blocks,
            last_step_num_requests=self._counters["last_step"],
        )

    # --- inside -----------------------------------------------------------------------------------------------------

    def _append(self, request: _Request, start: int, end: int) -> None:
        """Give the block manager tokens start..end-1 of a running request; follow its new blocks and copies."""
        manager, index = self.block_manager, request.sched.request_id
        grew = False
        for position in range(start, end):
            copy = manager.append_token(index, request.token_ids[position])
            if copy is not None:
                self.runner.copy_block(*copy)
                grew = True
            grew = grew or position % self.block_size == 0
        if grew:
            request.block_table = manager.block_table(index)

    def _finish_reason(self, request: _Request, token: int) -> str | None:
        params = request.params
        if token == self.eos_token_id and not params.ignore_eos:
            return "stop"
        if params.stop and self._stop_string_ended(request):
            return "stop"
        if request.num_output >= params.max_tokens:
            return "length"
        return None

    def _stop_string_ended(self, request: _Request) -> bool:
        """Whether the output now ends a stop string: only the tail the newest token can complete is decoded."""
        # A stop string ending earlier would have finished the request then: any match in the tail is new.
        longest = max(len(s) for s in request.params.stop)
        tail = request.token_ids[max(request.prompt_len, len(request.token_ids) - 4 * longest - 4) :]
        text = self.tokenizer.decode(tail)
        return any(s in text for s in request.params.stop)

    def _forget(self, request: _Request) -> None:
        del self.requests[request.request_id]
        del self._by_index[request.sched.request_id]
        request.block_table = []


def _check_prompt(prompt_token_ids, vocab_size: int) -> list[int]:
    if isinstance(prompt_token_ids, (str, bytes)) or not isinstance(prompt_token_ids, (list, tuple)):
        raise TypeError(f"prompt_token_ids must be a list of ints, got {type(prompt_token_ids).__name__}")
    if not prompt_token_ids:
        raise ValueError("the prompt is empty: a request needs at least one token")
    for token in prompt_token_ids:
        if isinstance(token, bool) or not isinstance(token, int):
            raise TypeError(f"prompt token ids must be ints, got {token!r}")
        if not 0 <= token < vocab_size:
            raise ValueError(f"prompt token id {token} is outside the vocabulary 0 .. {vocab_size - 1}")
    return list(prompt_token_ids)


def _check_params(params) -> None:
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    if isinstance(params.max_tokens, bool) or not isinstance(params.max_tokens, int) or params.max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {params.max_tokens!r}")
    if not isinstance(params.temperature, (int, float)) or not 0 <= params.temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0, got {params.temperature!r}")
    if not isinstance(params.top_p, (int, float)) or not 0 < params.top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {params.top_p!r}")
    if params.seed is not None and (isinstance(params.seed, bool) or not isinstance(params.seed, int)):
        raise ValueError(f"seed must be an int or None, got {params.seed!r}")
    if not isinstance(params.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in params.stop):
        raise ValueError(f"stop must be a list of non-empty strings, got {params.stop!r}")
