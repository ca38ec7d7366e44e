"""Time one engine step at a given number of running decodes: the whole step, and the host's share of it.

    python3 -m engine.bench_step --model fixtures/course_model/target --device cuda --running 64

Prints three medians: the step loop's host time with the model's forward replaced by a stub (scheduler, block
manager, sampler, outputs: what the issue's "host time per step" goal is about, together with the runner's input
preparation), the whole step, and the forward alone. Every request decodes (its prompt was prefilled before timing).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from .parts import load_module
from .types import SamplingParams


def median_seconds(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fixtures/course_model/target")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--running", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--impl", default="solution")
    parser.add_argument("--quantization", default=None)
    args = parser.parse_args(argv)

    engine_loop = load_module(args.impl, "07", "engine_loop")
    engine = engine_loop.Engine(args.model, impl=args.impl, device=args.device, max_num_seqs=args.running,
                                max_num_batched_tokens=max(2048, args.running * args.prompt_len),
                                quantization=args.quantization)  # fmt: skip
    for i in range(args.running):
        prompt = [engine.tokenizer.bos_token_id] + [(7 * i + j) % 256 for j in range(args.prompt_len)]
        room = engine.max_model_len - len(prompt)
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=room, ignore_eos=True))
    engine.step()  # every prefill at once
    for _ in range(3):
        engine.step()  # warm-up: CUDA graph capture, Triton compilation

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    forward = engine.runner.forward
    seqs = []

    def recording(batch):
        seqs[:] = batch
        return forward(batch)

    engine.runner.forward = recording
    whole = median_seconds(lambda: (engine.step(), sync()), args.rounds)
    vocab = engine.vocab_size
    engine.runner.forward = lambda batch: torch.zeros(sum(s.sample for s in batch), vocab, device=args.device)
    host = median_seconds(engine.step, args.rounds)
    engine.runner.forward = forward
    decodes = list(seqs)
    alone = median_seconds(lambda: (forward(decodes), sync()), args.rounds)  # rewrites the same slots: harmless
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{args.running} running decodes on {args.device} ({name}):")
    print(f"  step loop host time (forward stubbed): {host * 1e6:8.0f} us")
    print(f"  whole step:                            {whole * 1e6:8.0f} us")
    print(f"  forward alone (inputs + model):        {alone * 1e6:8.0f} us")


if __name__ == "__main__":
    main()
