"""An OpenAI-compatible HTTP server in front of the engine's step loop (FastAPI + uvicorn).

    python3 -m engine.server --model fixtures/course_model/target --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "fixtures/course_model/target", "prompt": "def main():", "max_tokens": 32, "temperature": 0}'

Endpoints: `POST /v1/completions` and `POST /v1/chat/completions` (streamed as server-sent events when `stream` is
true, with a last `usage` chunk when `stream_options.include_usage`), `GET /v1/models`, `GET /health`, `GET
/metrics` (Prometheus text format, vLLM's metric names: engine/metrics.py). Errors have the OpenAI shape
`{"error": {"message", "type", "param", "code"}}` with a 4xx status for the client's mistakes (malformed JSON, wrong
types, unknown model, bad `max_tokens`, a prompt longer than the context) and 5xx for the engine's.

One thread owns the engine: it adds and aborts requests and runs `step()` while any request is unfinished. Request
handlers never touch the engine; they hand it commands through a thread-safe queue and receive each request's
outputs on an asyncio queue of their own. All requests that arrive while a step runs join the next step together:
that is where continuous batching comes from. A client that disconnects aborts its request, which frees its KV
blocks at once.

Chat template. The course model reads bytes and has no chat template, so this server formats a conversation as one
line per message, `<role>: <content>`, and then `assistant: ` for the model to continue:

    system: You write Python.
    user: A function that adds two numbers.
    assistant: _

engine/tokenizer.py's `chat_prompt` lays it out; a checkpoint whose transformers tokenizer carries a chat template
of its own is formatted with that template instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from .metrics import CONTENT_TYPE, ServerMetrics
from .types import RequestOutput, SamplingParams

log = logging.getLogger("engine.server")
DEFAULT_COMPLETION_MAX_TOKENS = 16  # the OpenAI completions API's default; chat defaults to the rest of the context


# --- errors in the OpenAI shape --------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 404:
            kind = "not_found_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


# --- request bodies --------------------------------------------------------------------------------------------------


class StrictBody(BaseModel):
    # Strict: "16" is not a number and true is not 1. Unknown fields are ignored, as OpenAI's clients send many.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(StrictBody):
    include_usage: bool = False


# OpenAI fields this server does not implement, with the value that asks for nothing: any other value is refused
# rather than silently ignored. Fields not named here nor declared below (user, metadata, ...) are ignored.
NOT_IMPLEMENTED = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "best_of": 1, "suffix": None,
                   "tools": None, "response_format": None, "top_logprobs": None}  # fmt: skip


class GenerationBody(StrictBody):
    """The fields completions and chat share. `ignore_eos` is vLLM's extension (a benchmark's fixed output length)."""

    model_config = ConfigDict(strict=True, extra="allow")
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False


class CompletionBody(GenerationBody):
    prompt: str | list[int]
    echo: bool = False
    logprobs: int | None = None


class TextPart(StrictBody):
    type: Literal["text"]
    text: str


class ChatMessage(StrictBody):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatBody(GenerationBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False


# --- text: prompts in, incremental text out ------------------------------------------------------------------------


class TextStream:
    """One request's generated tokens as text, released in pieces that never change afterwards.

    Decoding is incremental: each step decodes only a window of the last tokens (the new ones, plus those of the
    previous window, so that a tokenizer that joins pieces, such as a leading space, joins them as it would in the
    whole text), and a character whose bytes have not all arrived (decoded as U+FFFD) waits for the next tokens.
    Text that could still turn into a stop string (the last len(longest stop) - 1 characters) is held back until the
    next tokens decide it. A stop string ends the text before it (OpenAI's rule: the stop string is not returned).
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]):
        self.decode, self.stop = decode, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""  # every complete character decoded so far
        self.sent = 0  # characters released so far
        self.stopped = False  # a stop string was found
        self._window = 0  # the decoding window starts at this token
        self._decoded = 0  # tokens already in self.text

    def add(self, token_ids: list[int], finished: bool) -> str:
        """The new text to release after `token_ids`; all the rest of it once `finished` or a stop string is hit."""
        self.token_ids += token_ids
        before = self.decode(self.token_ids[self._window : self._decoded])
        after = self.decode(self.token_ids[self._window :])
        if finished or not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._window, self._decoded = self._decoded, len(self.token_ids)
        # A stop string cannot begin in released text: the last `hold` characters are never released unfinished.
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            end, self.stopped = min(hits), True
        elif finished:
            end = len(self.text)
        else:
            end = max(self.sent, len(self.text) - self.hold)
        piece, self.sent = self.text[self.sent : end], end
        return piece


