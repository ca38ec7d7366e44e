"""int4 weights for the engine: checkpoints in AutoAWQ's GEMM layout, served through exercise 03's fused GEMV.

A quantized checkpoint keeps every linear of the decoder layers as `<name>.qweight` (int32 [K, N/8], eight 4-bit
codes per word), `<name>.qzeros` (int32 [K/G, N/8]) and `<name>.scales` (fp16 [K/G, N]), K input and N output
features, w[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]; its config.json says
`"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": G, "version": "gemm", "zero_point": true}`.
Exercise 08's `export_awq` writes exactly these tensors; `write_awq_checkpoint` below quantizes a checkpoint with
exercise 08's round-to-nearest and saves it, with its fake-quantized twin (the same weights, dequantized, as a plain
fp16 checkpoint) whose greedy tokens the quantized engine must reproduce.

On CUDA a linear of up to 64 rows (a decode batch) runs exercise 03's `awq_gemv` (16 rows at a time), which reads
the int4 words directly; more rows (a prefill) dequantize with exercise 03's kernel and multiply. On the CPU the
weights are dequantized once at load time in torch (the Triton interpreter is far too slow for a forward): the CPU
checks the format, the GPU the kernels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j of a group of eight sits in nibble AWQ_ORDER[j]
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")  # fmt: skip
GEMV_ROWS = 16  # exercise 03's awq_gemv takes 1 to 16 rows
GEMV_CHUNKS = 4  # up to 64 rows run as GEMVs of 16: 4 reads of the int4 words cost what one fp16 read does, less
# than dequantizing (read int4, write and read back fp16)


def unpack(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, C/8] in AWQ's nibble order -> int16 codes [R, C], 0..15."""
    shifts = torch.tensor([4 * n for n in AWQ_ORDER], dtype=torch.int32, device=words.device)
    return ((words[:, :, None] >> shifts) & 0xF).reshape(words.shape[0], -1).to(torch.int16)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor) -> torch.Tensor:
    """[K, N] in the scales' dtype: (q - z) * s, rounded once (as exercise 03's kernel and the fp16 twin do)."""
    group = qweight.shape[0] // scales.shape[0]
    zeros = unpack(qzeros).repeat_interleave(group, dim=0)
    return (unpack(qweight) - zeros).to(scales.dtype) * scales.repeat_interleave(group, dim=0)


class AWQLinear:
    """y = x @ W for an AWQ weight W [K, N]: x [T, K] -> y [T, N]."""

    def __init__(self, qweight, scales, qzeros, dtype: torch.dtype, parts=None):
        self.qweight, self.scales, self.qzeros = qweight, scales, qzeros
        self.parts = parts
        self.dense = None
        if qweight.device.type == "cpu":
            self.dense = dequantize(qweight, scales, qzeros).to(dtype).T.contiguous()  # [N, K], for F.linear
        elif scales.dtype != dtype:
            raise ValueError(f"AWQ scales are {scales.dtype}, the model runs in {dtype}: they must agree on CUDA")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return torch.nn.functional.linear(x, self.dense)
        awq = self.parts.awq
        if x.shape[0] <= GEMV_ROWS:
            return awq.awq_gemv(x.contiguous(), self.qweight, self.scales, self.qzeros)
        if x.shape[0] <= GEMV_ROWS * GEMV_CHUNKS:
            return torch.cat([awq.awq_gemv(rows.contiguous(), self.qweight, self.scales, self.qzeros)
                              for rows in x.split(GEMV_ROWS)])  # fmt: skip
        return x @ awq.awq_dequantize(self.qweight, self.scales, self.qzeros)


def awq_linears(state: dict, runner, parts):
    """A `linear(prefix, names)` for ModelRunner._load_weights: the named linears side by side as one AWQLinear."""
    if parts is None:
        raise ValueError("quantization='awq' needs the course's parts (exercise 03's kernels)")

    def linear(prefix: str, names: tuple[str, ...]) -> AWQLinear:
        tensors = {}
        for kind in ("qweight", "qzeros", "scales"):
            keys = [f"{prefix}.{name}.{kind}" for name in names]
            missing = [k for k in keys if k not in state]
            if missing:
                raise ValueError(f"quantization='awq', but the checkpoint has no {missing[0]}: is it an AWQ export?")
            # side by side along N: q, k and v (or gate and up) share their input, so one GEMV computes them all
            tensors[kind] = torch.cat([state.pop(k) for k in keys], dim=1).to(runner.device)
        return AWQLinear(tensors["qweight"], tensors["scales"], tensors["qzeros"], runner.dtype, parts)

    return linear


def write_awq_checkpoint(model_dir: str | Path, out_dir: str | Path, group_size: int = 64, impl: str = "solution"):
    """Quantize every decoder linear of `model_dir` to 4 bits (exercise 08's RTN and export) into out_dir/awq, and
    write its fake-quantized fp16 twin into out_dir/fake. Returns the two paths."""
    from safetensors.torch import save_file

    from .model_runner import load_state_dict
    from .parts import load_module

    quantize = load_module(impl, "08", "quantize")
    source, out = Path(model_dir), Path(out_dir)
    state = load_state_dict(source)
    config = json.loads((source / "config.json").read_text())
    awq, fake = {}, {}
    for name, tensor in state.items():
        if name.endswith(".weight") and any(f".{linear}." in name + "." for linear in LINEARS):
            quantized = quantize.quantize_rtn(tensor.float(), bits=4, group_size=group_size)
            qweight, scales, qzeros = quantize.export_awq(quantized)
            base = name.removesuffix(".weight")
            awq[f"{base}.qweight"], awq[f"{base}.scales"], awq[f"{base}.qzeros"] = qweight, scales.half(), qzeros
            fake[name] = quantized.dequantize().half()
        else:
            awq[name] = fake[name] = tensor.contiguous()
    for folder, tensors, extra in (
        ("awq", awq, {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                              "version": "gemm", "zero_point": True}}),
        ("fake", fake, {}),
    ):  # fmt: skip
        target = out / folder
        target.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, target / "model.safetensors")
        (target / "config.json").write_text(json.dumps({**config, **extra}, indent=2))
        for tokenizer_file in source.glob("tokenizer*"):
            shutil.copy2(tokenizer_file, target / tokenizer_file.name)
    return out / "awq", out / "fake"
