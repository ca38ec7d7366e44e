"""The OpenAI-compatible server (engine/server.py) in front of the reference engine, on the course model.

A real uvicorn on a free loopback port per module, the official `openai` client (and httpx for what the client
refuses to send: malformed JSON, wrong types); outputs are checked against exercise 01's reference greedy `generate`,
metrics read from `/metrics` as Prometheus scrapes them.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import httpx
import openai
import pytest
import torch

from engine.metrics import read_metric
from engine.parts import load_module
from engine.server import TextStream, build_app, model_info, serve
from engine.tokenizer import ByteTokenizer
from fixtures.course_model import EOS, decode, encode, load_hf, path
from fixtures.llama import Llama

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = path("target")
NAME = "course"
PROMPTS = ("def main():\n", "import os\n\n\nclass ", "    for i in range(")
CONTEXT = 1024  # the course model's max_position_embeddings
USAGE = {"include_usage": True}


def engine_class():
    return load_module("solution", "07", "engine_loop").Engine


@pytest.fixture(scope="module")
def url():
    engine = engine_class()(MODEL_DIR, impl="solution", num_blocks=256, block_size=16, max_num_seqs=64)
    with serve(engine, MODEL_DIR, NAME) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@cache
def reference_model():
    return Llama(load_hf("target"))


@cache
def greedy(prompt: str, max_tokens: int) -> tuple[str, str, int]:
    """Exercise 01's greedy `generate` on the prompt: (text, finish_reason, completion tokens), cut after an EOS."""
    generate = load_module("solution", "01", "kv_cache").generate
    with torch.no_grad():
        tokens = generate(reference_model(), encode(prompt), max_tokens)[0].tolist()
    if EOS in tokens:
        tokens = tokens[: tokens.index(EOS) + 1]
        return decode(tokens), "stop", len(tokens)
    return decode(tokens), "length", len(tokens)


def chat_prompt(messages: list[dict]) -> str:
    """The server's documented chat layout for a model without a chat template: role lines, then "assistant: "."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=30).text


def grown(before: str, after: str, sample: str, **labels) -> float:
    """How much a counter (or a histogram's count or bucket) grew between two scrapes."""
    return read_metric(after, sample, **labels) - read_metric(before, sample, **labels)


def wait_for(condition, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: still not true after {timeout} s", pytrace=False)
        time.sleep(0.05)
    return result


def idle(url: str) -> bool:
    """No request running or waiting, and every KV block free (cached prefix blocks count as free)."""
    text = metrics(url)
    free, total = read_metric(text, "inferlab:num_free_blocks"), read_metric(text, "inferlab:num_total_blocks")
    busy = read_metric(text, "vllm:num_requests_running") + read_metric(text, "vllm:num_requests_waiting")
    return busy == 0 and total > 0 and free == total


# --- outputs -------------------------------------------------------------------------------------------------------


def test_completions_streamed_and_not_equal_exercise_01_greedy(client):
    for prompt in PROMPTS[:2]:
        text, finish, count = greedy(prompt, 24)
        whole = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0)
        assert (whole.choices[0].text, whole.choices[0].finish_reason) == (text, finish), f"prompt {prompt!r}"
        assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt) + 1, count)
        chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == text, f"streamed, prompt {prompt!r}"
        assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + [finish]
        assert all(c.usage is None for c in chunks), "usage was streamed without stream_options.include_usage"


def test_token_id_prompts_equal_text_prompts(client):
    text, _, _ = greedy(PROMPTS[0], 8)
    reply = client.completions.create(model=NAME, prompt=encode(PROMPTS[0])[0].tolist(), max_tokens=8, temperature=0)
    assert reply.choices[0].text == text


def test_chat_streamed_and_not_equal_greedy_on_the_role_lines_template(client):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
    text, finish, count = greedy(chat_prompt(messages), 20)
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    assert whole.object == "chat.completion"
    assert (whole.choices[0].message.role, whole.choices[0].message.content) == ("assistant", text)
    assert (whole.choices[0].finish_reason, whole.usage.completion_tokens) == (finish, count)
    assert whole.usage.prompt_tokens == len(chat_prompt(messages)) + 1
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=20,
                                                 temperature=0, stream=True, stream_options=USAGE))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == count, "usage must come last, alone"
    assert chunks[-2].choices[0].finish_reason == finish


def test_usage_streams_in_a_last_chunk_when_asked(client):
    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (len(PROMPTS[1]) + 1, 6)
    assert chunks[-1].usage.total_tokens == len(PROMPTS[1]) + 1 + 6
    assert all(c.usage is None for c in chunks[:-1])


def test_a_stop_string_ends_the_text_before_it(client):
    text, _, _ = greedy(PROMPTS[0], 24)
    stop = text[6:8]
    expected = text[: text.index(stop)]
    whole = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop, "@@@"])
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (expected, "stop")
    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=stop,
                                            stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == expected, "streamed text must hold back a possible stop"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats_and_ignore_eos_runs_to_max_tokens(client):
    def sample(seed):
        return client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=16, temperature=1.0, top_p=0.9,
                                         seed=seed, extra_body={"ignore_eos": True})  # fmt: skip

    first, again = sample(1234), sample(1234)
    assert first.choices[0].text == again.choices[0].text
    assert (first.usage.completion_tokens, first.choices[0].finish_reason) == (16, "length")


