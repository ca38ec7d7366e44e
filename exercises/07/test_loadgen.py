"""Exercise 07 specification, part 2: the load generator, against a scripted server with known timing.

fixtures/scripted_server.py is a real HTTP server on loopback, in a process of its own, whose every answer follows
the script in its prompt: when the headers go out, when each token is written, an HTTP error, an error event, a
stream closed before `[DONE]`. It logs when it received each request and when it wrote each step, on the same
clock as `time.perf_counter()` here, and how many requests it held at once. So the tests know the truth:

- every token's timestamp must be within TOL of the moment the server wrote it (typically < 1 ms apart; TOL leaves
  room for a loaded CI machine, while every mistake below is off by 50 ms or more);
- a request's send time must come before the server received it (and not long before: connecting takes a few ms,
  more on a loaded machine).
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import math
import os
import random
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import httpx
import pytest

from fixtures.checks import expect_error
from fixtures.scripted_server import chunk as sse_chunk
from fixtures.scripted_server import done, error_event, finish, raw, script, token

TOL = 0.020  # seconds between the server writing a token and the client timestamping it, on a loaded machine
SETUP = 0.500  # seconds a correct client may take between its send time and the server's receipt (connecting)


@pytest.fixture
def loadgen(impl):
    return impl("loadgen")


class Server:
    def __init__(self, url: str):
        self.url = url

    def log(self) -> dict:
        return httpx.get(self.url + "/log", timeout=10, trust_env=False).json()

    def reset(self) -> None:
        httpx.post(self.url + "/reset", timeout=10, trust_env=False)

    def entries(self) -> dict[str, dict]:
        return {entry["id"]: entry for entry in self.log()["requests"]}


@pytest.fixture(scope="module")
def scripted():
    root = Path(__file__).resolve().parent.parent.parent
    process = subprocess.Popen([sys.executable, "-m", "fixtures.scripted_server"], cwd=root, stdout=subprocess.PIPE,
                               text=True, env=dict(os.environ, PYTHONPATH=str(root)))  # fmt: skip
    try:
        server = Server(process.stdout.readline().split()[-1])
        asyncio.run(warm_up(server.url))
        yield server
    finally:
        process.terminate()
        process.wait(timeout=10)


async def warm_up(url: str) -> None:
    """One request through httpx's async stack first: its first use in a process imports and starts what a request
    needs (0.2 s, over a second on a loaded machine), which no send time should include."""
    async with httpx.AsyncClient(trust_env=False) as client:
        await client.get(url + "/health", timeout=30)


@pytest.fixture
def server(scripted):
    scripted.reset()
    return scripted


@pytest.fixture
def exercise_05_metrics(request):
    """Exercise 05's metrics module through the same seam as `impl`: the student's exercises/05/metrics.py, or the
    reference under --impl=solution (solutions/05, or under --solutions PATH when that tree has it)."""
    root = request.config.rootpath
    kind = request.config.getoption("impl") or os.environ.get("INFERLAB_IMPL") or "student"
    if kind == "student":
        path = root / "exercises" / "05" / "metrics.py"
    else:
        tree = request.config.getoption("solutions") or os.environ.get("INFERLAB_SOLUTIONS")
        path = Path(tree or root / "solutions").expanduser().resolve() / "05" / "metrics.py"
        if not path.is_file():
            path = root / "solutions" / "05" / "metrics.py"
    if not path.is_file():
        pytest.fail(f"exercise 05's metrics module is not at {path}", pytrace=False)
    return load_module(str(path))


@functools.cache
def load_module(path: str):
    name = f"inferlab_exercise_07_uses_{Path(path).parent.parent.name}_{Path(path).parent.name}_{Path(path).stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def req(loadgen, prompt: str, max_tokens: int = 8, prompt_len: int | None = 10):
    return loadgen.TraceRequest(prompt, max_tokens, prompt_len)


def text_steps(entry: dict, plan: list[dict]) -> list[float]:
    """The server's write times of the scripted steps that carry a token's text."""
    return [t for t, step in zip(entry["steps"], plan, strict=False) if step.get("text")]


def check_times(got: list[float], expected: list[float], what: str, mistakes=()) -> None:
    """Each client timestamp within TOL of the server's write of the same token; else name a known mistake."""
    if len(got) == len(expected) and all(abs(g - e) <= TOL for g, e in zip(got, expected, strict=True)):
        return
    for wrong, why in mistakes:
        if len(got) == len(wrong) and all(abs(g - w) <= TOL for g, w in zip(got, wrong, strict=True)):
            pytest.fail(f"{what}: {why}", pytrace=False)
    if len(got) == len(expected) > 1 and max(got) - min(got) <= TOL < (max(expected) - min(expected)) / 2:
        pytest.fail(f"{what}: every token got one timestamp, though the server wrote them "
                    f"{1e3 * (max(expected) - min(expected)):.0f} ms apart: take the time as each event is read from "
                    "the stream, not once per response", pytrace=False)  # fmt: skip
    base = min(expected + got, default=0.0)
    show = lambda times: "[" + ", ".join(f"{(t - base) * 1e3:.1f}" for t in times) + "] ms"  # noqa: E731
    pytest.fail(f"{what}: expected tokens at {show(expected)}, got {show(got)} (server's clock, same origin)",
                pytrace=False)  # fmt: skip


