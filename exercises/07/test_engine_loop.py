"""Exercise 07 specification, part 1: the engine's step loop.

Your `Engine` serves the course model (fixtures/course_model/target) on the CPU with the reference parts of
exercises 02 and 05 (your own where this repo has no solutions/). Greedy outputs are checked token for token against
transformers' Llama decoding the same prompt alone; the runner's forward is watched, so that what each step computes
(how many tokens, from which position, in how many forwards) is checked as well as what comes out.
"""

from __future__ import annotations

import functools

import pytest
import torch

from engine.model_runner import one_thread
from engine.parts import solutions_available
from engine.types import RequestOutput, SamplingParams
from fixtures.checks import expect_error
from fixtures.course_model import encode, load_hf
from fixtures.course_model import path as model_path

PARTS = "solution" if solutions_available() else "student"  # a student repo has no reference parts
MODEL = model_path("target")
PROMPTS = [
    "def main():\n    ",
    "import os\nimport sys\n\n\nclass Config(object):\n    \"\"\"Settings read from",
    "    for key, value in sorted(items.items()):\n        if",
    "#!/usr/bin/env python3\n",
]


@pytest.fixture
def engine_module(impl):
    return impl("engine_loop")


@pytest.fixture
def make_engine(engine_module):
    def make(**options):
        options = {"impl": PARTS, "num_blocks": 64, "max_num_batched_tokens": 64, "max_num_seqs": 8, **options}
        engine = engine_module.Engine(MODEL, **options)
        engine.runner.forward = Recorder(engine.runner.forward)
        return engine

    return make


class Recorder:
    """Wraps runner.forward: keeps, per call, each sequence's (tokens computed, start position, samples?)."""

    def __init__(self, forward):
        self.forward = forward
        self.calls: list[list[tuple[int, int, bool]]] = []

    def __call__(self, seqs):
        self.calls.append([(len(s.token_ids), s.start, s.sample) for s in seqs])
        return self.forward(seqs)


def ids(text: str) -> list[int]:
    return encode(text)[0].tolist()


@functools.cache
def hf_model():
    with one_thread():
        return load_hf("target")


@functools.cache
def reference(prompt: tuple[int, ...], new_tokens: int) -> list[int]:
    """Greedy tokens of transformers' Llama for `prompt` alone (fp32; EOS does not stop it)."""
    model = hf_model()
    with torch.no_grad(), one_thread():
        out = model(torch.tensor([prompt]), use_cache=True)
        tokens = [int(out.logits[0, -1].argmax())]
        for _ in range(new_tokens - 1):
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def run(engine, limit: int = 400) -> dict[str, list[RequestOutput]]:
    """Step until the engine has nothing left; every output, grouped by request."""
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(limit):
        if not engine.has_unfinished_requests():
            return outputs
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    pytest.fail(f"the engine still had unfinished requests after {limit} steps", pytrace=False)


def tokens_of(outputs: list[RequestOutput]) -> list[int]:
    return [t for out in outputs for t in out.new_token_ids]


def check_tokens(name: str, got: list[int], expected: list[int], hint: str = "") -> None:
    if got == expected:
        return
    pairs = zip(got, expected, strict=False)
    first = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(got), len(expected)))
    pytest.fail(
        f"{name}: {len(got)} tokens, expected {len(expected)}; they differ from token {first}: expected "
        f"{expected[first : first + 5]}..., got {got[first : first + 5]}...{hint}",
        pytrace=False,
    )


def check_all_blocks_free(engine, when: str) -> None:
    stats = engine.stats()
    held = {i: engine.block_manager.ref_count(i) for i in range(stats.num_total_blocks)}
    leaked = {i: n for i, n in held.items() if n}
    assert not leaked and stats.num_free_blocks == stats.num_total_blocks, (
        f"{when}: every KV block must be free, got {stats.num_free_blocks} of {stats.num_total_blocks} free; blocks "
        f"still referenced {leaked}: a request's blocks were not freed (finished, aborted or preempted)"
    )


def greedy(max_tokens: int, **more) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **more)