@pytest.mark.parametrize("stop", [[], ["stop"], ["→", "zzz"], ["wörld"]])
def test_streamed_text_never_splits_a_character_nor_releases_a_possible_stop(stop):
    text = "héllo wörld → done; stop here"
    ids = list(text.encode())  # one token per byte: "é", "ö" and "→" arrive over two and three tokens
    stream, pieces = TextStream(ByteTokenizer().decode, stop), []
    for i, token in enumerate(ids):
        pieces.append(stream.add([token], finished=i == len(ids) - 1))
        if stream.stopped:
            break
    cut = min((text.index(s) for s in stop if s in text), default=len(text))
    assert "".join(pieces) == text[:cut] and stream.stopped == (cut < len(text))
    assert not any("\ufffd" in piece for piece in pieces), f"a character was released before its last byte: {pieces}"
    assert not any(s[:2] in "".join(pieces) for s in stop if s in text), "the start of a stop string was released"


# --- batching and the prefix cache ------------------------------------------------------------------------------------


def test_32_concurrent_streams_are_all_answered_and_batched(url):
    # Eight prompts, four requests each, interleaved: a reply handed to the wrong request shows as a wrong text.
    prompts = [f"{PROMPTS[i % 3]}x{i % 8} = " for i in range(32)]
    before = metrics(url)

    async def stream_all():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as aclient:

            async def one(prompt):
                stream = await aclient.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0,
                                                          stream=True, stream_options=USAGE)  # fmt: skip
                return [chunk async for chunk in stream]

            return await asyncio.gather(*(one(p) for p in prompts))

    replies = asyncio.run(stream_all())
    for prompt, chunks in zip(prompts, replies, strict=True):
        text, finish, count = greedy(prompt, 8)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == text, f"prompt {prompt!r}, in a batch"
        assert chunks[-1].usage.completion_tokens == count
    after = metrics(url)
    steps = grown(before, after, "inferlab:step_num_requests_count")
    alone = grown(before, after, "inferlab:step_num_requests_bucket", le="1.0")
    assert steps > alone, f"all {steps:.0f} steps ran one request each: the engine never batched"
    assert grown(before, after, "vllm:request_success_total") == 32


def test_a_repeated_prompt_hits_the_prefix_cache(client, url):
    prompt = "# a shared system prompt, long enough to fill several KV blocks of sixteen tokens\n" * 2
    before = metrics(url)
    for _ in range(2):
        client.completions.create(model=NAME, prompt=prompt, max_tokens=2, temperature=0)
    after = metrics(url)
    queries = grown(before, after, "vllm:prefix_cache_queries_total")
    hits = grown(before, after, "vllm:prefix_cache_hits_total")
    prompt_tokens = len(prompt) + 1
    assert queries >= 2 * prompt_tokens - 2, f"the two prompts' lookups were not counted: {queries}"
    assert hits >= (prompt_tokens - 1) // 16 * 16, f"the second prompt found {hits:.0f} cached tokens"


def test_metrics_carry_vllm_names(client, url):
    client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=3, temperature=0)
    text = metrics(url)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
                 "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count"):  # fmt: skip
        assert f"\n{name}{{" in text, f"/metrics has no {name}"
    assert read_metric(text, "vllm:time_to_first_token_seconds_count") >= 1
    assert read_metric(text, "vllm:request_success_total", finished_reason="length") >= 1


# --- bad requests and disconnects ------------------------------------------------------------------------------------