def check_sent(record, entry: dict, what: str) -> None:
    received = entry["received"]
    if record.arrival > received:
        pytest.fail(f"{what}: the send time {1e3 * (record.arrival - received):.1f} ms after the server received it: "
                    "take the send time just before sending, not when the response headers or a token arrive",
                    pytrace=False)  # fmt: skip
    assert received - record.arrival <= SETUP, (
        f"{what}: sent {1e3 * (received - record.arrival):.0f} ms before the server received it: the send time is "
        "when the request goes out (after waiting for a concurrency slot), not when it was scheduled"
    )


# --- what every streamed answer must give ---------------------------------------------------------------------------

STEADY = [token(0.15, "a"), token(0.05, "b"), token(0.05, "c"), finish(0.0, "length", 3), done()]
ONE_TOKEN = [token(0.10, "x"), finish(0.0, "length", 1), done()]
SLOW_HEADERS = [token(0.05, "h"), token(0.10, "i"), done()]  # the headers come 0.2 s before the first token
EMPTY_FIRST = [raw(0.0, sse_chunk("")), token(0.12, "e"), token(0.06, "f"), finish(0.0, "stop", 2), done()]
CLOSED_EARLY = [token(0.10, "p"), token(0.10, "q")]  # no [DONE]: the server closes the connection
NO_DONE = [token(0.10, "s"), token(0.05, "t"), finish(0.0, "length", 2)]  # complete, as transformers serve ends it
ERROR_EVENT = [token(0.10, "r"), error_event(0.05, "the engine died")]


def mixed_trace(loadgen):
    return [
        req(loadgen, script("steady", *STEADY), 3),
        req(loadgen, script("one-token", *ONE_TOKEN), 1),
        req(loadgen, script("slow-headers", *SLOW_HEADERS, headers_after=0.2), 2),
        req(loadgen, script("empty-first", *EMPTY_FIRST), 2),
        req(loadgen, script("refused", status=400, headers_after=0.05, message="max_tokens is too large"), 4),
        req(loadgen, script("closed-early", *CLOSED_EARLY), 4),
        req(loadgen, script("error-event", *ERROR_EVENT), 4),
        req(loadgen, script("no-done", *NO_DONE), 2),
    ]


PLANS = {"steady": STEADY, "one-token": ONE_TOKEN, "slow-headers": SLOW_HEADERS, "empty-first": EMPTY_FIRST,
         "closed-early": CLOSED_EARLY, "error-event": ERROR_EVENT, "no-done": NO_DONE}  # fmt: skip
NAMES = ["steady", "one-token", "slow-headers", "empty-first", "refused", "closed-early", "error-event", "no-done"]


