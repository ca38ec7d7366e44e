"""Serving engines side by side on one checkpoint, driven by exercise 07's load generator (the reference).

    python3 bench/07_compare_engines.py --model DIR --device cuda --out OUT              # the saturation sweep
    python3 bench/07_compare_engines.py --model DIR --device cuda --out OUT --walkthrough  # + the tuning charts
    python3 bench/07_compare_engines.py --cpu --out /tmp/compare                         # seconds, on the course model

Each engine that is available starts on the same checkpoint directory, on 127.0.0.1 only, one at a time:
inferlab's (`python3 -m engine.server`), `transformers serve --continuous-batching` (when its serving extras
import), `vllm serve`, SGLang and TGI (when installed); the others are skipped with the reason. For each: wait for
`/health`, ask a few prompts greedily (the answers must agree between engines), then replay the same seeded trace at
each offered load (Poisson request rates; `inf` sends everything at once) and summarize it with exercise 05's
metrics. Writes `OUT/compare.json`, `OUT/compare.png` (output throughput, TTFT and ITL p50/p99 against offered load,
one curve per engine) and `OUT/compare.md` (the table: peak throughput, its TTFT and ITL, peak GPU memory read with
pynvml while the engine served, and the cost per million output tokens at --gpu-hour-price).

--walkthrough adds inferlab's tuning runs: on a trace whose requests share a long system prompt, TTFT with prefix
caching on and off (`OUT/prefix_caching.png`), and a sweep of the chunk size (`--max-num-batched-tokens`) on long
prompts arriving among decodes, TTFT against ITL (`OUT/chunk_size.png`).

A checkpoint directory without tokenizer files (the course model) is served from a temporary copy (weights linked)
with the course's byte-level tokenizer written beside them (bench/07_make_checkpoint.py), so every engine reads the
same ids. Every run is bounded: --time-limit per load point, --start-timeout per engine start.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
AGREEMENT_PROMPTS = ["def main():\n", "import os\n\n\nclass ", "    return self."]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load_path(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


loadgen = load_path("bench07_loadgen", ROOT / "solutions" / "07" / "loadgen.py")
metrics05 = load_path("bench07_metrics", ROOT / "solutions" / "05" / "metrics.py")


# --- the checkpoint and the trace -------------------------------------------------------------------------------------


def servable_checkpoint(model_dir: Path, scratch: Path) -> Path:
    """`model_dir` itself when it ships a tokenizer; else a copy (weights linked) with the course's byte tokenizer."""
    if any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        return model_dir
    copy = scratch / f"{model_dir.name}-with-tokenizer"
    copy.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        target = copy / item.name
        if not target.exists():
            target.symlink_to(item.resolve())
    load_path("bench07_checkpoint", ROOT / "bench" / "07_make_checkpoint.py").write_tokenizer(copy)
    return copy


