# ruff: noqa: E501  (mutants are data: one replacement per line reads best)
"""Exercise 03 mutants: the reference AWQ code with one mistake each, as students make them.

Issue 15 lists further mistakes that no CPU test catches yet (a dequantize in plain torch, K tails, bf16 routed
through fp16, ignored strides, fp16 accumulation): each joins this list with the test that catches it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mutation import Mutant  # noqa: E402

F = "awq.py"
UNPACK_SHIFTS = "    shifts = 4 * torch.tensor(AWQ_NIBBLE, dtype=torch.int32, device=packed.device)"
KERNEL_SHIFTS = "    shifts = ((j // 2) + (j % 2) * 4) * 4  # AWQ_NIBBLE[j] * 4"
DEQUANT_PRODUCT = "    w = ((q - z) * scales.to(tl.float32)[None, :]).to(out_ptr.dtype.element_ty)"

MUTANTS = [
    Mutant("unpack_awq: nibbles in natural order", F, UNPACK_SHIFTS,
           "    shifts = 4 * torch.arange(8, dtype=torch.int32, device=packed.device)", "natural order"),
    Mutant("unpack_awq: the permutation inverted (ORDER[n % 8] as the nibble of column n)", F, UNPACK_SHIFTS,
           "    shifts = 4 * torch.tensor(AWQ_ORDER, dtype=torch.int32, device=packed.device)", "permutation inverted"),
    Mutant("unpack_awq: nibbles not masked (sign bits of negative words kept)", F,
           "    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF", "    nibbles = packed.unsqueeze(-1) >> shifts",
           "mask every nibble"),
    Mutant("pack_awq: nibbles packed in natural order", F,
           "    shifts = 4 * torch.tensor(AWQ_NIBBLE, dtype=torch.int64, device=values.device)",
           "    shifts = 4 * torch.arange(8, dtype=torch.int64, device=values.device)", "give back the same words"),
    Mutant("pack_awq: values outside 0..15 accepted", F,
           "    if values.numel() and (values.min() < 0 or values.max() > 15):", "    if False:", "pack_rejects_bad_values"),
    Mutant("dequantize kernel: nibbles in natural order", F, KERNEL_SHIFTS, "    shifts = j * 4", "natural order"),
    Mutant("dequantize kernel: the permutation inverted", F, KERNEL_SHIFTS, "    shifts = ((j % 4) * 2 + (j // 4)) * 4",
           "permutation inverted"),
    Mutant("dequantize kernel: nibbles not masked", F,
           "    nibbles = (packed[:, :, None] >> shifts[None, None, :]) & 0xF",
           "    nibbles = (packed[:, :, None] >> shifts[None, None, :]) & 0xFFFF", "dequantized weights differ"),
    Mutant("dequantize kernel: zero points not subtracted", F, DEQUANT_PRODUCT,
           "    w = ((q - 8388608.0) * scales.to(tl.float32)[None, :]).to(out_ptr.dtype.element_ty)",
           "zero points not subtracted"),
    Mutant("dequantize kernel: a constant zero point of 8", F, DEQUANT_PRODUCT,
           "    w = ((q - 8388616.0) * scales.to(tl.float32)[None, :]).to(out_ptr.dtype.element_ty)",
           "constant zero point of 8"),
    Mutant("dequantize kernel: group index k % (K / G)", F,
           "    group = pid_k * BLOCK_K // G", "    group = (pid_k * BLOCK_K) % (K // G)", "tiled"),
    Mutant("dequantize kernel: the store's tail mask left out", F,
           "    tl.store(out, w, mask=(offs_n < N)[None, :])", "    tl.store(out, w)", "past the end"),
    Mutant("dequantize kernel: the scales' group taken from the column", F,
           "    scales = tl.load(scales_ptr + group * N + offs_n, mask=offs_n < N, other=0.0)\n    MAGIC",
           "    scales = tl.load(scales_ptr + offs_n, mask=offs_n < N, other=0.0)\n    MAGIC", "dequantized weights differ"),
    Mutant("validation: a group size that does not divide K", F,
           "    if groups == 0 or K % groups != 0:", "    if groups == 0:", "group does not divide K"),
    Mutant("validation: qzeros rows not checked", F,
           "    if tuple(qzeros.shape) != (groups, N8):", "    if qzeros.shape[1] != N8:", "qzeros rows disagree"),
    Mutant("validation: mixed devices accepted", F,
           "    if not (qweight.device == scales.device == qzeros.device):", "    if False:", "mixed devices"),
    Mutant("GEMV: goes through awq_dequantize", F,
           '    K, N, G = _check_weights("awq_gemv", qweight, scales, qzeros)\n',
           '    K, N, G = _check_weights("awq_gemv", qweight, scales, qzeros)\n    if x.dim() == 2:\n        return (x.float() @ awq_dequantize(qweight, scales, qzeros).float()).to(x.dtype)\n',
           "never write W"),
    Mutant("GEMV: x of another dtype accepted", F,
           "    if x.dtype != scales.dtype:", "    if False:", "gemv_rejects_bad_input"),
]