def test_every_token_is_timestamped_when_it_arrives(loadgen, server):
    result = loadgen.run(server.url, "scripted", mixed_trace(loadgen))
    entries = server.entries()
    assert [r.index for r in result.records] == list(range(8)), "one record per trace request, in trace order"
    for name, record in zip(NAMES, result.records, strict=True):
        entry = entries[name]
        check_sent(record, entry, f"request {name!r}")
        if name in ("refused", "closed-early", "error-event"):
            continue
        expected = text_steps(entry, PLANS[name])
        header_time = entry["received"] + (0.2 if name == "slow-headers" else 0.0)
        check_times(record.token_times, expected, f"request {name!r}", [
            ([header_time] * len(expected), "every token timestamped when the response headers arrived: take the "
                                            "time as each event is read from the stream"),
            ([entry["steps"][-1]] * len(expected), "every token timestamped at the end of the stream: read it as "
                                                   "it arrives, event by event"),
            ([entry["steps"][0]] + expected, "a chunk with empty text (the first, or the last with finish_reason) "
                                             "counted as a token"),
            (expected + [entry["steps"][-2]], "a chunk with empty text (the last, with finish_reason) counted as "
                                              "a token"),
        ])  # fmt: skip
    ttft = {name: r.token_times[0] - r.arrival for name, r in zip(NAMES, result.records, strict=True) if r.token_times}
    assert ttft["slow-headers"] >= 0.25 - TOL, (
        f"TTFT of a request whose headers took 0.2 s and first token 0.05 s more: {ttft['slow-headers']:.3f} s, "
        "expected about 0.25 s: the response headers are not the first token"
    )


def test_failed_requests_are_marked_with_the_reason(loadgen, server):
    records = loadgen.run(server.url, "scripted", mixed_trace(loadgen)).records
    by_name = dict(zip(NAMES, records, strict=True))
    for name in ("steady", "one-token", "slow-headers", "empty-first"):
        assert not by_name[name].failed, f"request {name!r} completed, but was marked failed: {by_name[name].error}"
    refused, closed, errored = by_name["refused"], by_name["closed-early"], by_name["error-event"]
    assert refused.failed and "max_tokens is too large" in refused.error, (
        f"an HTTP 400 answer must fail the request with the server's error message, got failed={refused.failed}, "
        f"error={refused.error!r}"
    )
    assert refused.token_times == [], "a refused request has no tokens"
    assert closed.failed, (
        "a stream that the server closed before data: [DONE] was counted as completed: it is a failed request "
        f"(got failed=False with {len(closed.token_times)} tokens)"
    )
    assert "[DONE]" in closed.error, f"say why it failed, e.g. 'the stream ended before data: [DONE]': {closed.error!r}"
    assert not by_name["no-done"].failed, (
        "a stream that ends after a chunk with a finish_reason but without data: [DONE] is complete (transformers "
        f"serve ends its streams so), but it was marked failed: {by_name['no-done'].error!r}"
    )
    assert errored.failed and "the engine died" in errored.error, (
        "an error event in the stream (data: {\"error\": ...}) must fail the request with its message, got "
        f"failed={errored.failed}, error={errored.error!r}"
    )
    assert [r.finish_reason for r in records[:2]] == ["length", "length"], "the finish_reason of the last chunk"
    assert records[0].text == "abc" and records[3].text == "ef", "the text streamed back, joined"