def random_text(rng: random.Random, length: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz      ._(),=\n"
    return "".join(rng.choice(letters) for _ in range(length))


def make_trace(num_requests: int, prompt_len: int, max_tokens: int, seed: int, shared_prefix: int = 0) -> list:
    """Prompts of `prompt_len` bytes (= tokens with the byte tokenizer, + <bos>), the first `shared_prefix` bytes
    the same in every request (a system prompt), the rest random; every answer `max_tokens` long."""
    rng = random.Random(seed)
    system = random_text(random.Random(seed + 1), shared_prefix)
    return [loadgen.TraceRequest(system + random_text(rng, prompt_len - shared_prefix), max_tokens, prompt_len + 1)
            for _ in range(num_requests)]  # fmt: skip


# --- engines ----------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def module_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def engine_commands(model: Path, device: str, port: int, name: str, extra: list[str]) -> dict:
    """{engine: (command, model name in the API) or the reason it cannot run here}."""
    py = sys.executable
    engines = {}
    missing = [m for m in ("fastapi", "uvicorn") if not module_available(m)]
    engines["inferlab"] = (
        f"missing {', '.join(missing)}" if missing else
        ([py, "-m", "engine.server", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
          "--device", device, "--served-model-name", name, "--log-level", "warning", *extra], name)
    )  # fmt: skip
    try:
        from transformers.utils.import_utils import is_serve_available

        lacking = [m for m in ("fastapi", "uvicorn", "pydantic", "openai", "accelerate") if not module_available(m)]
        serving = "" if is_serve_available() and not lacking else f"missing {', '.join(lacking) or 'a serving extra'}"
    except ImportError as exc:
        serving = str(exc)
    engines["transformers"] = (
        ([py, "-c", "from transformers.cli.transformers import main; main()", "serve", str(model),
          "--continuous-batching", "--host", "127.0.0.1", "--port", str(port), "--device", device,
          "--log-level", "warning"], str(model))
        if not serving else f"its serving extras do not import ({serving}): pip install 'transformers[serving]'"
    )  # fmt: skip
    engines["vllm"] = (
        ([shutil.which("vllm"), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
          "--served-model-name", name, "--dtype", "bfloat16"], name)
        if shutil.which("vllm") else "vllm is not installed"
    )  # fmt: skip
    engines["sglang"] = (
        ([py, "-m", "sglang.launch_server", "--model-path", str(model), "--host", "127.0.0.1", "--port", str(port),
          "--served-model-name", name], name)
        if module_available("sglang") else "sglang is not installed"
    )  # fmt: skip
    launcher = shutil.which("text-generation-launcher")
    engines["tgi"] = (
        ([launcher, "--model-id", str(model), "--hostname", "127.0.0.1", "--port", str(port)], "tgi")
        if launcher else "TGI (text-generation-launcher) is not installed"
    )  # fmt: skip
    if device == "cpu":
        for engine in ("vllm", "sglang", "tgi"):
            if not isinstance(engines[engine], str):
                engines[engine] = "needs a GPU"
    return engines


class MemoryWatch:
    """The GPU's peak memory in use (pynvml, device 0) while it runs, sampled every 0.2 s; None without a GPU."""

    def __init__(self):
        self.peak = None
        self._stop = threading.Event()
        self._thread = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._read = lambda: pynvml.nvmlDeviceGetMemoryInfo(self._handle).used
            self.baseline = self._read()
        except Exception:  # noqa: BLE001  (no NVIDIA driver: no GPU memory to report)
            self._read = None

    def __enter__(self):
        if self._read is not None:
            self.peak = 0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            time.sleep(0.2)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@contextlib.contextmanager
def running(command: list[str], url: str, log_path: Path, start_timeout: float):
    """The server process, once `/health` answers 200; stopped (its whole process group) on exit."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")  # fmt: skip
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        try:
            deadline = time.monotonic() + start_timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"exited with code {process.returncode} before /health answered: "
                                       f"{log_path.read_text()[-1500:]}")  # fmt: skip
                try:
                    if httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"/health did not answer within {start_timeout:g} s: "
                                       f"{log_path.read_text()[-1500:]}")  # fmt: skip
                time.sleep(0.5)
            yield process
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def greedy_answers(url: str, model: str, max_tokens: int) -> list[str]:
    answers = []
    for prompt in AGREEMENT_PROMPTS:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        reply = httpx.post(url + "/v1/completions", json=body, timeout=120, trust_env=False)
        reply.raise_for_status()
        answers.append(reply.json()["choices"][0]["text"])
    return answers


def point(result, rate: float, price: float) -> dict:
    m = loadgen.summarize(result, metrics05, gpu_hour_price=price)
    return {"rate": rate, "completed": m.completed, "failed": m.failed, "duration": m.duration,
            "output_throughput": m.output_throughput, "request_throughput": m.request_throughput,
            "ttft_p50": m.ttft.median, "ttft_p99": m.ttft.p99, "itl_p50": m.itl.median, "itl_p99": m.itl.p99,
            "tpot_p50": m.tpot.median, "e2el_p50": m.e2el.median, "cost_per_million": m.cost_per_million_output_tokens,
            "errors": sorted({r.error for r in result.records if r.failed})[:3]}  # fmt: skip


def sweep(url: str, model: str, trace: list, rates: list[float], args) -> list[dict]:
    loadgen.run(url, model, trace[: min(4, len(trace))], time_limit=args.time_limit)  # warm-up: kernels, graphs
    points = []
    for rate in rates:
        # about --seconds-per-point of arrivals at each finite rate (at least 16 requests), the whole trace at inf
        n = len(trace) if math.isinf(rate) else min(len(trace), max(16, math.ceil(rate * args.seconds_per_point)))
        result = loadgen.run(url, model, trace[:n], request_rate=rate, seed=args.seed, time_limit=args.time_limit)
        points.append(point(result, rate, args.gpu_hour_price))
        p = points[-1]
        print(f"    rate {rate:>5g}/s: {p['output_throughput']:8.1f} tok/s, TTFT p50 {p['ttft_p50'] * 1e3:7.1f} ms "
              f"p99 {p['ttft_p99'] * 1e3:7.1f} ms, ITL p50 {p['itl_p50'] * 1e3:6.1f} ms p99 "
              f"{p['itl_p99'] * 1e3:6.1f} ms, failed {p['failed']}", flush=True)  # fmt: skip
    return points


def serve_and_measure(engine: str, command: list[str], model_name: str, url: str, args, work: Path, measure):
    """Start one engine, run `measure(url, model_name)` against it, stop it; a failure is reported, not raised."""
    began = time.perf_counter()
    try:
        with MemoryWatch() as memory, running(command, url, work / f"{engine}.log", args.start_timeout):
            started = time.perf_counter() - began
            print(f"  {engine}: up in {started:.1f} s", flush=True)
            outcome = measure(url, model_name)
        peak = None if memory.peak is None else memory.peak - memory.baseline
        return {"status": "ran", "start_seconds": started, "peak_gpu_memory_bytes": peak, **outcome}
    except Exception as exc:  # noqa: BLE001  (an engine that fails is a result too: say why)
        print(f"  {engine}: failed: {exc}", flush=True)
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:2000]}


# --- charts -----------------------------------------------------------------------------------------------------------


def load_axis(rates: list[float]) -> tuple[list[float], list[str]]:
    finite = [r for r in rates if math.isfinite(r)]
    top = max(finite, default=1.0)
    return [r if math.isfinite(r) else top * 2 for r in rates], [f"{r:g}" if math.isfinite(r) else "inf" for r in rates]


def draw_comparison(results: dict, rates: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, labels = load_axis(rates)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for i, (engine, outcome) in enumerate(r for r in results.items() if r[1].get("status") == "ran"):
        color = f"C{i}"
        pts = outcome["points"]
        x = [xs[rates.index(p["rate"])] for p in pts]
        axes[0].plot(x, [p["output_throughput"] for p in pts], "o-", color=color, label=engine)
        for ax, key in ((axes[1], "ttft"), (axes[2], "itl")):
            ax.plot(x, [p[f"{key}_p50"] * 1e3 for p in pts], "o-", color=color, label=f"{engine} p50")
            ax.plot(x, [p[f"{key}_p99"] * 1e3 for p in pts], "s--", color=color, label=f"{engine} p99")
    for ax, ylabel in zip(axes, ("output tokens/s", "TTFT (ms)", "inter-token latency (ms)"), strict=True):
        ax.set_xscale("log")
        ax.set_xticks(xs, labels)
        ax.minorticks_off()
        ax.set_xlabel("offered load (requests/s, Poisson; inf = all at once)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_walkthrough(walk: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix = walk.get("prefix_caching", {})
    if all(isinstance(v, dict) and "ttft_p50" in v for v in prefix.values()) and prefix:
        fig, ax = plt.subplots(figsize=(6, 4))
        names = list(prefix)
        for j, stat in enumerate(("ttft_p50", "ttft_p99")):
            ax.bar([i + 0.4 * j for i in range(len(names))], [prefix[n][stat] * 1e3 for n in names], 0.4,
                   label=stat.replace("ttft_", "TTFT "))  # fmt: skip
        ax.set_xticks([i + 0.2 for i in range(len(names))], names)
        ax.set_ylabel("TTFT (ms)")
        ax.legend()
        ax.set_title(f"shared system prompt: prefix caching on and off\n{title}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "prefix_caching.png", dpi=120)
        plt.close(fig)
    chunks = walk.get("chunk_size", {})
    ran = {k: v for k, v in chunks.items() if isinstance(v, dict) and "ttft_p50" in v}
    if ran:
        fig, ax = plt.subplots(figsize=(6, 4))
        for stat, marker in (("p50", "o-"), ("p99", "s--")):
            xs = [ran[k][f"itl_{stat}"] * 1e3 for k in ran]
            ys = [ran[k][f"ttft_{stat}"] * 1e3 for k in ran]
            ax.plot(xs, ys, marker, label=f"{stat}")
            for k, x, y in zip(ran, xs, ys, strict=True):
                ax.annotate(str(k), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("inter-token latency (ms)")
        ax.set_ylabel("TTFT (ms)")
        ax.legend(title="chunk size (tokens)")
        ax.set_title(f"chunked prefill: the chunk size trades TTFT against ITL\n{title}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "chunk_size.png", dpi=120)
        plt.close(fig)


def table(results: dict, price: float) -> str:
    lines = [f"| engine | peak output tok/s | at load | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | peak GPU memory "
             f"| $ per M output tokens at ${price:g}/GPU-h |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for engine, outcome in results.items():
        if outcome.get("status") != "ran":
            lines.append(f"| {engine} | — | — | — | — | — | {outcome.get('reason', '')[:160]} |")
            continue
        best = max(outcome["points"], key=lambda p: p["output_throughput"])
        memory = outcome.get("peak_gpu_memory_bytes")
        memory = "n/a (no GPU)" if memory is None else f"{memory / 2**30:.1f} GiB"
        cost = price / 3600 / best["output_throughput"] * 1e6 if best["output_throughput"] else math.inf
        lines.append(f"| {engine} | {best['output_throughput']:.1f} | {best['rate']:g}/s | "
                     f"{best['ttft_p50'] * 1e3:.1f} / {best['ttft_p99'] * 1e3:.1f} | "
                     f"{best['itl_p50'] * 1e3:.2f} / {best['itl_p99'] * 1e3:.2f} | {memory} | "
                     f"{cost:.3f} |")  # fmt: skip
    return "\n".join(lines)


# --- the whole comparison ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default with --cpu: the course model)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--cpu", action="store_true", help="the course model on the CPU, tiny loads: a smoke run")
    parser.add_argument("--out", default="compare-out")
    parser.add_argument("--engines", default="inferlab,transformers,vllm,sglang,tgi")
    parser.add_argument("--rates", default="2,4,8,16,32,inf", help="offered loads, requests/s")
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu-hour-price", type=float, default=3.0, help="dollars per GPU-hour (stated in the table)")
    parser.add_argument("--seconds-per-point", type=float, default=10.0, help="seconds of arrivals per load point")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per load point, at most")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds for an engine to answer /health")
    parser.add_argument("--agreement-tokens", type=int, default=24)
    parser.add_argument("--walkthrough", action="store_true", help="inferlab's prefix-caching and chunk-size runs")
    parser.add_argument("--no-compare", action="store_true", help="only the walkthrough")
    parser.add_argument("--system-prompt-len", type=int, default=1536)
    parser.add_argument("--chunk-sizes", default="256,512,1024,2048")
    parser.add_argument("--walk-rate", type=float, default=8.0, help="requests/s of the walkthrough traces")
    parser.add_argument("--walk-requests", type=int, default=64)
    args = parser.parse_args(argv)
    if args.cpu:
        args.device = "cpu"
        args.model = args.model or str(ROOT / "fixtures" / "course_model" / "target")
        for name, value in (("rates", "2,inf"), ("num_requests", 6), ("prompt_len", 48), ("max_tokens", 8),
                            ("time_limit", 30.0), ("start_timeout", 300.0), ("agreement_tokens", 8),
                            ("system_prompt_len", 192), ("chunk_sizes", "64,256"), ("walk_rate", 4.0),
                            ("walk_requests", 6)):  # fmt: skip
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    if args.model is None:
        parser.error("--model DIR is required (or --cpu for the course model)")
    return args


def compare(args, model: Path, work: Path, report: dict, save) -> None:
    """Each engine in turn; `report["engines"]` and `report["greedy"]` filled, and saved, after each one."""
    rates = [float(r) for r in args.rates.split(",")]
    trace = make_trace(args.num_requests, args.prompt_len, args.max_tokens, args.seed)
    results, answers = report.setdefault("engines", {}), {}
    report["greedy"] = {"answers": answers, "agree_with_inferlab": {}, "rates": rates}
    for engine in args.engines.split(","):
        port = free_port()
        found = engine_commands(model, args.device, port, "model", []).get(engine, f"unknown engine {engine!r}")
        if isinstance(found, str):
            print(f"  {engine}: skipped: {found}", flush=True)
            results[engine] = {"status": "skipped", "reason": found}
            save()
            continue
        command, name = found

        def measure(url, model_name, engine=engine):
            answers[engine] = greedy_answers(url, model_name, args.agreement_tokens)
            return {"points": sweep(url, model_name, trace, rates, args)}

        results[engine] = serve_and_measure(engine, command, name, f"http://127.0.0.1:{port}", args, work, measure)
        if "inferlab" in answers:
            report["greedy"]["agree_with_inferlab"] = {e: a == answers["inferlab"] for e, a in answers.items()}
        save()


def walkthrough(args, model: Path, work: Path, walk: dict, save) -> None:
    """inferlab's tuning runs, each recorded in `walk` and saved as soon as it ends."""
    shared = make_trace(args.walk_requests, args.system_prompt_len + 64, 32, args.seed + 7, args.system_prompt_len)
    for label, extra in (("prefix caching on", []), ("prefix caching off", ["--no-prefix-caching"])):
        port = free_port()
        found = engine_commands(model, args.device, port, "model", extra)["inferlab"]
        if isinstance(found, str):
            walk["skipped"] = found
            return

        def measure(url, name):
            loadgen.run(url, name, shared[:2], time_limit=args.time_limit)
            result = loadgen.run(url, name, shared, request_rate=args.walk_rate, seed=args.seed,
                                 time_limit=args.time_limit)  # fmt: skip
            return point(result, args.walk_rate, args.gpu_hour_price)

        outcome = serve_and_measure(f"inferlab ({label})", found[0], found[1], f"http://127.0.0.1:{port}", args,
                                    work, measure)  # fmt: skip
        walk.setdefault("prefix_caching", {})[label.removeprefix("prefix caching ")] = outcome
        save()
        if outcome.get("status") == "ran":
            print(f"    {label}: TTFT p50 {outcome['ttft_p50'] * 1e3:.1f} ms, p99 {outcome['ttft_p99'] * 1e3:.1f} ms")
    # long prompts arriving while earlier requests decode: each prefill chunk rides along with the decodes
    long_prompts = make_trace(args.walk_requests, max(args.system_prompt_len, 64), 64, args.seed + 11)
    for size in (int(s) for s in args.chunk_sizes.split(",")):
        port = free_port()
        extra = ["--max-num-batched-tokens", str(size)]  # random prompts: the prefix cache finds nothing to reuse
        command, name = engine_commands(model, args.device, port, "model", extra)["inferlab"]

        def measure(url, name):
            loadgen.run(url, name, long_prompts[:2], time_limit=args.time_limit)
            result = loadgen.run(url, name, long_prompts, request_rate=args.walk_rate, seed=args.seed,
                                 time_limit=args.time_limit)  # fmt: skip
            return point(result, args.walk_rate, args.gpu_hour_price)

        outcome = serve_and_measure(f"inferlab (chunk {size})", command, name, f"http://127.0.0.1:{port}", args,
                                    work, measure)  # fmt: skip
        walk.setdefault("chunk_size", {})[size] = outcome
        save()
        if outcome.get("status") == "ran":
            print(f"    chunk {size}: TTFT p50 {outcome['ttft_p50'] * 1e3:.1f} ms, ITL p99 "
                  f"{outcome['itl_p99'] * 1e3:.1f} ms")  # fmt: skip


def versions() -> dict:
    found = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "vllm", "sglang", "httpx", "fastapi", "uvicorn"):
        with contextlib.suppress(Exception):
            found[name] = __import__(name).__version__
    with contextlib.suppress(Exception):
        import torch

        found["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    return found


def summary_table(report: dict, price: float) -> str:
    summary = table(report["engines"], price)
    checked = report["greedy"]["agree_with_inferlab"]
    disagree = [e for e, ok in checked.items() if not ok]
    if len(checked) < 2:
        return summary + "\n\ngreedy answers: fewer than two engines ran beside inferlab's, nothing to compare"
    verdict = f"DIFFER from inferlab's for: {', '.join(disagree)}" if disagree else "agree with inferlab's"
    return summary + f"\n\ngreedy answers {verdict}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped by `timeout`: the servers stop, results stay
    with tempfile.TemporaryDirectory(prefix="compare07-") as scratch:
        model = servable_checkpoint(Path(args.model).resolve(), Path(scratch))
        report = {"args": vars(args), "versions": versions(), "checkpoint": str(args.model)}
        gpu = report["versions"].get("gpu", "none")
        title = (f"{Path(args.model).name} on {'the CPU' if gpu.startswith('none') else gpu}; prompts "
                 f"{args.prompt_len} + answers {args.max_tokens} tokens")  # fmt: skip

        def save() -> None:
            """Everything measured so far, on disk: a run cut short by its time limit still leaves its results."""
            if "engines" in report:
                draw_comparison(report["engines"], report["greedy"]["rates"], out / "compare.png", title)
                (out / "compare.md").write_text(summary_table(report, args.gpu_hour_price) + "\n")
            if "walkthrough" in report:
                draw_walkthrough(report["walkthrough"], out, f"{Path(args.model).name}, {args.device}")
            with tarfile.open(out / "logs.tar.gz", "w:gz") as logs:  # one file: the engines' own output
                for log in sorted(Path(scratch).glob("*.log")):
                    logs.add(log, arcname=log.name.replace(" ", "_").replace("(", "").replace(")", ""))
            report["seconds"] = time.perf_counter() - began
            (out / "compare.json").write_text(json.dumps(report, indent=1, default=str) + "\n")

        if not args.no_compare:
            print(f"engines side by side on {args.model} ({args.device})", flush=True)
            compare(args, model, Path(scratch), report, save)
            print(summary_table(report, args.gpu_hour_price), flush=True)
        if args.walkthrough:
            print("tuning walkthrough (inferlab)", flush=True)
            walkthrough(args, model, Path(scratch), report.setdefault("walkthrough", {}), save)
        save()
    print(f"wrote {out}/compare.json in {report['seconds']:.0f} s", flush=True)
    return report


if __name__ == "__main__":
    main()
