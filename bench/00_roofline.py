"""Exercise 00's roofline sweep: the small Llama's decode and prefill chains against the two measured ceilings.

    python3 bench/00_roofline.py [OUTPUT_DIR]      (repo root, CUDA machine; default OUTPUT_DIR: $OUT or .)

writes roofline_00.json (every measurement) and roofline_00.png (the chart in exercises/00/README.md), and prints
the table recorded in BENCHMARKS.md. The counts (FLOPs, bytes) come from the reference solution when the repo has
one, else from the student's exercises/00/roofline.py. The chains and ceilings are fixtures/roofline_chains.py's,
the ones exercise 00's tests time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fixtures.roofline_chains import SmallLlamaChain, matrix_rate, time_decode, time_prefill  # noqa: E402
from grader.timing import L2Flusher, copy_bandwidth, time_calls  # noqa: E402

DECODE_BATCHES = [2**i for i in range(13)]  # 1 .. 4096, nothing cached
DECODE_AT_CONTEXT = [(1, 2048), (8, 2048), (64, 2048), (64, 8192)]  # (batch, cached tokens)
PREFILLS = [(1, 128), (1, 512), (2, 1024), (8, 1024), (4, 4096)]  # (batch, prompt tokens)


def load_counts():
    """The roofline module to count with: the reference solution if the repo has it, else the student's."""
    path = ROOT / "solutions/00/roofline.py"
    if not path.is_file():
        path = ROOT / "exercises/00/roofline.py"
    spec = importlib.util.spec_from_file_location("roofline_00_counts", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def measure(out_dir: Path) -> dict:
    from fixtures.llama import llama_config

    counts = load_counts()
    config = llama_config("small")
    flush = L2Flusher()

    def timer(fn, setup, rounds, warmup, check):
        return time_calls(fn, setup, flush, rounds=rounds, warmup=warmup, check=check)

    bandwidth, rate = copy_bandwidth(), matrix_rate()
    chain = SmallLlamaChain(config)
    points = []

    def record(kind, batch, new, cached, timing):
        cost = counts.forward_cost(config, batch, new, cached)
        predicted = counts.roofline_time(cost, bandwidth, rate)
        points.append(dict(kind=kind, batch=batch, new_tokens=new, cached_tokens=cached, seconds=timing.median,
                           predicted_seconds=predicted, flops=cost.flops, bytes=cost.bytes,
                           intensity=cost.intensity))  # fmt: skip

    for batch in DECODE_BATCHES:
        record("decode", batch, 1, 0, time_decode(chain, timer, batch, 0))
    for batch, cached in DECODE_AT_CONTEXT:
        record("decode at context", batch, 1, cached, time_decode(chain, timer, batch, cached))
        torch.cuda.empty_cache()
    for batch, tokens in PREFILLS:
        record("prefill", batch, tokens, 0, time_prefill(chain, timer, batch, tokens))
    crossover = counts.decode_crossover_batch(config, 0, bandwidth, rate)
    result = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, copy_bandwidth=bandwidth,
                  matrix_rate=rate, predicted_crossover_batch=crossover, points=points)  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "roofline_00.json").write_text(json.dumps(result, indent=1))
    return result