def test_events_are_parsed_across_network_writes(loadgen, server):
    half = 'data: {"choices": [{"index": 0, "text": "a"'
    framing = [raw(0.10, half), raw(0.10, ', "finish_reason": null}]}\n\n'),  # one event in two writes
               raw(0.10, sse_chunk("b") + sse_chunk("c")),  # two events in one write: two tokens at once
               raw(0.05, ": keep-alive\n\n"), raw(0.05, "event: message\n" + sse_chunk("d")),
               raw(0.05, 'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4}}\n\n'),
               done()]  # fmt: skip
    merged = [token(0.10, "ab"), token(0.10, "c"), finish(0.0, "length", completion_tokens=3), done()]
    trace = [req(loadgen, script("framing", *framing), 4, prompt_len=None), req(loadgen, script("merged", *merged), 3)]
    framed, joined = loadgen.run(server.url, "scripted", trace).records
    entries = server.entries()
    steps = entries["framing"]["steps"]
    assert not framed.failed, f"a well-formed stream failed: {framed.error}"
    check_times(framed.token_times, [steps[1], steps[2], steps[2], steps[4]],
                "an event split across two writes, two events in one write, a comment and an 'event:' line", [
        ([steps[1], steps[2], steps[4]], "two events that arrive in one network read are two tokens: split the "
                                         "stream into lines, not reads"),
    ])  # fmt: skip
    assert framed.prompt_len == 7, f"the server's usage.prompt_tokens replaces the caller's count: {framed.prompt_len}"
    steps = entries["merged"]["steps"]
    check_times(joined.token_times, [steps[0], steps[1], steps[1]], "two tokens in one chunk, usage says 3 tokens", [
        ([steps[0], steps[1]], "the server's usage.completion_tokens counts the tokens when chunks carry several: the "
                               "extra ones arrived by the last chunk"),
    ])  # fmt: skip


def test_the_request_body_is_an_openai_streamed_completion(loadgen, server):
    trace = [req(loadgen, script("body", *ONE_TOKEN), 5)]
    loadgen.run(server.url + "/v1", "course-model", trace, extra_body={"ignore_eos": True})
    body = server.entries()["body"]["body"]
    expected = {"model": "course-model", "max_tokens": 5, "stream": True, "ignore_eos": True}
    got = {key: body.get(key) for key in expected}
    assert got == expected, f"request body fields: expected {expected}, got {got} (base URL ending in /v1 allowed)"
    assert body.get("stream_options") == {"include_usage": True}, "ask for usage in the last chunk (stream_options)"
    assert body.get("temperature") == 0.0, "greedy unless extra_body says otherwise: temperature 0.0"


# --- schedules: Poisson arrivals and a fixed concurrency --------------------------------------------------------------


def test_poisson_arrivals_have_exponential_gaps(loadgen):
    seed, rate, n = random.randrange(2**31), 4.0, 5000
    arrivals = loadgen.poisson_arrivals(n, rate, seed)
    assert len(arrivals) == n and arrivals[0] == 0.0, "n arrival times, the first at 0.0"
    assert all(b >= a for a, b in pairwise(arrivals)), "arrival times never decrease"
    gaps = sorted(b - a for a, b in pairwise(arrivals))
    mean = sum(gaps) / len(gaps)
    assert abs(mean * rate - 1) < 0.06, (
        f"mean gap {mean:.4f} s at {rate} requests/s, expected 1 / rate = {1 / rate} s"
        + (": the rate was used as the mean gap (expovariate takes the rate, 1 / mean)" if mean > 1 else "")
    )
    cv = math.sqrt(sum((g - mean) ** 2 for g in gaps) / (len(gaps) - 1)) / mean
    # Kolmogorov-Smirnov distance to the exponential distribution; 2.76 / sqrt(n) is the 1e-6 critical value
    ks = max(max(abs((i + 1) / len(gaps) - f), abs(i / len(gaps) - f))
             for i, f in enumerate(1 - math.exp(-rate * g) for g in gaps))  # fmt: skip
    assert abs(cv - 1) < 0.1 and ks < 2.76 / math.sqrt(len(gaps)), (
        f"the gaps between arrivals are not exponential (coefficient of variation {cv:.3f}, expected 1; KS distance "
        f"{ks:.4f}, at most {2.76 / math.sqrt(len(gaps)):.4f}): a Poisson process has exponential gaps, not uniform "
        "or fixed ones"
    )
    assert loadgen.poisson_arrivals(n, rate, seed) == arrivals, "the same seed gives the same schedule"
    assert loadgen.poisson_arrivals(n, rate, seed + 1) != arrivals, "another seed gives another schedule"
    assert loadgen.poisson_arrivals(3, math.inf, seed) == [0.0, 0.0, 0.0], "request_rate=inf: everything at time 0"