# --- the engine thread ------------------------------------------------------------------------------------------------


@dataclass
class Tracked:
    """A request the engine thread is serving: where its outputs go, and its timestamps for the metrics."""

    sink: Callable[[Any], None]
    arrival: float
    first_token: float | None = None
    last_token: float | None = None


@dataclass
class Accepted:
    """The engine took the request (add_request returned): the reply may start."""

    request_id: str


@dataclass
class EngineThread:
    """Owns the engine: every engine call happens on this thread, in the order the commands arrived."""

    engine: Any
    metrics: ServerMetrics
    commands: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    tracked: dict[str, Tracked] = field(default_factory=dict)
    dead: str | None = None  # why the engine can no longer serve, once one of its calls failed
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="engine-step-loop", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.commands.put(None)
        if self.thread is not None:
            self.thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self.dead is None and self.thread is not None and self.thread.is_alive()

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, sink) -> None:
        if self.dead is not None:
            raise APIError(503, f"the engine has stopped serving: {self.dead}", code="engine_dead")
        self.commands.put(("add", request_id, prompt_ids, params, sink, time.perf_counter()))

    def abort(self, request_id: str) -> None:
        self.commands.put(("abort", request_id))

    # everything below runs on the engine thread

    def _run(self) -> None:
        try:
            while True:
                busy = bool(self.tracked) or self._has_work()
                if not self._drain(block=not busy):
                    return
                if self.tracked or self._has_work():
                    self._step()
        except BaseException as exc:  # the thread must not die silently: requests would wait forever
            self._fail_all("the server's engine thread", exc)
            raise

    def _has_work(self) -> bool:
        if self.dead is not None:
            return False
        try:
            return bool(self.engine.has_unfinished_requests())
        except Exception as exc:  # noqa: BLE001  (a student's engine may fail anywhere: say so, keep the server up)
            self._fail_all("the engine's has_unfinished_requests()", exc)
            return False

    def _drain(self, block: bool) -> bool:
        """Carry out every queued command (waiting for one if `block`); False once asked to stop."""
        try:
            command = self.commands.get(timeout=None if block else 0)
        except queue.Empty:
            return True
        while command is not None:
            if command[0] == "add":
                self._add(*command[1:])
            else:
                self._abort(command[1])
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return True
        return False

    def _add(self, request_id, prompt_ids, params, sink, arrival) -> None:
        if self.dead is not None:
            sink(APIError(503, f"the engine has stopped serving: {self.dead}", code="engine_dead"))
            return
        try:
            self.engine.add_request(request_id, prompt_ids, params)
        except (ValueError, TypeError) as exc:  # the engine refused this request: the client's problem, state intact
            sink(bad_request(f"the engine refused the request: {exc}"))
            return
        except Exception as exc:  # noqa: BLE001
            log.exception("add_request failed")
            sink(APIError(500, f"add_request failed: {type(exc).__name__}: {exc}", code="engine_error"))
            return
        self.tracked[request_id] = Tracked(sink, arrival)
        sink(Accepted(request_id))

    def _abort(self, request_id: str) -> None:
        if self.tracked.pop(request_id, None) is None:
            return  # finished (or failed) before the abort arrived
        try:
            self.engine.abort_request(request_id)
        except Exception:  # noqa: BLE001
            log.exception("abort_request(%r) failed", request_id)
        self.metrics.request_finished("abort", None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
            if not isinstance(outputs, list) or not all(isinstance(o, RequestOutput) for o in outputs):
                raise TypeError(f"step() must return a list of RequestOutput, got {str(outputs)[:200]}")
            stats = self.engine.stats()
            now = time.perf_counter()
            self.metrics.after_step(stats)
            for output in outputs:
                self._deliver(output, now)
            lost = self.tracked and not self.engine.has_unfinished_requests()
        except Exception as exc:  # noqa: BLE001
            self._fail_all("the engine's step()", exc)
            return
        if lost:  # the engine says it is done, yet these requests never got their last output
            for request_id, tracked in self.tracked.items():
                tracked.sink(APIError(500, f"the engine lost request {request_id}: has_unfinished_requests() is "
                                           "False, but no step returned it finished", code="engine_error"))  # fmt: skip
            self.tracked.clear()

    def _deliver(self, output: RequestOutput, now: float) -> None:
        tracked = self.tracked.get(output.request_id)
        if tracked is None:
            return  # aborted by its client
        if output.new_token_ids:
            if tracked.first_token is None:
                tracked.first_token = now
                self.metrics.first_token(now - tracked.arrival)
            else:
                self.metrics.inter_token(now - tracked.last_token)
            tracked.last_token = now
        tracked.sink(output)
        if output.finished:
            del self.tracked[output.request_id]
            self.metrics.request_finished(output.finish_reason or "stop", now - tracked.arrival)

    def _fail_all(self, call: str, exc: Exception) -> None:
        """The engine raised: every request in flight gets a 500, and the engine serves no more (its state is
        unknown); from now on requests get a 503 and /health says why."""
        log.error("%s failed", call, exc_info=exc)
        error = APIError(500, f"{call} failed: {type(exc).__name__}: {exc}", code="engine_error")
        for tracked in self.tracked.values():
            tracked.sink(error)
        self.tracked.clear()
        self.dead = error.message


# --- the app ---------------------------------------------------------------------------------------------------------


@dataclass
class ModelInfo:
    """What the server knows of the model besides the engine: its name, tokenizer and limits."""

    name: str
    encode: Callable[[str], list[int]]  # text -> prompt ids, <bos> included when the model uses one
    decode: Callable[[list[int]], str]  # generated ids -> text, special tokens dropped
    chat_prompt: Callable[[list[dict]], list[int]]  # [{"role", "content"}, ...] -> prompt ids (the chat template)
    max_model_len: int  # prompt + generated tokens, at most
    vocab_size: int


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


class Server:
    """The request handlers' side: validation, the engine thread's queues, the OpenAI response bodies."""

    def __init__(self, engine, model: ModelInfo):
        self.model = model
        self.metrics = ServerMetrics(model.name)
        self.engine_thread = EngineThread(engine, self.metrics)

    # validation: everything is checked here, before the engine sees the request

    def check_model(self, body: GenerationBody) -> None:
        if body.model != self.model.name:
            raise APIError(404, f"The model `{body.model}` does not exist: this server serves `{self.model.name}`.",
                           param="model", code="model_not_found")  # fmt: skip
        for name, value in (body.model_extra or {}).items():
            if name in NOT_IMPLEMENTED and value not in (None, NOT_IMPLEMENTED[name]):
                raise bad_request(f"{name} is not implemented by this server (got {value!r})", name, "not_implemented")

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.model.encode(prompt)
        if not prompt:
            raise bad_request("prompt must hold at least one token id", "prompt")
        outside = [t for t in prompt if not 0 <= t < self.model.vocab_size]
        if outside:
            raise bad_request(f"prompt token ids must lie in [0, {self.model.vocab_size}), got {outside[:5]}", "prompt")
        return list(prompt)

    def sampling_params(self, body: GenerationBody, max_tokens: int | None, prompt_len: int) -> SamplingParams:
        if body.n != 1:
            raise bad_request(f"n must be 1 (one completion per request), got {body.n}", "n")
        limit = self.model.max_model_len
        if prompt_len >= limit:
            message = f"This model's maximum context length is {limit} tokens, and the prompt has {prompt_len}"
            raise bad_request(f"{message}: no room for a completion.", "prompt", "context_length_exceeded")
        if max_tokens is None:
            max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if isinstance(body, CompletionBody) else limit - prompt_len
        if max_tokens < 1:
            raise bad_request(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
        if prompt_len + max_tokens > limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens, but {prompt_len + max_tokens} "
                              f"were requested ({prompt_len} in the prompt, {max_tokens} in the completion).",
                              "max_tokens", "context_length_exceeded")  # fmt: skip
        temperature = 1.0 if body.temperature is None else body.temperature
        if not 0 <= temperature <= 2:
            raise bad_request(f"temperature must lie in [0, 2], got {temperature}", "temperature")
        top_p = 1.0 if body.top_p is None else body.top_p
        if not 0 < top_p <= 1:
            raise bad_request(f"top_p must lie in (0, 1], got {top_p}", "top_p")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stop):
            raise bad_request("stop strings must not be empty", "stop")
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=body.seed, stop=stop,
                              ignore_eos=body.ignore_eos)  # fmt: skip

    # the engine thread's queues

    async def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> asyncio.Queue:
        """Hand the request to the engine thread; return its output queue once the engine has accepted it."""
        loop, outputs = asyncio.get_running_loop(), asyncio.Queue()

        def sink(item) -> None:  # called on the engine thread
            with contextlib.suppress(RuntimeError):  # the event loop closed: the server is shutting down
                loop.call_soon_threadsafe(outputs.put_nowait, item)

        self.engine_thread.submit(request_id, prompt_ids, params, sink)
        try:
            first = await outputs.get()
        except asyncio.CancelledError:
            self.engine_thread.abort(request_id)
            raise
        if isinstance(first, APIError):
            raise first
        return outputs

    async def results(self, request_id: str, outputs: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        """The request's outputs until it finishes; leaving early (a disconnect, a stop string) aborts it."""
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, APIError):
                    finished = True  # the engine thread has dropped the request already
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.engine_thread.abort(request_id)

    async def generate(self, request: Request, body: GenerationBody, prompt_ids: list[int], params: SamplingParams,
                       kind: Literal["completion", "chat"]) -> Response:  # fmt: skip
        request_id = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
        outputs = await self.submit(request_id, prompt_ids, params)
        reply = Reply(request_id, kind, self.model.name, len(prompt_ids), TextStream(self.model.decode, params.stop))
        results = self.results(request_id, outputs)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(reply.stream(results, include_usage), media_type="text/event-stream")
        collect = asyncio.ensure_future(reply.collect(results))
        while not collect.done():  # a non-streamed reply notices a disconnect by asking
            await asyncio.wait({collect}, timeout=0.25)
            if not collect.done() and await request.is_disconnected():
                collect.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await collect
                return Response(status_code=499)
        return JSONResponse(collect.result())