def print_table(result: dict) -> None:
    print(f"{result['gpu']}, torch {result['torch']}: copy bandwidth {result['copy_bandwidth'] / 1e12:.2f} TB/s, "
          f"bf16 matrix rate {result['matrix_rate'] / 1e12:.0f} TFLOP/s, ridge "
          f"{result['matrix_rate'] / result['copy_bandwidth']:.0f} FLOP/byte; predicted decode crossover batch "
          f"{result['predicted_crossover_batch']}")  # fmt: skip
    print(f"{'step':<18}{'batch':>6}{'new':>6}{'cached':>7}{'FLOP/B':>9}{'us':>10}{'predicted':>11}"
          f"{'us/token':>10}{'TFLOP/s':>9}{'TB/s':>7}{'pred/meas':>10}")  # fmt: skip
    for p in result["points"]:
        tokens = p["batch"] * p["new_tokens"]
        print(f"{p['kind']:<18}{p['batch']:>6}{p['new_tokens']:>6}{p['cached_tokens']:>7}{p['intensity']:>9.1f}"
              f"{p['seconds'] * 1e6:>10.1f}{p['predicted_seconds'] * 1e6:>11.1f}{p['seconds'] * 1e6 / tokens:>10.3f}"
              f"{p['flops'] / p['seconds'] / 1e12:>9.1f}{p['bytes'] / p['seconds'] / 1e12:>7.2f}"
              f"{p['predicted_seconds'] / p['seconds']:>10.2f}")  # fmt: skip


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bandwidth, rate = result["copy_bandwidth"], result["matrix_rate"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    intensities = [p["intensity"] for p in result["points"]]
    low, high = min(intensities) / 2, max(intensities) * 2
    ridge = rate / bandwidth
    xs = [low, ridge, high]
    left.plot(xs, [min(rate, bandwidth * x) / 1e12 for x in xs], color="black", linewidth=1.5)
    left.text(low * 1.1, bandwidth * low * 1.3 / 1e12, f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", fontsize=8,
              rotation=33)  # fmt: skip
    left.text(ridge * 1.1, rate * 1.08 / 1e12, f"bf16 matrix rate {rate / 1e12:.0f} TFLOP/s", fontsize=8)
    markers = {"decode": "o", "decode at context": "s", "prefill": "^"}
    for kind, marker in markers.items():
        points = [p for p in result["points"] if p["kind"] == kind]
        left.scatter([p["intensity"] for p in points], [p["flops"] / p["seconds"] / 1e12 for p in points],
                     marker=marker, label=kind, zorder=3)  # fmt: skip
        for p in points:
            if kind == "decode" and p["batch"] not in (1, 4, 16, 64, 256, 1024, 4096):
                continue  # every other batch: the labels of neighbours would overlap
            label = f"B{p['batch']}" + (f" T{p['new_tokens']}" if p["new_tokens"] > 1 else "")
            label += f" S{p['cached_tokens']}" if p["cached_tokens"] else ""
            left.annotate(label, (p["intensity"], p["flops"] / p["seconds"] / 1e12), fontsize=6,
                          xytext=(3, -8), textcoords="offset points")  # fmt: skip
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("arithmetic intensity (FLOP per byte moved, counted by the exercise's formulas)")
    left.set_ylabel("achieved TFLOP/s (counted FLOPs / measured time)")
    left.set_title("the small Llama's steps against the two measured ceilings", fontsize=10)
    left.legend(fontsize=8, loc="lower right")

    decode = [p for p in result["points"] if p["kind"] == "decode"]
    batches = [p["batch"] for p in decode]
    right.plot(batches, [p["seconds"] * 1e6 / p["batch"] for p in decode], "o-", label="measured")
    right.plot(batches, [p["predicted_seconds"] * 1e6 / p["batch"] for p in decode], "--", color="gray",
               label="roofline prediction")  # fmt: skip
    crossover = result["predicted_crossover_batch"]
    if crossover:
        right.axvline(crossover, color="red", linewidth=1, linestyle=":")
        right.text(crossover * 1.1, max(p["seconds"] * 1e6 / p["batch"] for p in decode) / 2,
                   f"predicted crossover\nbatch {crossover}", fontsize=8, color="red")  # fmt: skip
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("batch size (decode step, nothing cached)")
    right.set_ylabel("microseconds per token")
    right.set_title("decode: time per token falls with the batch until the step turns compute-bound", fontsize=10)
    right.legend(fontsize=8)
    fig.suptitle(f"{result['gpu']} (torch {result['torch']}): bf16 matmul chains of the course's small Llama")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(out_dir: Path) -> None:
    result = measure(out_dir)
    print_table(result)
    plot(result, out_dir / "roofline_00.png")
    print(f"wrote {out_dir / 'roofline_00.json'} and {out_dir / 'roofline_00.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(os.environ.get("OUT", ".")))