def test_requests_go_out_at_their_arrival_times(loadgen, server):
    seed = random.randrange(2**31)
    trace = [req(loadgen, script(f"p{i}", token(0.01, "x"), done()), 1) for i in range(8)]
    result = loadgen.run(server.url, "scripted", trace, request_rate=10.0, seed=seed)
    arrivals = loadgen.poisson_arrivals(8, 10.0, seed)
    late = [r.arrival - (result.start + at) for r, at in zip(result.records, arrivals, strict=True)]
    assert all(-1e-6 <= d <= 0.1 for d in late), (
        "each request must be sent at start + its arrival time (Poisson schedule from the same seed); sent "
        f"{[round(d * 1e3, 1) for d in late]} ms after it"
        + (": requests sent at once, not at the schedule's arrival times" if min(late) < -0.05 else "")
    )
    entries = server.entries()
    for i, record in enumerate(result.records):
        check_sent(record, entries[f"p{i}"], f"request {i}")
    given = [0.0, 0.3, 0.3, 0.45]
    result = loadgen.run(server.url, "scripted", trace[:4], arrivals=given)
    late = [r.arrival - (result.start + at) for r, at in zip(result.records, given, strict=True)]
    assert all(-1e-6 <= d <= 0.1 for d in late), f"explicit arrival times {given}: sent {late} s after them"


def test_the_concurrency_cap_is_reached_and_never_exceeded(loadgen, server):
    trace = [req(loadgen, script(f"c{i}", token(0.25, "x"), done()), 1) for i in range(9)]
    result = loadgen.run(server.url, "scripted", trace, max_concurrency=3)
    seen = server.log()["max_in_flight"]
    assert seen <= 3, f"at most 3 requests in flight with max_concurrency=3: the server held {seen} at once (the cap " \
                      "was exceeded: hold the slot until the whole answer has streamed back)"
    assert seen == 3, f"max_concurrency=3 must keep 3 requests in flight, the server saw at most {seen}"
    assert result.duration >= 0.75 - TOL, f"9 requests of 0.25 s, 3 at a time, took only {result.duration:.3f} s"
    entries = server.entries()
    for i, record in enumerate(result.records):
        check_sent(record, entries[f"c{i}"], f"request {i} (capped at 3 in flight)")
        # when it was sent, a slot was free: fewer than 3 others had been sent and not yet answered in full
        busy = [j for j, other in enumerate(result.records)
                if j != i and other.arrival <= record.arrival < entries[f"c{j}"]["closed"]]  # fmt: skip
        assert len(busy) < 3, (
            f"request {i}'s send time is while requests {busy} were in flight: with max_concurrency=3, take the send "
            "time after waiting for a concurrency slot"
        )


def test_all_requests_in_flight_without_a_cap(loadgen, server):
    n = 130
    trace = [req(loadgen, script(f"u{i}", token(1.5, "x"), done()), 1) for i in range(n)]  # 1.5 s: time to connect all
    result = loadgen.run(server.url, "scripted", trace)
    seen = server.log()["max_in_flight"]
    assert seen == n, (
        f"{n} requests sent at once with no concurrency cap: the server held at most {seen} at once"
        + (": the HTTP client's connection pool caps concurrency (httpx allows 100 connections unless told "
           "otherwise)" if seen == 100 else "")
    )  # fmt: skip
    assert not any(r.failed for r in result.records), [r.error for r in result.records if r.failed][:3]


# --- a run is bounded, and the summary is exercise 05's ---------------------------------------------------------------


def test_the_run_stops_at_its_time_limit(loadgen, server):
    trace = [req(loadgen, script("quick", token(0.05, "x"), done()), 1),
             req(loadgen, script("stalled", token(5.0, "x"), done()), 1),
             req(loadgen, script("never-sent", token(0.05, "x"), done()), 1)]  # fmt: skip
    began = time.perf_counter()
    result = loadgen.run(server.url, "scripted", trace, arrivals=[0.0, 0.0, 3.0], time_limit=0.6)
    took = time.perf_counter() - began
    assert took < 2.5, f"a run with time_limit=0.6 s took {took:.2f} s: it must stop at its time limit by itself"
    quick, stalled, never = result.records
    assert not quick.failed and stalled.failed and never.failed, (
        "the request that finished counts; the one still streaming and the one never sent at the time limit fail, "
        f"got failed = {[r.failed for r in result.records]}"
    )
    assert "time limit" in stalled.error, f"say why: {stalled.error!r}"
    assert [e["id"] for e in server.log()["requests"]].count("never-sent") == 0, "a request due after the limit is sent"
    assert 0.6 - TOL <= result.duration <= 0.6 + 0.3, f"duration of a run stopped at 0.6 s: {result.duration:.3f} s"