# --- greedy outputs --------------------------------------------------------------------------------------------------


def test_greedy_outputs_of_concurrent_requests_equal_each_decoded_alone(make_engine):
    engine = make_engine(max_num_batched_tokens=24)  # prompts longer than a step: chunked prefill beside decodes
    prompts = [ids(text) for text in PROMPTS]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy(20))
    outputs = run(engine)
    for i, prompt in enumerate(prompts):
        check_tokens(f"request r{i} (prompt of {len(prompt)} tokens, decoded beside {len(prompts) - 1} others)",
                     tokens_of(outputs.get(f"r{i}", [])), reference(tuple(prompt), 20))  # fmt: skip
    for call in engine.runner.forward.calls:
        computed = sum(n for n, _, _ in call)
        assert computed <= 24, f"a step computed {computed} tokens, over the token budget of 24: {call}"
    check_all_blocks_free(engine, "after every request finished")


def test_one_forward_per_step_mixes_prefill_chunks_and_decodes(make_engine):
    engine = make_engine(max_num_batched_tokens=16)
    long_prompt = ids(PROMPTS[1])
    engine.add_request("short", ids(PROMPTS[0]), greedy(12))
    engine.step()
    engine.add_request("long", long_prompt, greedy(4))
    calls = engine.runner.forward.calls
    steps = 1
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        for n, start, sample in calls[-1] if calls else []:
            assert not (sample and n > 1 and start + n < len(long_prompt)), (
                f"a prefill chunk of {n} tokens from position {start} (the prompt has {len(long_prompt)}) asked for a "
                "sample: only a chunk that reaches the end of the known tokens samples"
            )
        assert steps < 100, "the engine still had unfinished requests after 100 steps"
    assert len(calls) == steps, (
        f"{steps} steps called runner.forward {len(calls)} times: every step must run its requests in one forward, "
        "not one forward per request"
    )
    mixed = [c for c in calls if any(n == 1 for n, _, _ in c) and any(n > 1 for n, _, _ in c)]
    assert mixed, f"no forward held both a decode and a prefill chunk; forwards (tokens, start, samples): {calls}"


# --- prefix caching and preemption ----------------------------------------------------------------------------------


def test_prefix_cache_hit_computes_only_the_uncached_tokens(make_engine):
    engine = make_engine(max_num_batched_tokens=128)  # the whole prompt in one step
    prompt = ids(PROMPTS[1])  # 3 full blocks of 16 and a partial one
    engine.add_request("first", prompt, greedy(6))
    first = tokens_of(run(engine)["first"])
    before = engine.stats()
    engine.runner.forward.calls.clear()
    engine.add_request("again", prompt, greedy(6))
    again = tokens_of(run(engine)["again"])
    cached = (len(prompt) - 1) // 16 * 16
    n, start, _ = engine.runner.forward.calls[0][0]
    assert (n, start) == (len(prompt) - cached, cached), (
        f"the same prompt of {len(prompt)} tokens again, with {cached} of them in the prefix cache: its prefill must "
        f"compute tokens {cached}.. ({len(prompt) - cached} tokens from position {cached}), got {n} tokens from "
        f"position {start}: the prefix-cache hit returned by allocate was not used"
    )
    hits = engine.stats().prefix_cache_hits - before.prefix_cache_hits
    assert hits == cached, f"prefix_cache_hits must grow by {cached} tokens, grew by {hits}"
    check_tokens("the same prompt again, from the prefix cache", again, first)
    check_tokens("the first request", first, reference(tuple(prompt), 6))


def test_preemption_by_recompute_keeps_outputs_and_frees_blocks(make_engine):
    engine = make_engine(num_blocks=12, max_num_batched_tokens=64)  # four requests that need 5 blocks each at the end
    prompts = [ids(PROMPTS[i % 2] + "x" * i)[:40] for i in range(4)]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy(36))
    outputs = run(engine)
    assert engine.stats().num_preemptions > 0, "12 blocks for 4 requests of 75 tokens: some must be preempted"
    for i, prompt in enumerate(prompts):
        check_tokens(f"request r{i} (preempted and recomputed on the way)", tokens_of(outputs.get(f"r{i}", [])),
                     reference(tuple(prompt), 36))  # fmt: skip
    check_all_blocks_free(engine, "after preemptions and every request finished")


