# ruff: noqa: E501  (mutants are data: one replacement per line reads best)
"""Exercise 03 mutants: the reference AWQ code with one mistake each, as students make them.

Each runs only the tests that should name it (`-k`), so the whole list grades in about a minute on two cores.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mutation import Mutant  # noqa: E402

F = "awq.py"
UNPACK_SHIFTS = "    shifts = 4 * torch.tensor(AWQ_NIBBLE, dtype=torch.int32, device=packed.device)"
UNPACK_NIBBLES = "    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF"
KERNEL_SHIFTS = "    shifts = ((j // 2) + (j % 2) * 4) * 4  # AWQ_NIBBLE[j] * 4"
GEMV_SHIFTS = "    shifts = (((j // 2) + (j % 2) * 4) * 4)[None, None, :]  # column j of a word sits in nibble AWQ_NIBBLE[j]"
DEQUANT_PRODUCT = "    w = ((q - z) * scales.to(tl.float32)[None, :]).to(out_ptr.dtype.element_ty)"
DEQUANT_LAUNCH = "        qweight.contiguous(), scales.contiguous(), qzeros.contiguous(), out, K, N // 8, G,"
DEQUANT_BLOCK_K = '    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], _pow2_divisor(G))\n    _check_pow2("dequant_config"'
GEMV_BLOCK_K = '        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], _pow2_divisor(G))\n        _check_pow2("gemv_config"'
GEMV_CHECK = '    K, N, G = _check_weights("awq_gemv", qweight, scales, qzeros)\n'
GEMV_INPUTS = "    x, qweight, scales, qzeros = x.contiguous(), qweight.contiguous(), scales.contiguous(), qzeros.contiguous()"
GEMV_DEF = (
    "def awq_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor) -> torch.Tensor:\n"
    '    """y = x @ dequantize(qweight, scales, qzeros): x [M, K] (1 <= M <= 16) in scales.dtype -> y [M, N] in x.dtype."""\n'
)
# The dequantization from the format, in torch: what a student writes who skips the kernel.
TORCH_W = "(unpack_awq(qweight) - unpack_awq(qzeros).repeat_interleave(G, 0)).to(scales.dtype) * scales.repeat_interleave(G, 0)"
# From the end of the dequantize tile heuristic to the launch grid: tiles of 16 rows over cdiv(K, 16), no K mask.
DEQUANT_CONFIG_TO_GRID = (
    '    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], _pow2_divisor(G))\n'
    '    _check_pow2("dequant_config", cfg, ("BLOCK_K", "BLOCK_N", "num_warps"), minimum={"BLOCK_N": 8})\n'
    "    return cfg\n\n\n"
    "def awq_dequantize(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor) -> torch.Tensor:\n"
    '    """AWQ int32 qweight [K, N/8], scales [K/G, N], qzeros [K/G, N/8] -> W [K, N] in scales.dtype."""\n'
    '    K, N, G = _check_weights("awq_dequantize", qweight, scales, qzeros)\n'
    "    cfg = _dequant_config(K, N, G, **(DEQUANT_CONFIG or {}))\n"
    "    out = torch.empty((K, N), dtype=scales.dtype, device=scales.device)\n"
    '    grid = (triton.cdiv(N, cfg["BLOCK_N"]) * (K // cfg["BLOCK_K"]),)\n'
)
# The dequantization tile with a row count of its own (16) over the wrapper's grid of K // BLOCK_K tiles, no K mask,
# and each row's own group: rows past K read the scales' poison past their end and store NaN past the output's.
DEQUANT_TILE = (
    "    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)\n"
    "    offs_c = pid_n * BLOCK_C + tl.arange(0, BLOCK_C)\n"
    "    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)\n"
    "    # BLOCK_K divides G, so the whole tile shares one row of zeros and scales, loaded once.\n"
    "    group = pid_k * BLOCK_K // G\n"
    "    # K is a multiple of BLOCK_K (it divides G, which divides K): only the columns need masks.\n"
    "    packed = tl.load(qweight_ptr + offs_k[:, None] * N8 + offs_c[None, :], mask=(offs_c < N8)[None, :], other=0)\n"
    "    zeros = tl.load(qzeros_ptr + group * N8 + offs_c, mask=offs_c < N8, other=0)\n"
    "    scales = tl.load(scales_ptr + group * N + offs_n, mask=offs_n < N, other=0.0)\n"
    "    MAGIC: tl.constexpr = 0x4B000000\n"
)
DEQUANT_TILE_UNMASKED_ROWS = (
    "    offs_k = pid_k * 16 + tl.arange(0, 16)\n"
    "    offs_c = pid_n * BLOCK_C + tl.arange(0, BLOCK_C)\n"
    "    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)\n"
    "    group = offs_k // G\n"
    "    packed = tl.load(qweight_ptr + offs_k[:, None] * N8 + offs_c[None, :], mask=(offs_c < N8)[None, :], other=0)\n"
    "    zeros = tl.load(qzeros_ptr + group[:, None] * N8 + offs_c[None, :], mask=(offs_c < N8)[None, :], other=0)\n"
    "    scales = tl.load(scales_ptr + group[:, None] * N + offs_n[None, :], mask=(offs_n < N)[None, :], other=0.0)\n"
    "    MAGIC: tl.constexpr = 0x4B000000\n"
)
DEQUANT_UNPACK_Q = (
    "    # 2^23 + q and 2^23 + z as floats, by ORing the nibbles into 2^23's mantissa: their difference is q - z exactly,\n"
    "    # without the quarter-rate integer -> float conversion. q - z is a small integer and the fp32 product is exact,\n"
    "    # so its one rounding to fp16/bf16 gives bit for bit what a fp16/bf16 multiply gives.\n"
    "    q = (_unpack(packed) | MAGIC).to(tl.float32, bitcast=True)\n"
)
DEQUANT_PRODUCT_ROWS = (  # the product with [BLOCK_K, BLOCK_C] zeros and [BLOCK_K, BLOCK_N] scales
    "    z = (_unpack(zeros[None, :]) | MAGIC).to(tl.float32, bitcast=True)\n"
    "    w = ((q - z) * scales.to(tl.float32)[None, :]).to(out_ptr.dtype.element_ty)\n"
)
# bf16 dequantized in torch, the fp32 product cut to bf16 by dropping its low bits (the interpreter's conversion).
TORCH_W_TRUNCATED = (
    "(((unpack_awq(qweight) - unpack_awq(qzeros).repeat_interleave(G, 0)).float() * scales.float().repeat_interleave(G, 0))"
    ".view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)"
)
FMA_ACCUMULATE = "        acc += tl.sum(x[:, None, None] * (q - z), axis=0) * scales"
DOT_ACCUMULATE = "        acc += tl.dot(x, w) * scales.to(tl.float32)[None, :]"


def only(tests: str) -> tuple[str, ...]:
    """Run only these tests (pytest -k)."""
    return ("-k", tests)


MUTANTS = [
    # --- the format ---------------------------------------------------------------------------------------------
    Mutant("unpack_awq: nibbles in natural order", F, UNPACK_SHIFTS,
           "    shifts = 4 * torch.arange(8, dtype=torch.int32, device=packed.device)", "natural order", only("test_unpack")),
    Mutant("unpack_awq: the permutation inverted (ORDER[n % 8] as the nibble of column n)", F, UNPACK_SHIFTS,
           "    shifts = 4 * torch.tensor(AWQ_ORDER, dtype=torch.int32, device=packed.device)", "permutation inverted",
           only("test_unpack")),
    Mutant("unpack_awq: nibbles not masked (sign bits of negative words kept)", F, UNPACK_NIBBLES,
           "    nibbles = packed.unsqueeze(-1) >> shifts", "mask every nibble", only("test_unpack")),
    Mutant("unpack_awq: a Python loop over the words (.tolist())", F, UNPACK_NIBBLES,
           "    nibbles = torch.tensor([[[(w >> s) & 0xF for s in shifts.tolist()] for w in row] for row in packed.tolist()], dtype=torch.int32, device=packed.device).reshape(*packed.shape, 8)",
           "Python loop", only("python_loop")),
    Mutant("unpack_awq: a Python loop over the rows", F, UNPACK_NIBBLES,
           "    nibbles = torch.stack([(row.unsqueeze(-1) >> shifts) & 0xF for row in packed])", "Python loop",
           only("python_loop")),
    Mutant("pack_awq: nibbles packed in natural order", F,
           "    shifts = 4 * torch.tensor(AWQ_NIBBLE, dtype=torch.int64, device=values.device)",
           "    shifts = 4 * torch.arange(8, dtype=torch.int64, device=values.device)", "give back the same words",
           only("pack_inverts")),
    Mutant("pack_awq: values outside 0..15 accepted", F,
           "    if values.numel() and (values.min() < 0 or values.max() > 15):", "    if False:", "pack_rejects_bad_values",
           only("pack_rejects")),
    # --- the dequantization kernel ------------------------------------------------------------------------------
    Mutant("dequantize kernel: nibbles in natural order", F, KERNEL_SHIFTS, "    shifts = j * 4", "natural order",
           only("dequantize_is_bit_exact")),
    Mutant("dequantize kernel: the permutation inverted", F, KERNEL_SHIFTS, "    shifts = ((j % 4) * 2 + (j // 4)) * 4",
           "permutation inverted", only("dequantize_is_bit_exact")),
    Mutant("dequantize kernel: nibbles not masked", F,
           "    nibbles = (packed[:, :, None] >> shifts[None, None, :]) & 0xF",
           "    nibbles = (packed[:, :, None] >> shifts[None, None, :]) & 0xFFFF", "dequantized weights differ",
           only("dequantize_is_bit_exact")),
    Mutant("dequantize kernel: zero points not subtracted", F, DEQUANT_PRODUCT,
           "    w = ((q - 8388608.0) * scales.to(tl.float32)[None, :]).to(out_ptr.dtype.element_ty)",
           "zero points not subtracted", only("dequantize_is_bit_exact")),
    Mutant("dequantize kernel: a constant zero point of 8", F, DEQUANT_PRODUCT,
           "    w = ((q - 8388616.0) * scales.to(tl.float32)[None, :]).to(out_ptr.dtype.element_ty)",
           "constant zero point of 8", only("subtracts_the_zero_point")),
    Mutant("dequantize kernel: group index k % (K / G)", F,
           "    group = pid_k * BLOCK_K // G", "    group = (pid_k * BLOCK_K) % (K // G)", "group index",
           only("dequantize_is_bit_exact")),
    Mutant("dequantize kernel: the store's tail mask left out", F,
           "    tl.store(out, w, mask=(offs_n < N)[None, :])", "    tl.store(out, w)", "past the end",
           only("dequantize_covers_tails")),
    Mutant("dequantize kernel: the scales' group taken from the column", F,
           "    scales = tl.load(scales_ptr + group * N + offs_n, mask=offs_n < N, other=0.0)\n    MAGIC",
           "    scales = tl.load(scales_ptr + offs_n, mask=offs_n < N, other=0.0)\n    MAGIC", "dequantized weights differ",
           only("dequantize_is_bit_exact")),
    Mutant("dequantize: 8-row tiles, K assumed a multiple of 8", F, DEQUANT_BLOCK_K,
           '    cfg["BLOCK_K"] = 8\n    _check_pow2("dequant_config"', "K tail", only("dequantize_covers_tails")),
    Mutant("dequantize: 16-row tiles over cdiv(K, 16) with no K mask, the output from scales.new_empty", F,
           DEQUANT_CONFIG_TO_GRID,
           DEQUANT_CONFIG_TO_GRID.replace('min(cfg["BLOCK_K"], _pow2_divisor(G))', "16")
           .replace("torch.empty((K, N), dtype=scales.dtype, device=scales.device)", "scales.new_empty((K, N))")
           .replace('(K // cfg["BLOCK_K"])', "triton.cdiv(K, 16)"),
           "past the end", only("dequantize_covers_tails")),
    Mutant("dequantize: 16-row tiles over K // BLOCK_K, no K mask, each row's own group (NaN stored past the end)", F,
           DEQUANT_TILE + DEQUANT_UNPACK_Q + DEQUANT_PRODUCT_ROWS,
           DEQUANT_TILE_UNMASKED_ROWS + DEQUANT_UNPACK_Q
           + DEQUANT_PRODUCT_ROWS.replace("zeros[None, :]", "zeros").replace(".to(tl.float32)[None, :]", ".to(tl.float32)"),
           "past the end", only("dequantize_covers_tails")),
    Mutant("dequantize: bf16 in torch, truncated to bf16 instead of rounded", F,
           "    cfg = _dequant_config(K, N, G, **(DEQUANT_CONFIG or {}))\n",
           f"    if scales.dtype == torch.bfloat16:\n        return {TORCH_W_TRUNCATED}\n"
           "    cfg = _dequant_config(K, N, G, **(DEQUANT_CONFIG or {}))\n", "computed W in torch",
           only("runs_in_a_triton_kernel")),
    Mutant("dequantize: W computed in plain torch, no Triton kernel", F,
           "    cfg = _dequant_config(K, N, G, **(DEQUANT_CONFIG or {}))\n",
           f"    return {TORCH_W}\n    cfg = _dequant_config(K, N, G, **(DEQUANT_CONFIG or {{}}))\n", "computed W in torch",
           only("runs_in_a_triton_kernel")),
    Mutant("dequantize: bf16 scales converted to fp16 (.half()) on the way", F, DEQUANT_LAUNCH,
           "        qweight.contiguous(), scales.half(), qzeros.contiguous(), out, K, N // 8, G,", "through fp16",
           only("dequantize_keeps_the_range")),
    Mutant("dequantize: scales read as if contiguous (strides ignored)", F, DEQUANT_LAUNCH,
           "        qweight.contiguous(), scales, qzeros.contiguous(), out, K, N // 8, G,", "honour the strides",
           only("dequantize_accepts_any_strides")),
    # --- validation -----------------------------------------------------------------------------------------------
    Mutant("validation: a group size that does not divide K", F,
           "    if groups == 0 or K % groups != 0:", "    if groups == 0:", "group does not divide K",
           only("dequantize_rejects_bad_input")),
    Mutant("validation: qzeros rows not checked", F,
           "    if tuple(qzeros.shape) != (groups, N8):", "    if qzeros.shape[1] != N8:", "qzeros rows disagree",
           only("dequantize_rejects_bad_input")),
    Mutant("validation: mixed devices accepted", F,
           "    if not (qweight.device == scales.device == qzeros.device):", "    if False:", "mixed devices",
           only("dequantize_rejects_bad_input")),
    Mutant("validation: a 1-d qweight rejected only by accident (K, N8 = qweight.shape)", F,
           "        if t.dim() != 2:", "        if False:", "qweight 1-d", only("dequantize_rejects_bad_input and 1-d")),
    # --- the GEMV -----------------------------------------------------------------------------------------------
    Mutant("GEMV: goes through awq_dequantize", F, GEMV_CHECK,
           GEMV_CHECK + "    if x.dim() == 2:\n        return (x.float() @ awq_dequantize(qweight, scales, qzeros).float()).to(x.dtype)\n",
           "called awq_dequantize", only("never_materialises")),
    Mutant("GEMV: awq_dequantize called through an alias", F, GEMV_DEF + GEMV_CHECK,
           "_dequantize = awq_dequantize\n\n\n" + GEMV_DEF + GEMV_CHECK
           + "    if x.dim() == 2:\n        return (x.float() @ _dequantize(qweight, scales, qzeros).float()).to(x.dtype)\n",
           "materialises W", only("never_materialises")),
    Mutant("GEMV: W dequantized in torch, then x @ W", F, GEMV_CHECK,
           GEMV_CHECK + f"    if x.dim() == 2 and x.dtype == scales.dtype:\n        return (x.float() @ ({TORCH_W}).float()).to(x.dtype)\n",
           "materialises W", only("never_materialises")),
    Mutant("GEMV kernel: nibbles in natural order", F, GEMV_SHIFTS, "    shifts = (j * 4)[None, None, :]",
           "natural order", only("gemv_matches")),
    Mutant("GEMV kernel: the permutation inverted", F, GEMV_SHIFTS,
           "    shifts = (((j % 4) * 2 + (j // 4)) * 4)[None, None, :]", "permutation inverted", only("gemv_matches")),
    Mutant("GEMV: 32-row steps, K assumed a multiple of 32", F, GEMV_BLOCK_K,
           '        cfg["BLOCK_K"] = 32\n        _check_pow2("gemv_config"', "K tail", only("gemv_covers_tails")),
    Mutant("GEMV (batch 1 kernel): sums accumulated in the input dtype", F, FMA_ACCUMULATE,
           "        acc = (acc + tl.sum(x[:, None, None] * (q - z), axis=0) * scales).to(x_ptr.dtype.element_ty).to(tl.float32)",
           "accumulated in", only("accumulates_in_fp32")),
    Mutant("GEMV (tl.dot kernel): sums accumulated in the input dtype", F, DOT_ACCUMULATE,
           "        acc = (acc + tl.dot(x, w) * scales.to(tl.float32)[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32)",
           "accumulated in", only("accumulates_in_fp32")),
    Mutant("GEMV: bf16 x converted to fp16", F, GEMV_INPUTS,
           GEMV_INPUTS.replace("x.contiguous()", "x.contiguous().half()"), "through fp16",
           only("gemv_keeps_the_range")),
    Mutant("GEMV: bf16 scales converted to fp16", F, GEMV_INPUTS,
           GEMV_INPUTS.replace("scales.contiguous()", "scales.contiguous().half()"), "through fp16",
           only("gemv_keeps_the_range")),
    Mutant("GEMV: x read as if contiguous (strides ignored)", F, GEMV_INPUTS,
           GEMV_INPUTS.replace("x.contiguous()", "x"), "honour the strides", only("gemv_accepts_any_strides")),
    Mutant("GEMV: the weights not validated", F, GEMV_CHECK,
           "    K, N, G = qweight.shape[0], scales.shape[1], qweight.shape[0] // scales.shape[0]\n",
           "gemv_rejects_bad_weights", only("gemv_rejects_bad_weights")),
    Mutant("GEMV: x of another dtype accepted", F,
           "    if x.dtype != scales.dtype:", "    if False:", "gemv_rejects_bad_x", only("gemv_rejects_bad_x")),
    Mutant("GEMV: x in fp16 or bf16 accepted whatever the scales' dtype", F,
           "    if x.dtype != scales.dtype:", "    if x.dtype not in (torch.float16, torch.bfloat16):", "bf16 scales",
           only("gemv_rejects_bad_x")),
    Mutant("GEMV: batches outside 1..16 rows accepted", F,
           "    if not 1 <= x.shape[0] <= 16:", "    if x.shape[0] < 0:", "rows (M", only("gemv_rejects_bad_x and rows")),
]