def test_an_unreachable_server_fails_each_request(loadgen):
    with __import__("socket").socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = loadgen.run(url, "scripted", [req(loadgen, "hello", 4)] * 2, request_timeout=5.0)
    errors = [r.error for r in result.records]
    assert all(r.failed and "connect" in r.error.lower() for r in result.records), (
        f"connection refused must fail each request with the reason (a connection error), not raise: {errors}"
    )


def test_the_summary_is_exercise_05s_serving_metrics(loadgen, server, exercise_05_metrics):
    trace = mixed_trace(loadgen)[:5]
    result = loadgen.run(server.url, "scripted", trace)
    last = max(t for r in result.records for t in r.token_times)
    assert result.start <= min(r.arrival for r in result.records), "the run starts before its first request"
    assert last - result.start <= result.duration <= last - result.start + 0.1, (
        f"the duration is the run's wall time, from its start until every answer ended: {result.duration:.3f} s, "
        f"last token at {last - result.start:.3f} s"
    )
    options = dict(ttft_slo=0.2, tpot_slo=0.06, gpu_hour_price=3.6)
    try:
        expected = exercise_05_metrics.serving_metrics(result.records, result.duration, **options)
    except NotImplementedError as exc:
        pytest.fail(f"the summary reuses exercise 05's serving_metrics, which is not done yet: {exc}", pytrace=False)
    got = loadgen.summarize(result, exercise_05_metrics, **options)
    assert got == expected, f"summarize must be exercise 05's serving_metrics of the records:\n{got}\n!=\n{expected}"
    assert (got.completed, got.failed, got.total_output_tokens) == (4, 1, 8), (
        f"4 completed (8 tokens), 1 refused: got completed={got.completed}, failed={got.failed}, "
        f"tokens={got.total_output_tokens}"
    )


def test_bad_input_is_refused_before_anything_is_sent(loadgen, server):
    good = [req(loadgen, script("bad", *ONE_TOKEN), 1)]
    run = functools.partial(loadgen.run, server.url, "scripted")
    cases = [
        (ValueError, lambda: run(good, request_rate=0.0), "request_rate=0"),
        (ValueError, lambda: run(good, request_rate=-2.0), "a negative request_rate"),
        (ValueError, lambda: run(good, request_rate=float("nan")), "request_rate=nan"),
        (ValueError, lambda: run(good, max_concurrency=0), "max_concurrency=0"),
        (ValueError, lambda: run(good, max_concurrency=2.5), "max_concurrency=2.5"),
        (ValueError, lambda: run([]), "an empty trace"),
        (ValueError, lambda: run([req(loadgen, "x", 0)]), "max_tokens=0"),
        (TypeError, lambda: run([req(loadgen, b"x", 1)]), "a bytes prompt"),
        (ValueError, lambda: loadgen.run("127.0.0.1:1", "scripted", good), "a base URL without http://"),
        (ValueError, lambda: run(good * 2, arrivals=[0.0]), "one arrival time for two requests"),
        (ValueError, lambda: run(good * 2, arrivals=[0.5, 0.1]), "decreasing arrival times"),
        (ValueError, lambda: run(good, arrivals=[-1.0]), "a negative arrival time"),
        (ValueError, lambda: run(good, time_limit=0), "time_limit=0"),
        (ValueError, lambda: loadgen.poisson_arrivals(-1, 1.0), "-1 requests"),
        (ValueError, lambda: loadgen.poisson_arrivals(4, 0.0), "poisson_arrivals at rate 0"),
    ]
    for error, call, what in cases:
        expect_error(error, call, what)
    assert server.log()["count"] == 0, "refused input must send nothing"