# --- finishing: max_tokens, EOS, stop strings ------------------------------------------------------------------------


def test_outputs_one_token_per_step_and_finish_at_max_tokens(make_engine):
    engine = make_engine(max_num_batched_tokens=16)
    engine.add_request("a", ids(PROMPTS[1]), greedy(5))  # a prefill of 4 chunks
    engine.add_request("b", ids(PROMPTS[0]), greedy(1))
    outputs = run(engine)
    for rid, max_tokens in (("a", 5), ("b", 1)):
        got = outputs.get(rid, [])
        assert [len(o.new_token_ids) for o in got] == [1] * max_tokens, (
            f"request {rid} (max_tokens={max_tokens}): expected {max_tokens} outputs of one token each, got "
            f"{[o.new_token_ids for o in got]} (a prefill chunk that does not reach the end of the prompt reports "
            "nothing; each sampling step reports its one token)"
        )
        assert [o.finished for o in got] == [False] * (max_tokens - 1) + [True], (
            f"request {rid}: only its last output is finished, got {[o.finished for o in got]}"
        )
        assert got[-1].finish_reason == "length" and all(o.finish_reason is None for o in got[:-1]), (
            f"request {rid}: finish_reason 'length' on the last output, None before, got "
            f"{[o.finish_reason for o in got]}"
        )


def test_eos_stops_a_request_unless_ignore_eos(make_engine):
    prompt = ids(PROMPTS[0])
    expected = reference(tuple(prompt), 12)
    eos = expected[3]
    stop_at = expected.index(eos)
    engine = make_engine()
    engine.eos_token_id = eos  # pretend the token sampled at step 4 is the model's EOS
    engine.add_request("stops", prompt, SamplingParams(max_tokens=12))
    engine.add_request("ignores", prompt, SamplingParams(max_tokens=12, ignore_eos=True))
    outputs = run(engine)
    check_tokens("a request that samples EOS", tokens_of(outputs["stops"]), expected[: stop_at + 1],
                 " (it stops at the EOS token, which it still hands out)")  # fmt: skip
    assert outputs["stops"][-1].finish_reason == "stop", (
        f"EOS must finish a request with finish_reason 'stop', got {outputs['stops'][-1].finish_reason!r}"
    )
    check_tokens("a request with ignore_eos=True", tokens_of(outputs["ignores"]), expected, " (ignore_eos ignored)")
    check_all_blocks_free(engine, "after a request stopped early at EOS")


def test_stop_string_finishes_at_the_token_that_completes_it(make_engine):
    prompt = ids(PROMPTS[2])
    expected = reference(tuple(prompt), 24)
    text = bytes(expected[4:7]).decode()
    stop = next(k for k in range(len(expected)) if text in bytes(expected[: k + 1]).decode(errors="replace"))
    engine = make_engine()
    engine.add_request("s", prompt, greedy(24, stop=["never appears here", text]))
    outputs = run(engine)
    check_tokens(f"a request with stop string {text!r}", tokens_of(outputs["s"]), expected[: stop + 1],
                 " (it must stop at the token that completes the stop string, that token included)")  # fmt: skip
    assert outputs["s"][-1].finish_reason == "stop", (
        f"a stop string must finish with finish_reason 'stop', got {outputs['s'][-1].finish_reason!r}"
    )
    check_all_blocks_free(engine, "after a request stopped at a stop string")


# --- abort ---------------------------------------------------------------------------------------------------------