GOOD = {"model": NAME, "prompt": "x = ", "max_tokens": 4, "temperature": 0}
BAD = {
    "malformed JSON": ('{"model": "course", "prompt": ', 400, None),
    "unknown model": ({**GOOD, "model": "gpt-4"}, 404, "model"),
    "negative max_tokens": ({**GOOD, "max_tokens": -3}, 400, "max_tokens"),
    "zero max_tokens": ({**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    "huge max_tokens": ({**GOOD, "max_tokens": 10**12}, 400, "max_tokens"),
    "prompt longer than the context": ({**GOOD, "prompt": "y" * CONTEXT}, 400, "prompt"),
    "max_tokens as a string": ({**GOOD, "max_tokens": "4"}, 400, "max_tokens"),
    "prompt as a number": ({**GOOD, "prompt": 12}, 400, "prompt"),
    "token ids outside the vocabulary": ({**GOOD, "prompt": [1, 2, 99999]}, 400, "prompt"),
    "temperature as a list": ({**GOOD, "temperature": [0]}, 400, "temperature"),
    "negative temperature": ({**GOOD, "temperature": -1.0}, 400, "temperature"),
    "top_p of zero": ({**GOOD, "top_p": 0.0}, 400, "top_p"),
    "n of two": ({**GOOD, "n": 2}, 400, "n"),
    "no prompt": ({"model": NAME}, 400, "prompt"),
    "a penalty the server does not implement": ({**GOOD, "presence_penalty": 0.5}, 400, "presence_penalty"),
    "a body that is a list": ([GOOD], 400, None),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(url, case):
    body, status, param = BAD[case]
    for stream in (False, True):
        content = body if isinstance(body, str) else json.dumps(body if not isinstance(body, dict) else
                                                                {**body, "stream": stream})  # fmt: skip
        reply = httpx.post(f"{url}/v1/completions", content=content, headers={"Content-Type": "application/json"},
                           timeout=30)  # fmt: skip
        assert reply.status_code == status, f"{case}: expected HTTP {status}, got {reply.status_code}: {reply.text}"
        error = reply.json().get("error")
        assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, reply.text
        assert error["message"] and error["param"] == param, f"{case}: {error}"
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    assert httpx.post(f"{url}/v1/completions", json=GOOD, timeout=60).json()["usage"]["completion_tokens"] >= 1
    assert idle(url), f"{case}: the refused request left work or KV blocks behind"


def test_the_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="another-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "z" * CONTEXT}])
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=NAME, messages=[])


def test_a_client_that_disconnects_mid_stream_aborts_and_frees_every_block(url):
    wait_for(lambda: idle(url), "the server was idle before the test")
    before = read_metric(metrics(url), "vllm:request_success_total", finished_reason="abort")
    body = {**GOOD, "max_tokens": 900, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as reply:
        lines, chunks = reply.iter_lines(), 0
        while chunks < 3:
            chunks += next(lines).startswith("data: ")
        busy = metrics(url)  # before leaving the loop: dropping the line iterator closes the connection
        assert read_metric(busy, "inferlab:num_free_blocks") < read_metric(busy, "inferlab:num_total_blocks")
    wait_for(lambda: idle(url), "after the client disconnected, every KV block comes back")
    aborted = read_metric(metrics(url), "vllm:request_success_total", finished_reason="abort") - before
    assert aborted == 1, f"{aborted:.0f} requests were recorded as aborted"


# --- endpoints and the server's own life ---------------------------------------------------------------------------


def test_models_health_and_unknown_routes(client, url):
    models = client.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [(NAME, "model", "inferlab")]
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    reply = httpx.get(f"{url}/v2/nothing", timeout=30)
    assert reply.status_code == 404 and set(reply.json()["error"]) == {"message", "type", "param", "code"}


def test_every_server_has_its_own_metrics_registry():
    info = model_info(MODEL_DIR, NAME)
    first, second = build_app(None, info), build_app(None, info)  # building is enough: the registry is made then
    assert first.state.server.metrics.registry is not second.state.server.metrics.registry
    assert b"vllm:num_requests_running" in second.state.server.metrics.render()


def test_an_engine_whose_step_fails_answers_500_then_503_and_is_reported_unhealthy():
    class Failing(engine_class()):
        def step(self):
            raise RuntimeError("planted failure")

    engine = Failing(MODEL_DIR, impl="solution", num_blocks=64)
    with serve(engine, MODEL_DIR, NAME) as base:
        streamed = httpx.post(f"{base}/v1/completions", json={**GOOD, "stream": True}, timeout=60)
        events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
        assert streamed.status_code == 200 and "planted failure" in events[-1]["error"]["message"], streamed.text
        assert streamed.text.rstrip().endswith("data: [DONE]"), "a failed stream still ends with [DONE]"
        for reply in (httpx.post(f"{base}/v1/completions", json=GOOD, timeout=60), httpx.get(f"{base}/health")):
            assert reply.status_code == 503 and "planted failure" in reply.json()["error"]["message"], reply.text


def test_a_request_the_engine_never_finishes_gets_a_500_instead_of_waiting_forever():
    class Forgetful(engine_class()):
        def step(self):
            return [out for out in super().step() if not out.finished]  # the last output of each request goes missing

    with serve(Forgetful(MODEL_DIR, impl="solution", num_blocks=64), MODEL_DIR, NAME) as base:
        reply = httpx.post(f"{base}/v1/completions", json=GOOD, timeout=60)
        assert reply.status_code == 500 and "lost request" in reply.json()["error"]["message"], reply.text
        assert httpx.get(f"{base}/health", timeout=30).status_code == 200, "a lost request does not stop the engine"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_command_line_starts_the_server_on_the_course_model():
    port = free_port()
    command = [sys.executable, "-m", "engine.server", "--model", str(MODEL_DIR), "--host", "127.0.0.1", "--port",
               str(port), "--served-model-name", NAME, "--max-num-seqs", "8", "--log-level", "warning"]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        def healthy():
            if process.poll() is not None:
                pytest.fail(f"the server exited: {process.stdout.read().decode()[-2000:]}", pytrace=False)
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, "the server answers /health", timeout=90)
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=GOOD, timeout=60).json()
        assert reply["choices"][0]["text"] == greedy(GOOD["prompt"], 4)[0]
    finally:
        process.terminate()
        process.wait(timeout=30)
