"""Exercise 07, part 2: a load generator for any OpenAI-compatible completions endpoint (like `vllm bench serve`).

A benchmark replays a trace — prompts, how many tokens to generate, when each request arrives — against a server and
measures what its users would feel. Two ways to offer load:

    request rate     arrivals are a Poisson process: the gaps between requests are exponential with mean 1 / rate
                     (seeded, so every engine sees the same schedule); rate = inf sends everything at once
    max concurrency  at most N requests in flight; a slot frees when an answer has *completely* streamed back

Each request is a streamed completion (`POST /v1/completions` with `"stream": true`): the server answers with
server-sent events, one `data: {json}` line per chunk, a blank line between events, and `data: [DONE]` at the end.
Timestamp the send, and every chunk that carries text, as it is read: the metrics are exercise 05's (TTFT, TPOT, ITL,
E2EL, throughputs, goodput), computed by its `serving_metrics` from these records, which have the fields of a
timeline (`arrival` = send time, `prompt_len`, `token_times`, `failed`). Reuse it; do not restate the definitions.

The HTTP client is httpx's AsyncClient on asyncio: one event loop keeps hundreds of streams open, and we read the raw
event lines ourselves, so each timestamp is taken the moment its line arrives. The `openai` client would parse every
chunk into pydantic objects first (per-chunk overhead that lands in the latencies we measure) and hides the raw
stream; it is also one more dependency on a GPU machine. Mind httpx's defaults: its connection pool holds at most 100
connections (more requests would wait for a connection: a hidden concurrency cap) and a request times out after 5 s.

Times are `time.perf_counter()` seconds. Run `pytest exercises/07 -k loadgen` to check your work, or benchmark a
server: `python3 exercises/07/loadgen.py --base-url http://127.0.0.1:8000 --model NAME --request-rate 8`.
"""

from __future__ import annotations

import asyncio  # noqa: F401
import json  # noqa: F401
import math
import random  # noqa: F401
import sys
import time  # noqa: F401
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass(frozen=True)
class TraceRequest:
    prompt: str
    max_tokens: int  # tokens to generate, >= 1
    prompt_len: int | None = None  # prompt tokens as the caller counts them (None: its UTF-8 bytes, the course's)


@dataclass
class RequestRecord:
    """One request as the client saw it: a timeline for exercise 05's serving_metrics."""

    index: int  # its place in the trace
    prompt_len: int  # the server's usage.prompt_tokens when reported, else the trace's count
    arrival: float  # when it was sent (perf_counter): after waiting for a concurrency slot, just before sending
    token_times: list[float] = field(default_factory=list)  # when each output token arrived, in order
    failed: bool = False  # HTTP error, error event, connection error, stream closed early, time limit
    error: str = ""  # why it failed, with the server's own message when there is one
    text: str = ""  # the text streamed back, joined
    finish_reason: str | None = None  # from the chunk that carried one ("length", "stop")


@dataclass
class RunResult:
    records: list[RequestRecord]  # one per trace request, in trace order
    start: float  # perf_counter when the run began (arrival times count from here)
    duration: float  # wall time from `start` until every answer ended (or the time limit)


def poisson_arrivals(num_requests: int, request_rate: float, seed: int = 0) -> list[float]:
    """Arrival times (seconds from the run's start) of a Poisson process: the first at 0.0, then gaps drawn from an
    exponential distribution of mean 1 / request_rate with `random.Random(seed)`. request_rate = math.inf: all 0.0.

    ValueError for num_requests not an int >= 0 or request_rate not > 0 (nan included).
    """
    raise NotImplementedError("poisson_arrivals: cumulative sums of rng.expovariate(rate), starting at 0.0")


async def send_request(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    request: TraceRequest,
    index: int = 0,
    extra_body: dict | None = None,
) -> RequestRecord:
    """Send one streamed completion to `base_url`/v1/completions (a base URL ending in /v1 works too) and record it.

    Body: model, prompt, max_tokens, temperature 0.0, "stream": true, "stream_options": {"include_usage": true},
    then `extra_body` merged over it (e.g. {"ignore_eos": true} for vLLM). Take `arrival` just before sending.
    Read the stream line by line (an event may arrive in two network reads, two events in one): skip blank lines,
    comments (":") and "event:" lines; stop at `data: [DONE]`. A chunk whose choices[0].text is non-empty is one
    token, timestamped when its line is read; a chunk without text (the last one, with finish_reason and usage) is
    none. If usage.completion_tokens says more tokens than text chunks (several tokens shared a chunk), the extra
    ones arrived by the last text chunk: repeat its time. usage.prompt_tokens replaces the trace's prompt_len.

    Never raises for what the server does: an HTTP status other than 200 (keep the body's error.message), an error
    event (`data: {"error": {...}}`), a connection or timeout error, or a stream that ends before [DONE] without a
    finish_reason (the server closed it early) each make a failed record with the reason. A stream that ends after a
    chunk with a finish_reason but no [DONE] is complete: `transformers serve` ends its streams that way.
    """
    raise NotImplementedError("send_request: client.stream('POST', ...), then `async for line in r.aiter_lines()`")


async def run_trace(
    base_url: str,
    model: str,
    trace: list[TraceRequest],
    *,
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    seed: int = 0,
    arrivals: list[float] | None = None,
    extra_body: dict | None = None,
    request_timeout: float = 120.0,
    time_limit: float = 600.0,
) -> RunResult:
    """Send every request of `trace` at its arrival time (poisson_arrivals(len(trace), request_rate, seed), or the
    given `arrivals`), at most `max_concurrency` in flight (None: no cap), and stream every answer concurrently.

    One httpx.AsyncClient for the run: no connection-pool limit (httpx.Limits(max_connections=None, ...)),
    `request_timeout` seconds per request, trust_env=False (a proxy from the environment must not see loopback
    traffic). A concurrency slot is taken before sending and held until the answer has streamed to its end.
    The run stops by itself at `time_limit` seconds: requests still streaming are cancelled, requests not yet due are
    not sent, and both are failed records ("... time limit ..."). `duration` runs from `start` until the last answer
    ended (or the limit).

    Check everything before sending anything: ValueError for a base URL not http(s)://, an empty model name, an empty
    trace, max_tokens not an int >= 1, request_rate not > 0, max_concurrency not an int >= 1 (or None), arrivals of
    another length / negative / decreasing, request_timeout or time_limit not > 0; TypeError for a prompt not a str.
    """
    raise NotImplementedError("run_trace: sleep until each arrival, create_task(send_request), asyncio.wait(...)")


def run(base_url: str, model: str, trace: list[TraceRequest], **options) -> RunResult:
    """run_trace in a fresh event loop (asyncio.run): the synchronous entry point."""
    raise NotImplementedError("run: asyncio.run(run_trace(base_url, model, trace, **options))")


def summarize(result: RunResult, metrics, *, ttft_slo=None, tpot_slo=None, gpu_hour_price: float = 0.0):
    """Exercise 05's ServingMetrics of the run: `metrics` is exercise 05's metrics module (your
    exercises/05/metrics.py), whose serving_metrics takes the records as timelines and the run's duration."""
    raise NotImplementedError("summarize: metrics.serving_metrics(result.records, result.duration, ...)")


# --- given: the command line ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    """The command line (given): fixtures/loadgen_cli.py builds a trace, runs it and prints exercise 05's summary."""
    from fixtures.loadgen_cli import main as cli

    return cli(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for fixtures/
    main()