@dataclass
class Reply:
    """One response's bodies, streamed chunk by chunk or whole."""

    request_id: str
    kind: Literal["completion", "chat"]
    model: str
    prompt_tokens: int
    text: TextStream
    created: int = field(default_factory=lambda: int(time.time()))
    finish_reason: str | None = None

    def advance(self, output: RequestOutput) -> str:
        piece = self.text.add(output.new_token_ids, output.finished)
        if self.text.stopped:
            self.finish_reason = "stop"
        elif output.finished:
            self.finish_reason = output.finish_reason
        return piece

    async def pieces(self, results: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
        async with contextlib.aclosing(results):  # leaving at a stop string aborts the request at once
            async for output in results:
                piece = self.advance(output)
                if piece or self.finish_reason:
                    yield piece
                if self.finish_reason:
                    return

    @property
    def usage(self) -> dict:
        completion = len(self.text.token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}  # fmt: skip

    def envelope(self, choices: list, chunk: bool) -> dict:
        kind = {"completion": "text_completion", "chat": "chat.completion"}[self.kind]
        if chunk and self.kind == "chat":
            kind = "chat.completion.chunk"
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def choice(self, piece: str, chunk: bool) -> dict:
        if self.kind == "completion":
            return {"index": 0, "text": piece, "logprobs": None, "finish_reason": self.finish_reason}
        key, content = ("delta", {"content": piece}) if chunk else ("message", {"role": "assistant", "content": piece})
        return {"index": 0, key: content, "logprobs": None, "finish_reason": self.finish_reason}

    async def collect(self, results: AsyncIterator[RequestOutput]) -> dict:
        text = "".join([piece async for piece in self.pieces(results)])
        return self.envelope([self.choice(text, chunk=False)], chunk=False) | {"usage": self.usage}

    async def stream(self, results: AsyncIterator[RequestOutput], include_usage: bool) -> AsyncIterator[str]:
        try:
            if self.kind == "chat":
                role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}  # fmt: skip
                yield sse(self.envelope([role], chunk=True))
            async for piece in self.pieces(results):
                yield sse(self.envelope([self.choice(piece, chunk=True)], chunk=True))
            if include_usage:
                yield sse(self.envelope([], chunk=True) | {"usage": self.usage})
        except APIError as exc:  # the status line has gone out: the error travels as an event, as OpenAI's does
            yield sse(exc.body)
        yield sse("[DONE]")


