# ruff: noqa: E501  (mutants are data: one replacement per line reads best)
"""Exercise 07 mutants: the reference step loop with one mistake each, as students make them; then the load
generator's (tests/mutants/ex07_loadgen.py)."""

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mutation import Mutant  # noqa: E402

E = "engine_loop.py"
PYTEST_ARGS = ("-k", "test_engine_loop")  # the server's and the load generator's tests cannot see these mistakes


def only(tests: str) -> tuple[str, ...]:
    """Run only the step loop's tests that name this mistake (the whole file takes minutes on a shared CPU)."""
    return ("-k", f"test_engine_loop and ({tests})")


MUTANTS = [
    Mutant("the prefix-cache hit ignored: cached tokens computed again", E,
           "                first = cached\n", "                first = 0\n", "prefix-cache hit returned by allocate was not used", only('prefix_cache')),
    Mutant("after a prefix-cache hit, the uncached tokens computed at position 0", E,
           "            seqs.append(SeqInput(request.token_ids[first:end], first, request.block_table, sample))",
           "            seqs.append(SeqInput(request.token_ids[first:end], 0 if start == 0 else first, request.block_table, sample))",
           "prefix-cache hit", only('prefix_cache')),
    Mutant("a preempted request keeps its blocks in the block manager", E,
           "            self.block_manager.free(index)\n            request.block_table = []\n", "            request.block_table = []\n", "preemption", only('preemption')),
    Mutant("finished requests keep their blocks", E,
           "                self.block_manager.free(request.sched.request_id)\n                self._forget(request)\n",
           "                self._forget(request)\n", "were not freed", only('eos_stops')),
    Mutant("an early stop not told to the scheduler (output_len left at max_tokens)", E,
           "                request.sched.output_len = request.num_output  # the scheduler finishes it in update()\n", "", "eos", only('eos_stops')),
    Mutant("EOS never stops a request", E,
           "        if token == self.eos_token_id and not params.ignore_eos:", "        if False:", "samples EOS", only('eos_stops')),
    Mutant("ignore_eos not honoured", E,
           "        if token == self.eos_token_id and not params.ignore_eos:", "        if token == self.eos_token_id:", "ignore_eos ignored", only('eos_stops')),
    Mutant("stop strings never checked", E,
           "        if params.stop and self._stop_string_ended(request):", "        if False:", "stop string", only('stop_string')),
    Mutant("max_tokens off by one: one token too many", E,
           "        if request.num_output >= params.max_tokens:", "        if request.num_output > params.max_tokens:", "max_tokens", only('finish_at_max_tokens')),
    Mutant("abort leaves a running request's blocks allocated", E,
           "            self.block_manager.free(request.sched.request_id)\n            sched.output_len", "            sched.output_len", "abort must free every block", only('abort')),
    Mutant("abort not reported by the next step", E,
           "        self._aborted.append(RequestOutput(request_id, [], True, \"abort\"))\n", "", "must report both", only('abort')),
    Mutant("an aborted waiting request stays in the scheduler's queue", E,
           "            self.scheduler.waiting.remove(sched)\n", "            pass\n", "abort", only('abort')),
    Mutant("an aborted running request stays in the scheduler", E,
           "            self.scheduler.update(rest)\n", "", "abort", only('abort')),
    Mutant("a duplicate request id accepted", E,
           "        if request_id in self.requests:\n            raise", "        if False:\n            raise", "duplicate request id", only('bad_requests')),
    Mutant("token ids not checked against the vocabulary", E,
           "        if not 0 <= token < vocab_size:", "        if token < 0:", "token id 272", only('bad_requests')),
    Mutant("the context checked against the prompt alone, not prompt + max_tokens", E,
           "        if len(prompt) + params.max_tokens > self.max_model_len:", "        if len(prompt) > self.max_model_len:", "context", only('bad_requests')),
    Mutant("seeded requests draw from the shared generator", E,
           "self.sampler.generator_for(params.seed))", "None)", "own generator", only('seeded')),
    Mutant("sampling parameters never reach the sampler (everything greedy)", E,
           "self.sampler.sample(logits, [r.params for r in sampling],", "self.sampler.sample(logits, [SamplingParams() for r in sampling],", "seeds 7 and 8", only('seeded')),
    Mutant("one forward per request instead of one per step", E,
           "        logits = self.runner.forward(seqs)\n", "        logits = torch.cat([self.runner.forward([s]) for s in seqs])\n", "one forward per request", only('one_forward')),
    Mutant("every prefill chunk samples a token", E,
           "            sample = end == len(request.token_ids)\n", "            sample = True\n", "asked for a sample", only('one_forward')),
    Mutant("the block table not read again when a decode opens a new block", E,
           "            grew = grew or position % self.block_size == 0\n", "", "block table is stale", only('stop_string or greedy')),
    Mutant("prompt tokens counted at every sampled token", E,
           "            if request.num_output == 1:\n                self._counters", "            if True:\n                self._counters", "prompt tokens count each prompt once", only('stats')),
    Mutant("generation tokens not counted", E,
           "        self._counters[\"generation_tokens\"] += len(tokens)\n", "", "generation tokens", only('stats')),
]


def _load_generator_mutants() -> list[Mutant]:
    path = Path(__file__).resolve().parent / "ex07_loadgen.py"
    if not path.is_file():
        return []
    spec = importlib.util.spec_from_file_location("inferlab_mutants_07_loadgen", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.MUTANTS)


MUTANTS += _load_generator_mutants()
