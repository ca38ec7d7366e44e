# ruff: noqa: E501  (mutants are data: one replacement per line reads best)
"""Exercise 07 mutants of the load generator (loadgen.py); tests/mutants/ex07.py appends them to the engine's.

Each runs only the load generator's tests (`-k test_loadgen`): the engine's tests cannot see these mistakes.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mutation import Mutant  # noqa: E402

L = "loadgen.py"
ONLY_LOADGEN = ("-k", "test_loadgen")

MUTANTS = [
    Mutant("the send time taken when the response headers arrive", L,
           "            if response.status_code != 200:\n",
           "            record.arrival = time.perf_counter()\n            if response.status_code != 200:\n",
           "not when the response headers", ONLY_LOADGEN),
    Mutant("one timestamp for the whole stream, taken before reading it", L,
           "            async for line in response.aiter_lines():\n                now = time.perf_counter()\n",
           "            now = time.perf_counter()\n            async for line in response.aiter_lines():\n",
           "one timestamp", ONLY_LOADGEN),
    Mutant("a chunk without text counted as a token", L,
           "                if text:  # a chunk", "                if choices:  # a chunk", "empty text", ONLY_LOADGEN),
    Mutant("a stream closed before [DONE] counted as completed", L,
           "    if not finished and record.finish_reason is None:", "    if False:",
           "counted as completed", ONLY_LOADGEN),
    Mutant("error events in the stream ignored", L,
           "                if payload.get(\"error\"):", "                if False:", "error event", ONLY_LOADGEN),
    Mutant("an HTTP error answer parsed as a stream", L,
           "            if response.status_code != 200:\n", "            if False:\n", "server's error message",
           ONLY_LOADGEN),
    Mutant("usage.completion_tokens ignored", L,
           "    if usage_tokens and record.token_times and usage_tokens > len(record.token_times):",
           "    if False:", "usage.completion_tokens", ONLY_LOADGEN),
    Mutant("the rate used as the mean gap", L,
           "now += rng.expovariate(request_rate)", "now += rng.expovariate(1 / request_rate)", "mean gap",
           ONLY_LOADGEN),
    Mutant("uniform gaps between arrivals", L,
           "now += rng.expovariate(request_rate)", "now += rng.uniform(0, 2 / request_rate)", "not exponential",
           ONLY_LOADGEN),
    Mutant("fixed gaps between arrivals", L,
           "now += rng.expovariate(request_rate)", "now += 1 / request_rate", "not exponential", ONLY_LOADGEN),
    Mutant("every request sent at once, whatever the schedule", L,
           "            if delay > 0:\n                await asyncio.sleep(delay)\n", "", "sent at once", ONLY_LOADGEN),
    Mutant("max_concurrency ignored", L,
           "    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None", "    slots = None",
           "the cap was exceeded", ONLY_LOADGEN),
    Mutant("the send time taken before waiting for a concurrency slot", L,
           "            async with slots:  # held until the whole answer has streamed back\n                records[i] = await send_request(client, base_url, model, trace[i], i, extra_body)",
           "            queued = time.perf_counter()\n            async with slots:\n                records[i] = await send_request(client, base_url, model, trace[i], i, extra_body)\n            records[i].arrival = queued",
           "after waiting for a concurrency slot", ONLY_LOADGEN),
    Mutant("httpx's default connection pool (100 connections)", L,
           "    async with httpx.AsyncClient(timeout=request_timeout, limits=unlimited, trust_env=False) as client:",
           "    async with httpx.AsyncClient(timeout=request_timeout, trust_env=False) as client:",
           "connection pool caps concurrency", ONLY_LOADGEN),
    Mutant("the run's time limit ignored", L,
           "            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))",
           "            _, pending = await asyncio.wait(tasks)", "time limit", ONLY_LOADGEN),
    Mutant("a connection error raised instead of failing the request", L,
           "    except (httpx.HTTPError, json.JSONDecodeError, UnicodeDecodeError) as exc:",
           "    except (json.JSONDecodeError, UnicodeDecodeError) as exc:", "not raise", ONLY_LOADGEN),
    Mutant("max_concurrency not checked", L,
           "    if max_concurrency is not None and (type(max_concurrency) is not int or max_concurrency < 1):",
           "    if False:", "max_concurrency", ONLY_LOADGEN),
]