def build_app(engine, model: ModelInfo) -> FastAPI:
    """The FastAPI app serving `engine`; the engine thread runs while the app does (its lifespan)."""
    server = Server(engine, model)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine_thread.start()
        yield
        server.engine_thread.stop()

    app = FastAPI(title="inferlab", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", code=None).response()

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionBody) -> Response:
        server.check_model(body)
        if body.echo or body.logprobs is not None:
            raise bad_request("echo and logprobs are not supported by this server", "echo" if body.echo else "logprobs")
        prompt_ids = server.prompt_ids(body.prompt)
        params = server.sampling_params(body, body.max_tokens, len(prompt_ids))
        return await server.generate(request, body, prompt_ids, params, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatBody) -> Response:
        server.check_model(body)
        if not body.messages:
            raise bad_request("messages must hold at least one message", "messages")
        if body.logprobs:
            raise bad_request("logprobs are not supported by this server", "logprobs")
        prompt_ids = model.chat_prompt([{"role": m.role, "content": m.text} for m in body.messages])
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = server.sampling_params(body, max_tokens, len(prompt_ids))
        return await server.generate(request, body, prompt_ids, params, "chat")

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model.name, "object": "model", "created": 0, "owned_by": "inferlab",
                "max_model_len": model.max_model_len}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> Response:
        if not server.engine_thread.alive:
            why = server.engine_thread.dead or "the engine thread is not running"
            return APIError(503, f"unhealthy: {why}", code="engine_dead").response()
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    return app


