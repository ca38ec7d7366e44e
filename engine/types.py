"""Records shared by the engine's step loop, its model runner and the HTTP server.

They are plain dataclasses: the server builds `SamplingParams` from a request body, the step loop hands back one
`RequestOutput` per request that advanced in a step, and `EngineStats` is what `/metrics` exports.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How one request is decoded.

    max_tokens: the most tokens generated (>= 1). temperature: 0 is greedy (argmax), else logits / temperature.
    top_p: nucleus sampling, the smallest set of tokens whose probability sums to >= top_p (0 < top_p <= 1).
    seed: a request with a seed samples the same tokens every time, whatever else is in its batch.
    stop: strings that end the generation when the decoded text contains one (the stop string is part of the text
    generated so far; finish_reason "stop"). ignore_eos: keep generating past the EOS token.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class RequestOutput:
    """What one request gained in one step.

    new_token_ids: the tokens generated for it in this step (empty while its prompt is still being prefilled in
    chunks, or when it is aborted). finished: it will produce nothing more; finish_reason is then "stop" (EOS or a
    stop string), "length" (max_tokens reached) or "abort", and None while it runs.
    """

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None


@dataclass
class EngineStats:
    """A snapshot of the engine after its last step (the numbers `/metrics` exports).

    kv_cache_usage is the fraction of KV blocks in use, 0..1. Prefix-cache queries and hits count prompt tokens:
    queries every prompt token looked up at admission, hits those found cached. Counters (preemptions, tokens,
    prefix-cache queries and hits) are totals since the engine started; the others describe the present.
    """

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    last_step_num_requests: int = 0
