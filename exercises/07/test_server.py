"""Exercise 07 specification, part 3: your step loop behind the OpenAI-compatible server.

engine/server.py serves your `Engine` on the course model: one thread owns the engine and calls `add_request`,
`abort_request` and `step()`; HTTP requests reach it through queues, so new requests are added between steps while
others are mid-decode, and a client that hangs up aborts its request in the middle of a stream. These tests talk to a
real uvicorn on a loopback port with the official `openai` client, and check replies against transformers' greedy
`generate` on each prompt alone, and the engine's state through `/metrics` (vLLM's metric names).

A failure in your engine reaches the client as an HTTP 500 whose message names the call that raised (and every later
request as a 503 naming it): read the message, then the step-loop tests (test_engine_loop.py) say more.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time

import httpx
import openai
import pytest
import torch

from engine.metrics import read_metric
from engine.parts import solutions_available
from engine.server import serve
from fixtures.course_model import EOS, decode, encode, load_hf
from fixtures.course_model import path as model_path

PARTS = "solution" if solutions_available() else "student"  # a student repo has no reference parts
MODEL = model_path("target")
NAME = "course"
USAGE = {"include_usage": True}
TIMEOUT = 120  # seconds for any one reply: an engine that never finishes a request fails instead of hanging


@pytest.fixture(scope="module")
def running():
    """Servers started by this module, one per engine module, all stopped at its end."""
    with contextlib.ExitStack() as stack:
        yield stack, {}


@pytest.fixture
def url(impl, running):
    stack, urls = running
    module = impl("engine_loop")
    if id(module) not in urls:
        engine = module.Engine(MODEL, impl=PARTS, num_blocks=128, max_num_seqs=32, max_num_batched_tokens=256)
        urls[id(module)] = stack.enter_context(serve(engine, MODEL, NAME))
    return urls[id(module)]


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


@functools.cache
def hf_model():
    return load_hf("target")


@functools.cache
def expected(prompt: str, max_tokens: int) -> tuple[str, str]:
    """transformers' greedy `generate` of the prompt alone: (text, finish_reason), the text cut at EOS."""
    with torch.no_grad():
        out = hf_model().generate(encode(prompt), max_new_tokens=max_tokens, do_sample=False, eos_token_id=EOS,
                                  pad_token_id=EOS)  # fmt: skip
    tokens = out[0, encode(prompt).shape[1] :].tolist()
    if EOS in tokens:
        return decode(tokens[: tokens.index(EOS)]), "stop"
    return decode(tokens), "length"


def check_reply(what: str, got: tuple[str, str | None], prompt: str, max_tokens: int) -> None:
    text, finish = expected(prompt, max_tokens)
    if got == (text, finish):
        return
    first = next((i for i, (a, b) in enumerate(zip(got[0], text, strict=False)) if a != b), min(len(got[0]), len(text)))
    pytest.fail(f"{what}, prompt {prompt!r}: expected greedy text {text!r} (finish_reason {finish!r}), got "
                f"{got[0]!r} ({got[1]!r}); they differ from character {first}", pytrace=False)  # fmt: skip


def call(what: str, request):
    """The reply to `request()`; a server error fails the test with the server's message (your engine's error)."""
    try:
        return request()
    except openai.APIStatusError as exc:
        pytest.fail(f"{what}: the server answered {exc.message}", pytrace=False)  # "Error code: 500 - ..."
    except openai.APIConnectionError as exc:
        pytest.fail(f"{what}: no reply from the server ({exc})", pytrace=False)


def metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=TIMEOUT).text


def blocks(url: str) -> tuple[float, float, float]:
    """(free KV blocks, total KV blocks, requests running or waiting), from /metrics."""
    text = metrics(url)
    busy = read_metric(text, "vllm:num_requests_running") + read_metric(text, "vllm:num_requests_waiting")
    return read_metric(text, "inferlab:num_free_blocks"), read_metric(text, "inferlab:num_total_blocks"), busy


