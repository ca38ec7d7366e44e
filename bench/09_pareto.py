"""Exercise 09's chart: the course model's perplexity against bits per weight, for every quantization stack.

    python3 bench/09_pareto.py [OUTPUT_DIR] [--redraw]    (repo root; default OUTPUT_DIR: $OUT or .)

Writes pareto.json (every point), pareto.png (the chart of exercises/09/README.md) and prints the table recorded in
BENCHMARKS.md; --redraw draws the chart again from OUTPUT_DIR/pareto.json. CPU part (any machine; several minutes on
one idle core): the course model quantized by exercise 08's reference (RTN, AWQ, GPTQ with act-order; 3 and 4 bits;
G = 32 and 128; exercise 08 accepts 4 and 8 bits, so this script widens its BITS to 3), by exercise 09's reference
mixes (GPTQ at 2 .. 8 bits per linear, the tests' quantizer; 2.5 to 6 bpw), by GGUF Q4_0 and Q8_0 (exercise 08's
exporter, decoded back here), and FP8 W8A8 (exercise 09's fp8_linear in every linear: e4m3 weights per channel,
activations per token); perplexity on 64 x 256 held-out tokens, calibration on 16 x 256 (fixtures/quantization.py),
one thread. Bits per weight count codes, scales and zero points: G-grouped int codes pay 16 + bits per group, Q4_0
and Q8_0 blocks 16 bits per 32 weights, FP8 a float32 scale per row.
GPU part (CUDA with FP8 tensor cores only): W8A8 prefill (2048 tokens) through Llama-3-8B's linears against bf16
x @ W.T, the measurement exercise 09's speed test judges.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fixtures.quantization import LINEARS, course_llama, forward, text_windows  # noqa: E402

WINDOW, CALIBRATION_WINDOWS, EVALUATION_WINDOWS = 256, 16, 64
GROUPS = (32, 128)
MIX_TARGETS = (2.5, 3.0, 3.5, 4.0, 5.0, 6.0)


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def perplexity(llama, ids, linear=None) -> float:
    total = 0.0
    for rows in ids.split(16):
        logits = forward(llama, rows, linear)[:, :-1].double()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="sum"))
    return math.exp(total / (ids.shape[0] * (ids.shape[1] - 1)))


def numel(llama) -> int:
    return sum(getattr(w, name).numel() for w in llama.layers for name in LINEARS)


def grouped_bpw(llama, bits: int, group: int) -> float:
    return bits + (16 + bits) / group


def gguf_dequantize(blocks: torch.Tensor, kind: str, shape) -> torch.Tensor:
    """uint8 [N, K/32 * bytes] of GGUF Q8_0 or Q4_0 blocks -> float32 [N, K]."""
    N, K = shape
    size = 34 if kind == "Q8_0" else 18
    raw = blocks.reshape(N, K // 32, size)
    d = raw[..., :2].contiguous().view(torch.float16).float()  # [N, K/32, 1]
    if kind == "Q8_0":
        q = raw[..., 2:].contiguous().view(torch.int8).float()
    else:
        packed = raw[..., 2:]
        q = torch.cat([packed & 0xF, packed >> 4], dim=-1).float() - 8
    return (q * d).reshape(N, K)


def cpu_points(s08, s09, fp8, gptq_quantizer) -> list[dict]:
    s08.BITS = (3, 4, 8)  # exercise 08 grades 4 and 8 bits; its quantizers work at any width
    calibration = text_windows("calibration", WINDOW, CALIBRATION_WINDOWS)
    evaluation = text_windows("evaluation", WINDOW, EVALUATION_WINDOWS)
    points = []

    def add(stack, label, bpw, llama, linear=None, seconds=None):
        started = time.perf_counter()
        ppl = perplexity(llama, evaluation, linear)
        points.append({"stack": stack, "label": label, "bpw": bpw, "perplexity": ppl,
                       "quantize_s": seconds})  # fmt: skip
        print(f"{stack:<6} {label:<22} {bpw:6.3f} bpw  perplexity {ppl:.4f}  "
              f"({(seconds or 0):.1f} s + {time.perf_counter() - started:.1f} s)", flush=True)  # fmt: skip

    add("fp32", "fp32", 32.0, course_llama())
    for method in ("rtn", "awq", "gptq"):
        for bits in (3, 4):
            for group in GROUPS:
                llama = course_llama()
                started = time.perf_counter()
                s08.quantize_model(llama, calibration, method, bits, group)
                add(method.upper(), f"{bits}-bit G{group}", grouped_bpw(llama, bits, group), llama,
                    seconds=time.perf_counter() - started)  # fmt: skip
    started = time.perf_counter()
    measurements = s09.measure(course_llama(), calibration, gptq_quantizer, s09.OPTIONS)
    measured = time.perf_counter() - started
    for target in MIX_TARGETS:
        mix = s09.allocate(measurements, target)
        llama = course_llama()
        started = time.perf_counter()
        s09.quantize_mixed(llama, calibration, mix, gptq_quantizer)
        widths = sorted(c.bits for c in mix.values())
        add("mix", f"{target} bpw {widths.count(2)}/{widths.count(3)}/{widths.count(4)}/{widths.count(5)}/"
            f"{widths.count(6)}/{widths.count(8)}", s09.bits_per_weight(measurements, mix), llama,
            seconds=measured + time.perf_counter() - started)  # fmt: skip
    for kind, bpw in (("Q4_0", 4.5), ("Q8_0", 8.5)):
        llama = course_llama()
        for w in llama.layers:
            for name in LINEARS:
                weight = getattr(w, name)
                weight.copy_(gguf_dequantize(s08.export_gguf(weight, kind), kind, weight.shape))
        add("GGUF", kind, bpw, llama)
    llama = course_llama()
    codes = {(i, name): fp8.quantize_e4m3(getattr(w, name), per_row=True)
             for i, w in enumerate(llama.layers) for name in LINEARS}  # fmt: skip

    def w8a8(layer, name, x):
        flat = x.reshape(-1, x.shape[-1])
        return fp8.fp8_linear(flat, *codes[(layer, name)], per_token=True).view(*x.shape[:-1], -1)

    fp8_bpw = sum(c.numel() * 8 + c.shape[0] * 32 for c, _ in codes.values()) / numel(llama)
    add("FP8", "W8A8 e4m3 per channel/token", fp8_bpw, llama, w8a8)
    return points


def gpu_points(fp8) -> list[dict]:
    from grader.timing import L2Flusher, time_calls

    layers = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
    flush, rows = L2Flusher(), []
    print(f"\nW8A8 prefill, M = 2048, on {torch.cuda.get_device_name()} (torch {torch.__version__})")
    for name, (N, K) in layers.items():
        weight = torch.randn(N, K, device="cuda") * 0.02
        weight_bf16 = weight.bfloat16()
        codes, scale = fp8.quantize_e4m3(weight, per_row=True)

        def setup(K=K):
            return (torch.randn(2048, K, device="cuda").bfloat16(),), {}

        bf16 = time_calls(lambda x, w=weight_bf16: x @ w.T, setup, flush, rounds=20, warmup=5)
        w8a8 = time_calls(lambda x, c=codes, s=scale: fp8.fp8_linear(x, c, s), setup, flush, rounds=20, warmup=5)
        tensor = time_calls(lambda x, c=codes, s=scale: fp8.fp8_linear(x, c, s, per_token=False), setup, flush,
                            rounds=20, warmup=5)  # fmt: skip
        flops = 2 * 2048 * N * K
        row = {"layer": name, "N": N, "K": K, "bf16_us": bf16.median * 1e6, "w8a8_us": w8a8.median * 1e6,
               "w8a8_per_tensor_us": tensor.median * 1e6, "speedup": bf16.median / w8a8.median,
               "speedup_per_tensor": bf16.median / tensor.median}  # fmt: skip
        rows.append(row)
        print(f"{name:<8} [{N}, {K}]  bf16 {row['bf16_us']:7.1f} us ({flops / bf16.median / 1e12:4.0f} TFLOP/s)  "
              f"W8A8 per token {row['w8a8_us']:7.1f} us ({flops / w8a8.median / 1e12:4.0f} TFLOP/s, "
              f"{row['speedup']:.2f}x)  per tensor {row['w8a8_per_tensor_us']:7.1f} us "
              f"({row['speedup_per_tensor']:.2f}x)", flush=True)  # fmt: skip
    return rows


def pareto_front(points: list[dict]) -> list[dict]:
    front, best = [], math.inf
    for p in sorted(points, key=lambda p: (p["bpw"], p["perplexity"])):
        if p["perplexity"] < best:
            front.append(p)
            best = p["perplexity"]
    return front


def draw(points: list[dict], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp32 = next(p["perplexity"] for p in points if p["stack"] == "fp32")
    shown = [p for p in points if p["stack"] != "fp32"]
    styles = {"RTN": ("tab:gray", "o"), "AWQ": ("tab:blue", "s"), "GPTQ": ("tab:green", "^"),
              "mix": ("tab:red", "D"), "GGUF": ("tab:purple", "P"), "FP8": ("tab:orange", "*")}  # fmt: skip
    names = {"mix": "GPTQ mixes (EXL2-style)", "GGUF": "GGUF Q4_0 / Q8_0", "FP8": "FP8 W8A8"}
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for stack, (color, marker) in styles.items():
        mine = [p for p in shown if p["stack"] == stack]
        ax.scatter([p["bpw"] for p in mine], [p["perplexity"] for p in mine], color=color, marker=marker,
                   s=70 if marker == "*" else 36, label=names.get(stack, stack), zorder=3)  # fmt: skip
        if stack == "mix":
            ax.plot([p["bpw"] for p in mine], [p["perplexity"] for p in mine], color=color, lw=1, zorder=2)
    front = pareto_front(shown)
    ax.step([p["bpw"] for p in front], [p["perplexity"] for p in front], where="post", color="black", lw=0.8,
            ls="--", label="Pareto front", zorder=1)  # fmt: skip
    ax.axhline(fp32, color="black", lw=0.8, ls=":", label=f"fp32 {fp32:.4f}")
    ax.set_xlabel("bits per weight (codes, scales and zero points)")
    ax.set_ylabel("held-out perplexity (bytes)")
    ax.set_title("Course model (8 layers, 6.3M quantized weights): perplexity against bits per weight\n"
                 "RTN, AWQ, GPTQ at 3 and 4 bits, G = 32 and 128; mixes of GPTQ widths; GGUF; FP8")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=110)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    s08 = load(ROOT / "solutions/08/quantize.py", "pareto_s08")
    s09 = load(ROOT / "solutions/09/bit_allocation.py", "pareto_s09")
    fp8 = load(ROOT / "solutions/09/fp8.py", "pareto_fp8")
    tests = load(ROOT / "exercises/09/test_bit_allocation.py", "pareto_tests")  # the quantizer the tests hand in
    out.mkdir(parents=True, exist_ok=True)
    result = {"gpu": gpu_points(fp8) if torch.cuda.is_available() and fp8.scaled_mm_available("cuda") else []}
    result["points"] = cpu_points(s08, s09, fp8, tests.GPTQ())
    result["front"] = [p["label"] if p["stack"] != "mix" else f"mix {p['bpw']:.3f}" for p in
                       pareto_front([p for p in result["points"] if p["stack"] != "fp32"])]  # fmt: skip
    (out / "pareto.json").write_text(json.dumps(result, indent=1))
    draw(result["points"], out / "pareto.png")
    print("\n| stack | setting | bits per weight | perplexity | increase over fp32 |\n|---|---|---|---|---|")
    fp32 = result["points"][0]["perplexity"]
    for p in sorted(result["points"], key=lambda p: p["bpw"]):
        print(f"| {p['stack']} | {p['label']} | {p['bpw']:.3f} | {p['perplexity']:.4f} | "
              f"{p['perplexity'] - fp32:+.4f} |")  # fmt: skip
    print(f"\nwrote {out / 'pareto.png'} and {out / 'pareto.json'}")


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if a != "--redraw"]
    directory = Path(arguments[0] if arguments else os.environ.get("OUT", "."))
    if "--redraw" in sys.argv:
        draw(json.loads((directory / "pareto.json").read_text())["points"], directory / "pareto.png")
    else:
        main(directory)