def validation_error(exc: RequestValidationError) -> APIError:
    """A body that is not JSON, or whose fields have the wrong types or values, as a 400 naming the field."""
    errors = exc.errors()
    if errors[0].get("type") == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {errors[0].get('msg')}", None, "json_invalid")
    field_path = [str(part) for part in errors[0].get("loc", ()) if part != "body"][:1]
    param = field_path[0] if field_path else None
    # A field of several accepted types (prompt: a string or token ids) reports one error per type: say them all.
    problems = []
    for error in errors:
        location = [str(part) for part in error.get("loc", ()) if part != "body"]
        if location[:1] == field_path and error.get("msg") not in problems:
            problems.append(error.get("msg"))
    given = errors[0].get("input")
    shown = json.dumps(given)[:80] if isinstance(given, str | int | float | bool | None | list | dict) else "?"
    what = " or ".join(problems) if len(problems) < 4 else f"{problems[0]} (or {len(problems) - 1} other types)"
    return bad_request(f"{param or 'the body'}: {what}; got {shown}", param, "invalid_type")


# --- the model's side: tokenizer and limits, from the checkpoint directory -------------------------------------------


def model_info(model_dir: str | Path, name: str | None = None) -> ModelInfo:
    """The checkpoint's tokenizer (engine/tokenizer.py), context length and vocabulary (its config.json)."""
    from .model_runner import load_config
    from .tokenizer import load_tokenizer

    config = load_config(model_dir)
    tokenizer = load_tokenizer(model_dir, config)
    return ModelInfo(name=name or str(model_dir), encode=tokenizer.encode, decode=tokenizer.decode,
                     chat_prompt=tokenizer.chat_prompt, max_model_len=int(config.max_position_embeddings),
                     vocab_size=int(config.vocab_size))  # fmt: skip


# --- running it ------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0) -> Iterator[str]:
    """Run `app` on a real uvicorn in a background thread; yield its base URL (http://host:port); stop it after.

    Port 0 takes a free port. The socket is bound here, before uvicorn starts, so the URL is known at once.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the server did not start on {host}:{sock.getsockname()[1]} within {timeout} s")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextlib.contextmanager
def serve(engine, model_dir: str | Path, name: str | None = None, host: str = "127.0.0.1") -> Iterator[str]:
    """`engine` behind the server on a free port of `host`, in this process; yields the base URL."""
    with serving(build_app(engine, model_info(model_dir, name)), host) as url:
        yield url


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m engine.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a Llama-architecture Hugging Face checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--impl", choices=("solution", "student"), default="solution",
                        help="whose step loop and parts serve: solutions/ or your exercises/")  # fmt: skip
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quantization", choices=("awq",), default=None)
    parser.add_argument("--served-model-name", default=None, help="the model's name in the API (default: --model)")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--num-blocks", type=int, default=None, help="KV blocks in the pool (default: the engine's)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--no-chunked-prefill", action="store_true")
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def build_engine(args: argparse.Namespace):
    """Exercise 07's `Engine` (the reference, or the student's with --impl student) on the checkpoint."""
    from .parts import load_module

    engine_class = load_module(args.impl, "07", "engine_loop").Engine
    return engine_class(args.model, impl=args.impl, device=args.device, num_blocks=args.num_blocks,
                        block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens,
                        enable_prefix_caching=not args.no_prefix_caching, chunked_prefill=not args.no_chunked_prefill,
                        quantization=args.quantization)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(build_engine(args), model_info(args.model, args.served_model_name))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