def wait_until_idle(url: str, when: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (state := blocks(url))[0] != state[1] or state[2] or not state[1]:
        if time.monotonic() > deadline:
            pytest.fail(f"{when}: every KV block must come back and no request remain; after {timeout:.0f} s, "
                        f"{state[0]:.0f} of {state[1]:.0f} blocks are free and {state[2]:.0f} requests are left "
                        "(stats(): num_free_blocks, num_total_blocks, num_running, num_waiting)",
                        pytrace=False)  # fmt: skip
        time.sleep(0.05)


# --- tests -----------------------------------------------------------------------------------------------------------


def test_streamed_and_whole_replies_equal_greedy_decoding(client):
    for prompt in ("def main():\n", "class Config(object):\n    def __init__(self"):
        whole = call("a completion", lambda p=prompt: client.completions.create(
            model=NAME, prompt=p, max_tokens=20, temperature=0))  # fmt: skip
        check_reply("a completion", (whole.choices[0].text, whole.choices[0].finish_reason), prompt, 20)
        chunks = call("a streamed completion", lambda p=prompt: list(client.completions.create(
            model=NAME, prompt=p, max_tokens=20, temperature=0, stream=True, stream_options=USAGE)))  # fmt: skip
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = next((c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason), None)
        check_reply("a streamed completion", (text, finish), prompt, 20)
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens, "streamed usage differs"


def test_32_concurrent_streams_are_answered_correctly_and_batched(url):
    # Eight prompts, four requests each, interleaved: a reply handed to the wrong request shows as a wrong text.
    prompts = [f"{('import os', 'def f(x):', 'class A:', 'for i in')[i % 4]}  # {i % 8}\n" for i in range(32)]
    before = metrics(url)

    async def stream_all():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT) as aio:

            async def one(prompt):
                stream = await aio.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0,
                                                      stream=True, stream_options=USAGE)  # fmt: skip
                return [chunk async for chunk in stream]

            return await asyncio.gather(*(one(p) for p in prompts))

    replies = call("32 concurrent streamed completions", lambda: asyncio.run(stream_all()))
    for prompt, chunks in zip(prompts, replies, strict=True):
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = next((c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason), None)
        check_reply("one of 32 concurrent streams", (text, finish), prompt, 8)
    after = metrics(url)
    steps, alone = (read_metric(after, name, **labels) - read_metric(before, name, **labels)
                    for name, labels in (("inferlab:step_num_requests_count", {}),
                                         ("inferlab:step_num_requests_bucket", {"le": "1.0"})))  # fmt: skip
    assert steps > alone, (f"32 requests in flight together, yet each of the {steps:.0f} steps ran one request "
                           f"(stats().last_step_num_requests): the step loop does not batch")  # fmt: skip
    wait_until_idle(url, "after 32 concurrent requests finished")


def test_a_disconnect_mid_stream_aborts_and_frees_every_block_while_others_run(url):
    wait_until_idle(url, "before the test")
    before = read_metric(metrics(url), "vllm:request_success_total", finished_reason="abort")
    long = {"model": NAME, "prompt": "x = [", "max_tokens": 600, "temperature": 0, "stream": True, "ignore_eos": True}

    async def hang_up_while_another_runs():
        async with httpx.AsyncClient(timeout=TIMEOUT) as http, openai.AsyncOpenAI(
            base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT
        ) as aio:
            other = asyncio.ensure_future(aio.completions.create(model=NAME, prompt="import sys\n", max_tokens=24,
                                                                 temperature=0))  # fmt: skip
            async with http.stream("POST", f"{url}/v1/completions", json=long) as reply:
                chunks = 0
                async for line in reply.aiter_lines():
                    chunks += line.startswith("data: {")
                    if chunks == 4:
                        break  # leaving the block closes the connection mid-stream
            return await other

    other = call("a disconnect mid-stream beside another request", lambda: asyncio.run(hang_up_while_another_runs()))
    check_reply("the request running beside the aborted one", (other.choices[0].text, other.choices[0].finish_reason),
                "import sys\n", 24)  # fmt: skip
    wait_until_idle(url, "after a client disconnected mid-stream (abort_request)")
    aborted = read_metric(metrics(url), "vllm:request_success_total", finished_reason="abort") - before
    assert aborted == 1, f"the server recorded {aborted:.0f} aborted requests, expected the one that hung up"
