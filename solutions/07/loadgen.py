"""Exercise 07 reference: a load generator for any OpenAI-compatible completions endpoint.

Same public API as exercises/07/loadgen.py, whose docstrings are the specification.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import httpx


@dataclass(frozen=True)
class TraceRequest:
    prompt: str
    max_tokens: int
    prompt_len: int | None = None


@dataclass
class RequestRecord:
    index: int
    prompt_len: int
    arrival: float
    token_times: list[float] = field(default_factory=list)
    failed: bool = False
    error: str = ""
    text: str = ""
    finish_reason: str | None = None


@dataclass
class RunResult:
    records: list[RequestRecord]
    start: float
    duration: float


def poisson_arrivals(num_requests: int, request_rate: float, seed: int = 0) -> list[float]:
    _check_count(num_requests)
    _check_rate(request_rate)
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    arrivals, now = [], 0.0
    for i in range(num_requests):
        if i:
            now += rng.expovariate(request_rate)
        arrivals.append(now)
    return arrivals


async def send_request(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    request: TraceRequest,
    index: int = 0,
    extra_body: dict | None = None,
) -> RequestRecord:
    body = {"model": model, "prompt": request.prompt, "max_tokens": request.max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, **(extra_body or {})}  # fmt: skip
    prompt_len = request.prompt_len if request.prompt_len is not None else len(request.prompt.encode())
    record = RequestRecord(index, prompt_len, arrival=time.perf_counter())
    finished, usage_tokens, texts = False, None, []
    try:
        async with client.stream("POST", _endpoint(base_url), json=body) as response:
            if response.status_code != 200:
                return _failed(record, f"HTTP {response.status_code}: {_error_message(await response.aread())}")
            async for line in response.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue  # blank separators, comments (": keep-alive"), "event:" lines
                data = line[5:].strip()
                if data == "[DONE]":
                    finished = True
                    break
                payload = json.loads(data)
                if payload.get("error"):
                    return _failed(record, f"error event: {_message_of(payload['error'])}")
                choices = payload.get("choices") or []
                text = (choices[0].get("text") or "") if choices else ""
                if text:  # a chunk without text (the last one, a role chunk) is no token
                    record.token_times.append(now)
                    texts.append(text)
                if choices and choices[0].get("finish_reason"):
                    record.finish_reason = choices[0]["finish_reason"]
                usage = payload.get("usage")
                if usage:
                    usage_tokens = usage.get("completion_tokens")
                    record.prompt_len = usage.get("prompt_tokens") or record.prompt_len
    except (httpx.HTTPError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        return _failed(record, f"{type(exc).__name__}: {exc}")
    record.text = "".join(texts)
    if not finished and record.finish_reason is None:  # some servers (transformers serve) end with no [DONE]
        return _failed(record, "the stream ended before data: [DONE], and no chunk carried a finish_reason")
    if usage_tokens and record.token_times and usage_tokens > len(record.token_times):
        # Several tokens shared a chunk (a detokenizer held back an incomplete character, say): the server's count
        # is the truth, and those tokens had all arrived by the last chunk.
        record.token_times += [record.token_times[-1]] * (usage_tokens - len(record.token_times))
    return record


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
    _check_trace(base_url, model, trace)
    _check_rate(request_rate)
    if max_concurrency is not None and (type(max_concurrency) is not int or max_concurrency < 1):
        raise ValueError(f"max_concurrency must be an int >= 1 or None, got {max_concurrency!r}")
    for name, value in (("request_timeout", request_timeout), ("time_limit", time_limit)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    if arrivals is None:
        arrivals = poisson_arrivals(len(trace), request_rate, seed)
    else:
        arrivals = [float(a) for a in arrivals]
        if len(arrivals) != len(trace):
            raise ValueError(f"{len(arrivals)} arrival times for {len(trace)} requests")
        if any(not 0 <= a < math.inf for a in arrivals) or any(b < a for a, b in pairwise(arrivals)):
            raise ValueError("arrival times must be finite, >= 0 and non-decreasing")

    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    records: list[RequestRecord | None] = [None] * len(trace)
    unlimited = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=request_timeout, limits=unlimited, trust_env=False) as client:

        async def one(i: int) -> None:
            if slots is None:
                records[i] = await send_request(client, base_url, model, trace[i], i, extra_body)
                return
            async with slots:  # held until the whole answer has streamed back
                records[i] = await send_request(client, base_url, model, trace[i], i, extra_body)

        start = time.perf_counter()
        deadline = start + time_limit
        tasks = []
        for i, at in enumerate(arrivals):
            delay = start + at - time.perf_counter()
            if start + at >= deadline:
                break
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - start
    for i, record in enumerate(records):
        if record is None:
            prompt_len = trace[i].prompt_len if trace[i].prompt_len is not None else len(trace[i].prompt.encode())
            why = f"not finished within the run's time limit of {time_limit:g} s"
            records[i] = RequestRecord(i, prompt_len, start + arrivals[i], failed=True, error=why)
    return RunResult(records, start, duration)


def run(base_url: str, model: str, trace: list[TraceRequest], **options) -> RunResult:
    return asyncio.run(run_trace(base_url, model, trace, **options))


def summarize(result: RunResult, metrics, *, ttft_slo=None, tpot_slo=None, gpu_hour_price: float = 0.0):
    return metrics.serving_metrics(result.records, result.duration, ttft_slo=ttft_slo, tpot_slo=tpot_slo,
                                   gpu_hour_price=gpu_hour_price)  # fmt: skip


# --- helpers ---------------------------------------------------------------------------------------------------------


def _endpoint(base_url: str) -> str:
    return base_url.rstrip("/").removesuffix("/v1") + "/v1/completions"


def _failed(record: RequestRecord, why: str) -> RequestRecord:
    record.failed, record.error = True, why
    return record


def _message_of(error) -> str:
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)


def _error_message(body: bytes) -> str:
    try:
        return _message_of(json.loads(body).get("error") or json.loads(body))
    except (ValueError, AttributeError):
        return body.decode(errors="replace")[:500]


def _check_count(num_requests) -> None:
    if type(num_requests) is not int or num_requests < 0:
        raise ValueError(f"the number of requests must be an int >= 0, got {num_requests!r}")


def _check_rate(request_rate) -> None:
    if isinstance(request_rate, bool) or not isinstance(request_rate, (int, float)) or not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 requests/s (math.inf: all at once), got {request_rate!r}")


def _check_trace(base_url, model, trace) -> None:
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must be an http:// or https:// URL, got {base_url!r}")
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a non-empty string (the served model's name), got {model!r}")
    if not isinstance(trace, (list, tuple)) or not trace:
        raise ValueError("the trace must be a non-empty list of TraceRequest")
    for i, request in enumerate(trace):
        if not isinstance(request.prompt, str):
            raise TypeError(f"request {i}: the prompt must be a str, got {type(request.prompt).__name__}")
        if type(request.max_tokens) is not int or request.max_tokens < 1:
            raise ValueError(f"request {i}: max_tokens must be an int >= 1, got {request.max_tokens!r}")


def main(argv: list[str] | None = None) -> dict:
    """The command line (given): fixtures/loadgen_cli.py builds a trace, runs it and prints exercise 05's summary."""
    from fixtures.loadgen_cli import main as cli

    return cli(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for fixtures/
    main()