def test_abort_frees_every_block_at_once_and_is_reported(make_engine):
    engine = make_engine(max_num_seqs=2, max_num_batched_tokens=128)
    kept_prompt = ids(PROMPTS[0])
    engine.add_request("running", ids(PROMPTS[1]), greedy(30))
    engine.add_request("kept", kept_prompt, greedy(8))
    engine.add_request("waiting", ids(PROMPTS[2]), greedy(8))  # max_num_seqs=2: it waits
    early = [out for _ in range(3) for out in engine.step()]
    kept = [o for o in early if o.request_id == "kept"]
    kept_blocks = -(-(len(kept_prompt) + len(kept) - 1) // 16)  # its computed tokens: the prompt, all outputs but one
    engine.abort_request("running")
    engine.abort_request("waiting")
    engine.abort_request("never added")  # ignored
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks - kept_blocks, (
        f"right after aborting a running and a waiting request, every block but the {kept_blocks} of the other "
        f"running request must be free ({stats.num_total_blocks - kept_blocks}), got {stats.num_free_blocks}: abort "
        "must free every block of the request at once"
    )
    reports = engine.step()
    aborted = sorted(o.request_id for o in reports if o.finish_reason == "abort")
    assert aborted == ["running", "waiting"], (
        f"the step after the aborts must report both, got {[(o.request_id, o.finish_reason) for o in reports]}"
    )
    assert all(o.finished and o.new_token_ids == [] for o in reports if o.finish_reason == "abort"), (
        f"an abort report is finished with no tokens, got {reports}"
    )
    outputs = run(engine)
    assert set(outputs) <= {"kept"}, f"aborted requests went on producing tokens: {sorted(outputs)}"
    later = [o for o in reports if o.request_id == "kept"] + outputs.get("kept", [])
    check_tokens("the request left running beside the aborted ones", tokens_of(kept + later),
                 reference(tuple(kept_prompt), 8))  # fmt: skip
    engine.abort_request("kept")  # finished: ignored
    check_all_blocks_free(engine, "after aborts")
    assert not engine.has_unfinished_requests(), "nothing is left after every request finished or was aborted"


# --- bad input -----------------------------------------------------------------------------------------------------


def test_bad_requests_are_refused_and_change_nothing(make_engine):
    engine = make_engine()
    prompt = ids(PROMPTS[0])
    engine.add_request("ok", prompt, greedy(6))
    before = engine.stats()
    context = engine.max_model_len
    cases = [
        (ValueError, lambda: engine.add_request("ok", prompt, greedy(6)), "a duplicate request id", "ok"),
        (ValueError, lambda: engine.add_request("empty", [], greedy(6)), "an empty prompt", "empty"),
        (ValueError, lambda: engine.add_request("big", prompt + [272], greedy(6)), "token id 272 (vocab 272)", "272"),
        (ValueError, lambda: engine.add_request("neg", [-1] + prompt, greedy(6)), "token id -1", "-1"),
        (ValueError, lambda: engine.add_request("long", [65] * context, greedy(1)), "a prompt as long as the context",
         "context"),
        (ValueError, lambda: engine.add_request("over", [65] * (context - 4), greedy(8)),
         "prompt + max_tokens beyond the context", "context"),
        (ValueError, lambda: engine.add_request("zero", prompt, greedy(0)), "max_tokens = 0", "max_tokens"),
        (ValueError, lambda: engine.add_request("temp", prompt, SamplingParams(temperature=-1.0)), "temperature -1",
         "temperature"),
        (ValueError, lambda: engine.add_request("topp", prompt, SamplingParams(top_p=0.0)), "top_p = 0", "top_p"),
        ((TypeError, ValueError), lambda: engine.add_request("params", prompt, {"max_tokens": 4}),
         "params given as a dict", None),
    ]  # fmt: skip
    for error, call, what, match in cases:
        expect_error(error, call, f"add_request with {what}", match)
        assert engine.stats() == before, f"add_request with {what} was refused but changed the engine's state"
    outputs = run(engine)
    assert sorted(outputs) == ["ok"], f"refused requests must never run, got outputs for {sorted(outputs)}"
    check_tokens("the request added before the refused ones", tokens_of(outputs["ok"]), reference(tuple(prompt), 6))


# --- sampling ------------------------------------------------------------------------------------------------------


def test_seeded_sampling_does_not_depend_on_the_batch(make_engine):
    prompt = ids(PROMPTS[0])
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    alone = make_engine()
    alone.add_request("seeded", prompt, params)
    expected = tokens_of(run(alone)["seeded"])
    engine = make_engine()
    engine.add_request("noise", prompt, SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True))
    engine.add_request("seeded", prompt, params)
    engine.add_request("other seed", prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=8, ignore_eos=True))
    engine.add_request("nucleus", prompt, SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-6, ignore_eos=True))
    outputs = run(engine)
    check_tokens("a request with seed=7, batched with others, against itself alone", tokens_of(outputs["seeded"]),
                 expected, " (each seeded request must draw from its own generator)")  # fmt: skip
    assert tokens_of(outputs["other seed"]) != expected, "seeds 7 and 8 sampled the same 12 tokens"
    check_tokens("top_p=1e-6 (only the most likely token)", tokens_of(outputs["nucleus"]),
                 reference(tuple(prompt), 12), " (top_p not passed to the sampler?)")  # fmt: skip


# --- stats ---------------------------------------------------------------------------------------------------------


def test_stats_follow_the_engine(make_engine):
    engine = make_engine(max_num_batched_tokens=256)
    prompts = [ids(text) for text in PROMPTS[:3]]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy(4 + i))
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting) == (0, 3), f"3 requests added, none stepped: got {stats}"
    engine.step()
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.last_step_num_requests) == (3, 0, 3), (
        f"after one step all 3 requests run and ran in that step: got {stats}"
    )
    assert stats.generation_tokens == 3 and stats.prompt_tokens == sum(map(len, prompts)), (
        f"after the step that prefilled 3 prompts: 3 generation tokens and {sum(map(len, prompts))} prompt tokens, "
        f"got {stats}"
    )
    used = stats.num_total_blocks - stats.num_free_blocks
    assert used == sum(-(-len(p) // 16) for p in prompts) and stats.kv_cache_usage == pytest.approx(
        used / stats.num_total_blocks
    ), f"kv_cache_usage must be the fraction of blocks in use, got {stats}"
    run(engine)
    stats = engine.stats()
    assert stats.generation_tokens == 4 + 5 + 6 and (stats.num_running, stats.num_waiting) == (0, 0), (
        f"after the run: 15 generation tokens, nothing running or waiting, got {stats}"
    )
    assert stats.prompt_tokens == sum(map(len, prompts)), (
        f"after the run: prompt tokens count each prompt once ({sum(map(len, prompts))}), got {stats.prompt_tokens}"
    )


# --- on a GPU: exercise 06's kernel for decodes, CUDA graphs for decode-only steps ----------------------------------


@pytest.mark.gpu
def test_cuda_engine_greedy_matches_transformers_in_fp16(make_engine):
    engine = make_engine(device="cuda", num_blocks=256, max_num_batched_tokens=24)
    prompts = [ids(text) for text in PROMPTS]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy(40))
    outputs = run(engine)
    assert engine.runner.graphs is not None and engine.runner.graphs.graphs, "no decode step replayed a CUDA graph"
    model = load_hf("target", dtype=torch.float16, device="cuda")
    for i, prompt in enumerate(prompts):
        got = tokens_of(outputs.get(f"r{i}", []))
        sequence, margins, expected = torch.tensor([prompt], device="cuda"), [], []
        with torch.no_grad():
            for _ in range(40):
                logits = model(sequence).logits[0, -1].float()
                top = logits.topk(2).values
                margins.append(float(top[0] - top[1]))
                expected.append(int(logits.argmax()))
                sequence = torch.cat([sequence, sequence.new_tensor([[expected[-1]]])], dim=1)
        if got == expected:
            continue
        step = next((k for k, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), len(got))
        # fp16 sums in another order may pick the other of two tokens whose logits tie to within rounding
        assert step < len(expected) and margins[step] < 0.06, (
            f"request r{i} on CUDA: greedy tokens differ from transformers' fp16 Llama from token {step} (top-2 "
            f"margin there {margins[step] if step < len(margins) else 'n/a'}, not a tie): expected "
            f"{expected[step : step + 5]}, got {got[step : step + 5]}"
        )
    check_all_blocks_free(engine, "after every request finished on CUDA")
