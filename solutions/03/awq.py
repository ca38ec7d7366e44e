"""Exercise 03 reference solution: AWQ 4-bit weights, unpacked, dequantized and multiplied in Triton.

AWQ stores a [K, N] weight matrix as 4-bit integers q, eight to an int32, with one scale s and one 4-bit zero point z
per column and per group of G consecutive rows: w[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]. The eight nibbles
of a word are not in column order: nibble i (bits 4i..4i+3) holds column AWQ_ORDER[i] = [0, 2, 4, 6, 1, 3, 5, 7][i]
of the word's group of eight columns.

`awq_dequantize` expands the packed matrix to fp16/bf16, bit for bit what a plain torch reference computes. It reads
K*N/2 bytes and writes K*N*2, so it is a memory-bound kernel whose job is wide, coalesced loads and stores.

`awq_gemv` computes x @ W for the few rows of x of a decode step without ever writing W to memory: at batch 1 its cost
is reading the K*N/2 packed bytes once. On an NVIDIA GPU (batch 1 to 16, G a multiple of 32) it feeds the tensor
cores straight from the packed words: a byte permute, a mask-or and one add turn two nibbles into an exact pair of
q - z, and mma.sync does the multiply-add, in inline PTX because Triton cannot place registers the way an mma wants
them (the section "Batch 1 to 16 on an NVIDIA GPU" explains the mapping). Programs also split K; the last program of
a column block to finish adds the fp32 partial sums up in a fixed order (deterministic, unlike atomics), in the same
kernel.
Elsewhere (the CPU interpreter, odd group sizes) two portable Triton kernels do the work:
  * batch 1: CUDA-core FMAs with no integer -> float conversions (a quarter-rate pipe): a nibble ORed into the
    mantissa of 2^23 is the float 2^23 + q, and subtracting 2^23 + z gives q - z exactly; small per-program
    accumulators and a software-pipelined loop over K (`tl.range(num_stages=...)`) keep many loads in flight;
  * more rows: the same loop feeds `tl.dot` with the exact small integers q - z.

Block sizes come from two small heuristics, `_dequant_config` and `_gemv_config` (they document the keys). The
module dicts DEQUANT_CONFIG / GEMV_CONFIG override them for every call (benchmarks set them); a partial dict is
completed by the heuristic.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Overrides used by every call when not None; keys as returned by dequant_config / gemv_config (a partial dict is
# completed from the heuristic). Set by benchmarks, e.g. awq.GEMV_CONFIG = {"BLOCK_N": 512, "SPLIT_K": 16}.
DEQUANT_CONFIG: dict | None = None
GEMV_CONFIG: dict | None = None

# Column j of a group of eight lives in nibble AWQ_NIBBLE[j]; nibble i holds column AWQ_ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)


# ----------------------------------------------------------------------------------------------------------------
# Packing in plain torch (any device)
# ----------------------------------------------------------------------------------------------------------------


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C/8] in AWQ order -> int32 [R, C] of values 0..15 in natural column order."""
    if packed.dtype != torch.int32:
        raise TypeError(f"unpack_awq: packed must be int32, got {packed.dtype}")
    shifts = 4 * torch.tensor(AWQ_NIBBLE, dtype=torch.int32, device=packed.device)
    # An arithmetic shift of a negative word drags sign bits in from the top; the mask drops them.
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF
    return nibbles.reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """int values 0..15 [R, C] (C a multiple of 8) -> int32 [R, C/8] in AWQ order; the inverse of unpack_awq."""
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise TypeError(f"pack_awq: values must be an integer tensor, got {values.dtype}")
    if values.dim() < 1 or values.shape[-1] % 8 != 0:
        raise ValueError(f"pack_awq: the last dimension must be a multiple of 8, got shape {tuple(values.shape)}")
    if values.numel() and (values.min() < 0 or values.max() > 15):
        raise ValueError("pack_awq: values must lie in 0..15")
    v = values.to(torch.int64).reshape(*values.shape[:-1], values.shape[-1] // 8, 8)
    shifts = 4 * torch.tensor(AWQ_NIBBLE, dtype=torch.int64, device=values.device)
    words = (v << shifts).sum(-1)  # disjoint bits, so the sum is an OR; nibble 7 reaches bit 31, hence int64
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


# ----------------------------------------------------------------------------------------------------------------
# Dequantization
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _unpack(packed):
    """[R, C] int32 words -> [R, 8*C] int32 nibbles in natural column order."""
    j = tl.arange(0, 8)
    shifts = ((j // 2) + (j % 2) * 4) * 4  # AWQ_NIBBLE[j] * 4
    nibbles = (packed[:, :, None] >> shifts[None, None, :]) & 0xF
    return tl.reshape(nibbles, (packed.shape[0], packed.shape[1] * 8))


@triton.jit
def _dequant_kernel(
    qweight_ptr, scales_ptr, qzeros_ptr, out_ptr, K, N8, G,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Consecutive programs walk along N, so together they write whole rows of the output: long contiguous bursts.
    N = N8 * 8
    num_n = tl.cdiv(N, BLOCK_N)
    pid_n = tl.program_id(0) % num_n
    pid_k = tl.program_id(0) // num_n
    BLOCK_C: tl.constexpr = BLOCK_N // 8
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_c = pid_n * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # BLOCK_K divides G, so the whole tile shares one row of zeros and scales, loaded once.
    group = pid_k * BLOCK_K // G
    # K is a multiple of BLOCK_K (it divides G, which divides K): only the columns need masks.
    packed = tl.load(qweight_ptr + offs_k[:, None] * N8 + offs_c[None, :], mask=(offs_c < N8)[None, :], other=0)
    zeros = tl.load(qzeros_ptr + group * N8 + offs_c, mask=offs_c < N8, other=0)
    scales = tl.load(scales_ptr + group * N + offs_n, mask=offs_n < N, other=0.0)
    MAGIC: tl.constexpr = 0x4B000000
    # 2^23 + q and 2^23 + z as floats, by ORing the nibbles into 2^23's mantissa: their difference is q - z exactly,
    # without the quarter-rate integer -> float conversion. q - z is a small integer and the fp32 product is exact,
    # so its one rounding to fp16/bf16 gives bit for bit what a fp16/bf16 multiply gives.
    q = (_unpack(packed) | MAGIC).to(tl.float32, bitcast=True)
    z = (_unpack(zeros[None, :]) | MAGIC).to(tl.float32, bitcast=True)
    w = ((q - z) * scales.to(tl.float32)[None, :]).to(out_ptr.dtype.element_ty)
    out = out_ptr + offs_k.to(tl.int64)[:, None] * N + offs_n[None, :]  # K * N may pass 2**31
    tl.store(out, w, mask=(offs_n < N)[None, :])


def _dequant_config(K: int, N: int, G: int, **fixed) -> dict:
    """Tile for awq_dequantize: BLOCK_K rows (a power of two dividing G) by BLOCK_N columns, num_warps warps.

    Wide enough for 16-byte stores and one scale row per tile; `fixed` overrides any key (see DEQUANT_CONFIG).
    """
    cfg = {"BLOCK_K": 16, "BLOCK_N": min(512, triton.next_power_of_2(N)), "num_warps": 4}  # best on an H200
    cfg.update(_known("dequant_config", cfg, fixed))
    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], _pow2_divisor(G))
    _check_pow2("dequant_config", cfg, ("BLOCK_K", "BLOCK_N", "num_warps"), minimum={"BLOCK_N": 8})
    return cfg


def awq_dequantize(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor) -> torch.Tensor:
    """AWQ int32 qweight [K, N/8], scales [K/G, N], qzeros [K/G, N/8] -> W [K, N] in scales.dtype."""
    K, N, G = _check_weights("awq_dequantize", qweight, scales, qzeros)
    cfg = _dequant_config(K, N, G, **(DEQUANT_CONFIG or {}))
    out = torch.empty((K, N), dtype=scales.dtype, device=scales.device)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]) * (K // cfg["BLOCK_K"]),)
    _dequant_kernel[grid](
        qweight.contiguous(), scales.contiguous(), qzeros.contiguous(), out, K, N // 8, G,
        BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------------------
# GEMV / small-batch GEMM, fused with the dequantization
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _gemv_fma_kernel(
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, out_ptr, M, K, N8, G, K_SPLIT,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """Batch 1 (one row of x per program): CUDA-core FMAs on [BLOCK_K, BLOCK_C words, 8 columns] tiles.

    Program (c, s, m) owns the words c*BLOCK_C.., the K rows s*K_SPLIT.. and row m of x. Each step loads a tile of
    packed words with 16-byte loads, turns every nibble into q - z as an exact float, multiplies by x and reduces
    over the step's rows straight away: the accumulator stays [BLOCK_C, 8], so registers stay few and many
    programs fit on an SM, which is what keeps enough loads in flight at batch 1.
    """
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    m = tl.program_id(2)
    N = N8 * 8
    # Integer -> float conversion runs on a quarter-rate pipe on Hopper. A nibble ORed into the low mantissa bits of
    # 2^23 (0x4B000000) instead reads as the float 2^23 + q; subtracting 2^23 + z, made the same way, leaves q - z
    # exactly: two full-rate operations.
    MAGIC: tl.constexpr = 0x4B000000
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    j = tl.arange(0, 8)
    shifts = (((j // 2) + (j % 2) * 4) * 4)[None, None, :]  # column j of a word sits in nibble AWQ_NIBBLE[j]
    cols = offs_c[:, None] * 8 + j[None, :]
    in_n = offs_c < N8
    acc = tl.zeros([BLOCK_C, 8], dtype=tl.float32)
    k_start = pid_s * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        group = k0 // G  # BLOCK_K divides G: the step lies in one group
        packed = tl.load(qweight_ptr + offs_k[:, None] * N8 + offs_c[None, :], mask=in_n[None, :], other=0)
        x = tl.load(x_ptr + m * K + offs_k).to(tl.float32)
        zeros = tl.load(qzeros_ptr + group * N8 + offs_c, mask=in_n, other=0)
        scales = tl.load(scales_ptr + group * N + cols, mask=in_n[:, None], other=0.0).to(tl.float32)
        z = (((zeros[None, :, None] >> shifts) & 0xF) | MAGIC).to(tl.float32, bitcast=True)
        q = (((packed[:, :, None] >> shifts) & 0xF) | MAGIC).to(tl.float32, bitcast=True)
        acc += tl.sum(x[:, None, None] * (q - z), axis=0) * scales
    tl.store(out_ptr + pid_s * M * N + m * N + cols, acc, mask=in_n[:, None])


@triton.jit
def _gemv_dot_kernel(
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, out_ptr, M, K, N8, G, K_SPLIT,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """Several rows of x: tensor cores on the exact integers q - z, the scale applied to each tile's product."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    N = N8 * 8
    BLOCK_C: tl.constexpr = BLOCK_N // 8
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_n * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Integer -> fp16 conversions run on a slow pipe, so q - z is made with the fp32 bit trick: the nibble ORed into
    # the low mantissa bits of 2^23 (0x4B000000) reads 2^23 + q; subtracting 2^23 + z leaves q - z, exactly.
    MAGIC: tl.constexpr = 0x4B000000
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = pid_s * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        group = k0 // G  # BLOCK_K divides G: one group per tile
        packed = tl.load(qweight_ptr + offs_k[:, None] * N8 + offs_c[None, :], mask=(offs_c < N8)[None, :], other=0)
        zeros = tl.load(qzeros_ptr + group * N8 + offs_c, mask=offs_c < N8, other=0)
        scales = tl.load(scales_ptr + group * N + offs_n, mask=offs_n < N, other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=(offs_m < M)[:, None], other=0.0)
        q = (_unpack(packed) | MAGIC).to(tl.float32, bitcast=True)
        z = (_unpack(zeros[None, :]) | MAGIC).to(tl.float32, bitcast=True)
        w = (q - z).to(x_ptr.dtype.element_ty)  # small integers: exact in fp16 and bf16
        acc += tl.dot(x, w) * scales.to(tl.float32)[None, :]
    out = out_ptr + pid_s * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc, mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Batch 1 to 16 on an NVIDIA GPU: tensor cores fed straight from the packed words (inline PTX)
# ----------------------------------------------------------------------------------------------------------------
#
# At batch 1 the FMA kernel above spends ~8 instructions per weight and is bound by them, not by bytes. This kernel
# spends ~2: it turns the packed nibbles into pairs of fp16/bf16 with a few integer instructions per pair and lets
# the tensor cores (mma.sync m16n8k16) do the multiply-add. Triton cannot express the register layout an mma wants,
# so the per-thread work is inline PTX (tl.inline_asm_elementwise over a tensor with one element per thread) and
# every thread works out its role from its own lane id; Triton keeps the loops, the split-K and the group logic.
#
# The product is y^T = W^T x^T: A (16 x 16) = 16 output columns by 16 rows of W, B (16 x 8) = the same 16 K-indices
# by 8 batch rows of x (rows past M read row m0 and are never stored), D = fp32 accumulators. In an m16n8k16 the
# lane with group g = lane // 4 and t = lane % 4 holds A[g][2t, 2t+1], A[g+8][2t, 2t+1], A[g][2t+8, 2t+9],
# A[g+8][2t+8, 2t+9] (two halves per register, the lower k first) and B[2t, 2t+1][g], B[2t+8, 2t+9][g]. Which
# real rows and columns those indices stand for is ours to choose, so:
#   * lane (g, t) of warp w reads two adjacent packed word columns, 16w + 2g and 16w + 2g + 1 of the program's, in
#     rows 4t .. 4t+3 of each 16 rows: mma k = 2t, 2t+1 are rows 4t, 4t+1 and k = 2t+8, 2t+9 rows 4t+2, 4t+3 (and x
#     is read to match). Two words per lane make a warp read 64 contiguous bytes of a row: with one word per lane
#     (32 bytes a row), even a pure read of the matrix stays under 75% of copy bandwidth on an H200 (every L2
#     request then carries one 32-byte sector: bench/03_probe_strip_read.py);
#   * a word's eight columns feed four mmas: mma i takes column 2i as A row g and column 2i+1 as A row g+8.
# A byte permute (prmt) puts the same nibble of two rows' words into the two halves of a register; ORing nibbles
# into the mantissa of 1024 (fp16 0x6400) or 128 (bf16 0x4300) makes 1024 + q exactly, and adding -(1024 + z)
# leaves q - z exactly (AWQ's nibble order pairs columns 2i, 2i+1 in nibbles i, i + 4: one 16-bit shift apart).
# For fp16 the high nibble of a byte is read as 1024 + 16 q and scaled by 1/16 in the same fma (fewer shifts).
# Multiplying by the scale rounds once, to exactly the reference's W; the mmas then add x * W up in fp32.
# Loads of the next 32-row step are issued before the current one is computed (one step of prefetch in registers).
#
# What this asks of Triton: Triton lays a [32 * WARPS] tensor out one element per thread, so each such tensor is one
# register of every thread and every thread runs each PTX block once. The PTX never uses the element index, only
# %tid.x, so any layout that has every thread run every block (as the mma needs: all 32 lanes together) would do.

_PTX_LANE = """
.reg .b32 %tid_, %lane_, %g_, %t_, %w_, %cp_;
mov.u32 %tid_, %tid.x;
and.b32 %lane_, %tid_, 31;
shr.u32 %g_, %lane_, 2;
and.b32 %t_, %lane_, 3;
shr.u32 %w_, %tid_, 5;
shl.b32 %cp_, %g_, 1;
mad.lo.u32 %cp_, %w_, 16, %cp_;
"""  # %cp_: the lane's first word column, counted from the program's first


def _ptx_lanes() -> str:
    """Per-thread byte offsets: $0 into qweight (row 4t, word column cp), $1 into x (row g, column 4t).

    Inputs: $2 N/8, $3 K, $4 word columns left from the program's first, $5 rows of x left. A lane past the last
    column or row reads the program's first word column or x row m0 instead (valid memory, branch-free); its
    results are never stored.
    """
    return "\n".join([
        "{", _PTX_LANE, ".reg .pred %p_;", ".reg .b32 %row_;", ".reg .b64 %c64_;",
        "shl.b32 %row_, %t_, 2;",
        "mul.wide.u32 $0, %row_, $2;", "cvt.u64.u32 %c64_, %cp_;", "add.u64 $0, $0, %c64_;", "shl.b64 $0, $0, 2;",
        "mul.wide.u32 $1, %g_, $3;", "cvt.u64.u32 %c64_, %row_;", "add.u64 $1, $1, %c64_;", "shl.b64 $1, $1, 1;",
        "setp.ge.u32 %p_, %cp_, $4;", "@%p_ mov.b64 $0, 0;",
        "setp.ge.u32 %p_, %g_, $5;", "@%p_ mov.b64 $1, 0;",
        "}",
    ])  # fmt: skip


@functools.cache
def _ptx_load(n8: int) -> str:
    """One 32-row step: $0-$15 words (sub-step s, row r, word e: $8s+2r+e), $16-$19 x pairs (sub-step s: $16+2s,
    $17+2s). Inputs: $20 qweight address of the step's first row at the program's first column, $21 the lane's
    offset, $22 x address of the step, $23 the lane's x offset. The row stride is baked in as immediate offsets
    (one PTX text per N), so the loads need no address arithmetic. `.L2::256B`: L2 fetches 256-byte blocks."""
    lines = ["{", ".reg .b64 %a_;", "add.u64 %a_, $20, $21;"]
    for s in range(2):
        for r in range(4):
            i = 8 * s + 2 * r
            lines.append(f"ld.global.nc.L2::256B.v2.b32 {{${i}, ${i + 1}}}, [%a_+{(16 * s + r) * n8 * 4}];")
    lines.append("add.u64 %a_, $22, $23;")
    lines += [f"ld.global.nc.v2.b32 {{${16 + 2 * s}, ${17 + 2 * s}}}, [%a_+{32 * s}];" for s in range(2)]
    lines.append("}")
    return "\n".join(lines)


def _ptx_group(bf16: bool) -> str:
    """A group's constants for the lane's two word columns e = 0, 1: $8e+j = what column j's q - z step adds (both
    halves): -(1024 + z) for fp16 low nibbles, -(64 + z) for fp16 high nibbles, -(128 + z) for bf16; $16+4e+i the
    raw scale registers (columns 2i, 2i+1 in register i). Inputs: $24 qzeros and $25 scales addresses of the group row
    at the program's first column, $26 word columns left."""
    lines = [
        "{", _PTX_LANE, ".reg .pred %p_;", ".reg .b32 %z0_, %z1_, %zl_, %zh_, %zt_, %c16_;", ".reg .b64 %a_;",
        "setp.lt.u32 %p_, %cp_, $26;", "mov.b32 %z0_, 0;", "mov.b32 %z1_, 0;",
        "mad.wide.u32 %a_, %cp_, 4, $24;", "@%p_ ld.global.nc.v2.b32 {%z0_, %z1_}, [%a_];",
        "mad.wide.u32 %a_, %cp_, 16, $25;",
        *[f"mov.b32 ${16 + i}, 0;" for i in range(8)],
        "@%p_ ld.global.nc.v4.b32 {$16, $17, $18, $19}, [%a_];",
        "@%p_ ld.global.nc.v4.b32 {$20, $21, $22, $23}, [%a_+16];",
        "mov.b32 %c16_, 0x2C002C00;",
    ]  # fmt: skip
    for e in range(2):
        # bytes 0-1 hold nibbles 0-3 (columns 0, 2, 4, 6), bytes 2-3 nibbles 4-7 (columns 1, 3, 5, 7); copied into
        # both halves, one lop3 makes a pair of equal halves
        lines += [f"prmt.b32 %zl_, %z{e}_, %z{e}_, 0x5410;", f"prmt.b32 %zh_, %z{e}_, %z{e}_, 0x7632;"]
        for j in range(8):
            src, out = ("%zl_" if j % 2 == 0 else "%zh_"), f"${8 * e + j}"
            if bf16:  # -(128 + z): the nibble ORed into the mantissa of bf16 -128 (0xC300)
                lines += [
                    f"shr.u32 %zt_, {src}, {4 * (j // 2)};",
                    f"lop3.b32 {out}, %zt_, 0x000f000f, 0xC300C300, 0xEA;",
                ]
            else:  # fp16: -(1024 + z) for a low nibble; for a high one -(1024 + 16 z) / 16 = -(64 + z)
                high = (j // 2) % 2
                lines.append(f"shr.u32 %zt_, {src}, {8 * (j // 4)};")
                lines.append(f"lop3.b32 {out}, %zt_, {'0x00f000f0' if high else '0x000f000f'}, 0xE400E400, 0xEA;")
                if high:
                    lines.append(f"mul.rn.f16x2 {out}, {out}, %c16_;")
    lines.append("}")
    return "\n".join(lines)


def _ptx_step(bf16: bool) -> str:
    """16 rows: operands $0-$31 accumulators out; $32-$39 the lane's words (row r, word e: $32+2r+e), $40-$41 its x
    pairs, $42-$65 the group constants (as _ptx_group makes them), $66-$97 accumulators in. Accumulator 16e + 4i + r
    is mma i of word e: column 2i (r < 2) or 2i + 1, row 2t + r % 2 of x. lop3 0xEA is (a & b) | c. For bf16, sm_80
    has fma but no add or mul on bf16x2: adding is fma with 1.0 (0x3F80), multiplying fma with -0.0 (0x8000, the
    additive identity that keeps a +0 product +0); each rounds once."""
    ty = "bf16" if bf16 else "f16"
    lines = ["{", ".reg .b32 %p0_, %p1_, %q0_, %q1_, %s_, %h_, %k_, %sc_, %nz_;", ".reg .b16 %slo_, %shi_;",
             ".reg .b32 %a<16>;", "mov.b32 %k_, 0x3F803F80;" if bf16 else "mov.b32 %k_, 0x2C002C00;",
             "mov.b32 %nz_, 0x80008000;"]  # fmt: skip
    for e in range(2):
        w = [f"${32 + 2 * r + e}" for r in range(4)]
        lines += [  # p: bytes 0-1 of two rows' words (columns 0, 2, 4, 6), q: bytes 2-3 (columns 1, 3, 5, 7)
            f"prmt.b32 %p0_, {w[0]}, {w[1]}, 0x5410;", f"prmt.b32 %q0_, {w[0]}, {w[1]}, 0x7632;",
            f"prmt.b32 %p1_, {w[2]}, {w[3]}, 0x5410;", f"prmt.b32 %q1_, {w[2]}, {w[3]}, 0x7632;",
        ]  # fmt: skip
        for j in range(8):  # column j of word e: the scale in both halves, then rows pair p: %a<2j+p> = (q - z) * s
            lines += [f"mov.b32 {{%slo_, %shi_}}, ${58 + 4 * e + j // 2};"]
            lines.append("mov.b32 %sc_, {%slo_, %slo_};" if j % 2 == 0 else "mov.b32 %sc_, {%shi_, %shi_};")
            for p in range(2):
                src = f"%{'p' if j % 2 == 0 else 'q'}{p}_"
                out, zero = f"%a{2 * j + p}", f"${42 + 8 * e + j}"
                if bf16:
                    lines += [
                        f"shr.u32 %s_, {src}, {4 * (j // 2)};",
                        "lop3.b32 %h_, %s_, 0x000f000f, 0x43004300, 0xEA;",
                    ]
                    lines += [f"fma.rn.bf16x2 %h_, %h_, %k_, {zero};", f"fma.rn.bf16x2 {out}, %h_, %sc_, %nz_;"]
                else:
                    high = (j // 2) % 2
                    if j >= 4:
                        lines.append(f"shr.u32 %s_, {src}, 8;")
                        src = "%s_"
                    lines.append(f"lop3.b32 %h_, {src}, {'0x00f000f0' if high else '0x000f000f'}, 0x64006400, 0xEA;")
                    lines.append(f"fma.rn.f16x2 %h_, %h_, %k_, {zero};" if high else f"add.rn.f16x2 %h_, %h_, {zero};")
                    lines.append(f"mul.rn.f16x2 {out}, %h_, %sc_;")
        for i in range(4):
            a = f"%a{4 * i}, %a{4 * i + 2}, %a{4 * i + 1}, %a{4 * i + 3}"
            d = ", ".join(f"${16 * e + 4 * i + r}" for r in range(4))
            c = ", ".join(f"${66 + 16 * e + 4 * i + r}" for r in range(4))
            mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32"
            lines.append(f"{mma} {{{d}}}, {{{a}}}, {{$40, $41}}, {{{c}}};")
    lines.append("}")
    return "\n".join(lines)


def _ptx_store() -> str:
    """Writes the lane's sums: D rows g, g+8 are columns of its words, D columns 2t, 2t+1 rows of x. $0 dummy output;
    $1-$32 accumulators, $33 address of row m0 at the program's first column, $34 N, $35 rows of x left, $36 word
    columns left. Ends with a fence: the sums are visible GPU-wide before the program reports that it is done."""
    lines = ["{", _PTX_LANE, ".reg .pred %pc_, %pr_;", ".reg .b32 %row_, %c8_;", ".reg .b64 %a_, %off_, %c64_;",
             "mov.b32 $0, 0;", "setp.lt.u32 %pc_, %cp_, $36;", "shl.b32 %row_, %t_, 1;",
             "mul.wide.u32 %off_, %row_, $34;", "shl.b32 %c8_, %cp_, 3;", "cvt.u64.u32 %c64_, %c8_;",
             "add.u64 %off_, %off_, %c64_;", "shl.b64 %off_, %off_, 2;", "add.u64 %a_, $33, %off_;"]  # fmt: skip
    for parity in range(2):  # x row 2t takes D columns 2t (even registers), row 2t + 1 the odd ones
        if parity:
            lines += ["add.u32 %row_, %row_, 1;", "mul.wide.u32 %off_, $34, 4;", "add.u64 %a_, %a_, %off_;"]
        lines += ["setp.lt.u32 %pr_, %row_, $35;", "and.pred %pr_, %pr_, %pc_;"]
        vals = [f"${1 + 16 * e + 4 * i + 2 * h + parity}" for e in range(2) for i in range(4) for h in range(2)]
        for v in range(4):  # 16 contiguous columns: the lane's two words
            lines.append(f"@%pr_ st.global.v4.f32 [%a_+{16 * v}], {{{', '.join(vals[4 * v : 4 * v + 4])}}};")
    lines += ["fence.acq_rel.gpu;", "}"]
    return "\n".join(lines)


_MMA_LANES = tl.constexpr(_ptx_lanes())
_MMA_GROUP_F16 = tl.constexpr(_ptx_group(bf16=False))
_MMA_GROUP_BF16 = tl.constexpr(_ptx_group(bf16=True))
_MMA_STEP_F16 = tl.constexpr(_ptx_step(bf16=False))
_MMA_STEP_BF16 = tl.constexpr(_ptx_step(bf16=True))
_MMA_STORE = tl.constexpr(_ptx_store())
_R = tl.constexpr  # constraint strings: "=r" out, "r" 32-bit in, "l" 64-bit in
_C_LANES = _R("=l,=l,r,r,r,r,r")
_C_LOAD = _R(",".join(["=r"] * 20 + ["l"] * 4))
_C_GROUP = _R(",".join(["=r"] * 24 + ["l", "l", "r", "r"]))
_C_STEP = _R(",".join(["=r"] * 32 + ["r"] * 66))
_C_STORE = _R(",".join(["=r"] + ["r"] * 32 + ["l", "r", "r", "r"]))


@triton.jit
def _mma_load(LOAD: tl.constexpr, qweight, qweight_lane, x, x_lane):
    args = (qweight.to(tl.int64), qweight_lane, x.to(tl.int64), x_lane)
    return tl.inline_asm_elementwise(LOAD, _C_LOAD, args, dtype=(tl.int32,) * 20, is_pure=True, pack=1)


@triton.jit
def _mma_group(lanes, qzeros, scales, columns_left, IS_BF16: tl.constexpr):
    asm: tl.constexpr = _MMA_GROUP_BF16 if IS_BF16 else _MMA_GROUP_F16
    args = (qzeros.to(tl.int64), scales.to(tl.int64), columns_left, lanes)
    return tl.inline_asm_elementwise(asm, _C_GROUP, args, dtype=(tl.int32,) * 24, is_pure=True, pack=1)


@triton.jit
def _mma_substep(step, consts, acc, SUB: tl.constexpr, IS_BF16: tl.constexpr):
    """Rows 16 SUB .. 16 SUB + 15 of a step (its words 8 SUB .. 8 SUB + 7 and x pair SUB) into the accumulators."""
    asm: tl.constexpr = _MMA_STEP_BF16 if IS_BF16 else _MMA_STEP_F16
    words = (step[8 * SUB], step[8 * SUB + 1], step[8 * SUB + 2], step[8 * SUB + 3])
    words = words + (step[8 * SUB + 4], step[8 * SUB + 5], step[8 * SUB + 6], step[8 * SUB + 7])
    mine = words + (step[16 + 2 * SUB], step[17 + 2 * SUB])
    return tl.inline_asm_elementwise(asm, _C_STEP, mine + consts + acc, dtype=(tl.float32,) * 32, is_pure=True, pack=1)


@triton.jit
def _gemv_mma_kernel(
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, partial_ptr, M, K, N8, G, K_SPLIT, out_ptr, done_ptr,
    LOAD: tl.constexpr, IS_BF16: tl.constexpr, WARPS: tl.constexpr,
):  # fmt: skip
    """Program (c, s, m): word columns c*16*WARPS.., rows s*K_SPLIT.. (whole 32-row steps), rows m*8.. of x.

    Each program writes its fp32 partial sums to partial[s]; the last program of a column block to finish (counted
    in done_ptr, which it resets) adds the partials up in the order s = 0, 1, .. (deterministic) and writes y. The
    inline-PTX tensors have one element per thread: each carries one register of every thread, and the PTX works
    out the thread's role from its lane id.
    """
    STEP: tl.constexpr = 32
    BLOCK_N: tl.constexpr = 128 * WARPS  # output columns
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    N = N8 * 8
    c0 = pid_c * 16 * WARPS
    m0 = pid_m * 8
    k_start = pid_s * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    lanes = tl.arange(0, 32 * WARPS)
    zero = tl.zeros([32 * WARPS], dtype=tl.float32)
    lane_args = (N8, K, N8 - c0, M - m0, lanes)
    qweight_lane, x_lane = tl.inline_asm_elementwise(_MMA_LANES, _C_LANES, lane_args, dtype=(tl.int64, tl.int64),
                                                     is_pure=True, pack=1)  # fmt: skip
    qweight = qweight_ptr + c0
    x = x_ptr + m0 * K
    acc = (zero,) * 32
    step = _mma_load(LOAD, qweight + k_start * N8, qweight_lane, x + k_start, x_lane)
    for group in range(k_start // G, tl.cdiv(k_end, G)):
        consts = _mma_group(lanes, qzeros_ptr + group * N8 + c0, scales_ptr + group * N + c0 * 8, N8 - c0, IS_BF16)
        for k in range(tl.maximum(group * G, k_start), tl.minimum(group * G + G, k_end), STEP):
            # Prefetch the next step while this one computes; the last step reloads itself (L2 hits, no branch).
            k_next = tl.minimum(k + STEP, k_end - STEP)
            next_step = _mma_load(LOAD, qweight + k_next * N8, qweight_lane, x + k_next, x_lane)
            for sub in tl.static_range(2):
                acc = _mma_substep(step, consts, acc, sub, IS_BF16)
            step = next_step
    partial = (partial_ptr + (pid_s * M + m0) * N + c0 * 8).to(tl.int64)
    tl.inline_asm_elementwise(_MMA_STORE, _C_STORE, acc + (partial, N, M - m0, N8 - c0), dtype=tl.int32,
                              is_pure=False, pack=1)  # fmt: skip
    # Split-K without a second kernel: every thread's sums are stored and fenced; count this program in.
    tl.debug_barrier()
    done = done_ptr + pid_m * tl.num_programs(0) + pid_c
    split = tl.num_programs(1)
    if tl.atomic_add(done, 1, sem="acq_rel") == split - 1:
        cols = c0 * 8 + tl.arange(0, BLOCK_N)
        for row in range(m0, tl.minimum(m0 + 8, M)):  # one row at a time: few registers
            total = tl.zeros([BLOCK_N], dtype=tl.float32)
            for s in range(split):  # .cg: read through L2, where the other programs' sums are
                total += tl.load(partial_ptr + (s * M + row) * N + cols, mask=cols < N, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + row * N + cols, total.to(out_ptr.dtype.element_ty), mask=cols < N)
        tl.atomic_xchg(done, 0)  # ready for the next call


@triton.jit
def _sum_splits_kernel(partial_ptr, out_ptr, SPLIT_K, MN, BLOCK: tl.constexpr):
    """out[i] = sum over s of partial[s, i], in order s = 0, 1, ..: the result does not depend on timing."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT_K):
        total += tl.load(partial_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, total, mask=mask)


def _gemv_config(M: int, K: int, N: int, G: int, num_sms: int = 132, kernels=("mma", "dot", "fma"), **fixed) -> dict:
    """Launch configuration of awq_gemv; `fixed` overrides any key (see GEMV_CONFIG), the others adapt to it.

    kernel: "mma" (tensor cores fed straight from the packed words; CUDA only, G a multiple of 32), "dot" (tl.dot on
    dequantized tiles; M > 1) or "fma" (CUDA-core FMAs). `kernels` lists those that can run here, best first.
    BLOCK_M: rows of x per program. BLOCK_N: output columns per program. BLOCK_K: K rows per pipelined step (a
    power of two dividing G). SPLIT_K: programs along K, each given a whole number of steps (effective value).
    num_warps, num_stages: per program; num_stages is the depth of the software pipeline over K.
    "mma" fixes BLOCK_M = 8, BLOCK_K = 32 and BLOCK_N = 128 * num_warps (a warp takes 128 columns).
    """
    known = ("kernel", "BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages")
    fixed = _known("gemv_config", dict.fromkeys(known), fixed)
    usable = [k for k in kernels if k != "dot" or (M > 1 and _pow2_divisor(G) >= 16)]  # awq_gemv takes M <= 16
    kernel = fixed.get("kernel", usable[0] if usable else "fma")
    if kernel not in kernels:
        raise ValueError(f"gemv_config: kernel {kernel!r} cannot run here; available: {list(kernels)}")
    if kernel == "mma":
        cfg = {"BLOCK_M": 8, "BLOCK_K": 32, "num_warps": fixed.get("num_warps", 4), "num_stages": 1}
        cfg["BLOCK_N"] = 128 * cfg["num_warps"]
        clash = {k: v for k, v in fixed.items() if k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") and v != cfg[k]}
        if clash:
            raise ValueError(
                f"gemv_config: the mma kernel takes BLOCK_M = 8, BLOCK_K = 32, BLOCK_N = 128 * num_warps: {clash}"
            )
        _check_pow2("gemv_config", cfg, ("num_warps",), minimum={})
    elif kernel == "dot":
        cfg = {"BLOCK_M": min(64, max(16, triton.next_power_of_2(M))), "BLOCK_N": 128, "BLOCK_K": 64}
    else:
        # One x row per program; 256 columns and 64 rows per step were best on an H200 across shapes.
        cfg = {"BLOCK_M": 1, "BLOCK_N": 256, "BLOCK_K": 64}
    if kernel != "mma":
        cfg.update(num_warps=4, num_stages=3)
        cfg.update({key: value for key, value in fixed.items() if key not in ("kernel", "SPLIT_K")})
        if kernel == "fma":
            cfg["BLOCK_M"] = 1  # the FMA kernel takes one row of x per program
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], _pow2_divisor(G))
        _check_pow2("gemv_config", cfg, ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps"), minimum={"BLOCK_N": 8})
        if kernel == "dot" and min(cfg["BLOCK_K"], cfg["BLOCK_M"], cfg["BLOCK_N"]) < 16:
            raise ValueError(
                f"gemv_config: tl.dot needs BLOCK_M, BLOCK_N, BLOCK_K >= 16 (BLOCK_K divides G = {G}): {cfg}"
            )
    cfg["kernel"] = kernel
    steps = K // cfg["BLOCK_K"]
    programs = triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(M, cfg["BLOCK_M"])
    if "SPLIT_K" in fixed:
        split_k = max(1, min(int(fixed["SPLIT_K"]), steps))
    elif kernel == "mma":
        # About four programs per SM keep enough loads in flight; more splits cost more partial sums to add up.
        split_k = max(1, min(round(4 * num_sms / programs), steps // 4))
    else:
        want = max(1, round(8 * num_sms / programs))  # about eight programs per SM
        # A divisor of the step count gives every program the same amount of work; four steps at least each.
        divisors = [d for d in range(1, max(1, steps // 4) + 1) if steps % d == 0]
        split_k = min(divisors, key=lambda d: max(d / want, want / d))
    cfg["SPLIT_K"] = triton.cdiv(steps, triton.cdiv(steps, split_k))  # what whole steps per program give
    return {key: cfg[key] for key in known}


def _gemv_kernels(x: torch.Tensor, scales: torch.Tensor, G: int, qweight=None, qzeros=None) -> tuple:
    """The GEMV kernels that can run on these (contiguous) inputs, best first."""
    if not x.is_cuda:
        # The CPU interpreter runs no inline PTX, and its tl.dot gets bfloat16 wrong.
        return ("fma",) if x.dtype == torch.bfloat16 else ("dot", "fma")
    kernels = ("dot", "fma")
    words = [t for t in (qweight, qzeros) if t is not None]
    mma_ok = (
        torch.version.hip is None  # inline PTX: NVIDIA only
        and torch.cuda.get_device_capability(x.device)[0] >= 8  # mma.sync m16n8k16 on fp16 and bf16
        and G % 32 == 0  # a 32-row step lies in one group
        and scales.shape[1] % 16 == 0  # a lane reads two words (8 bytes) at once; rows keep that alignment
        and x.data_ptr() % 8 == 0  # 8-byte loads of x
        and scales.data_ptr() % 16 == 0  # 16-byte loads of scales
        and all(t.data_ptr() % 8 == 0 for t in words)  # 8-byte loads of qweight and qzeros (a view may start odd)
    )  # fmt: skip
    return ("mma",) + kernels if mma_ok else kernels


def awq_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor) -> torch.Tensor:
    """y = x @ dequantize(qweight, scales, qzeros): x [M, K] (1 <= M <= 16) in scales.dtype -> y [M, N] in x.dtype."""
    K, N, G = _check_weights("awq_gemv", qweight, scales, qzeros)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"awq_gemv: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != scales.dtype:
        raise TypeError(f"awq_gemv: x must have the scales' dtype {scales.dtype}, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"awq_gemv: x must be [M, K] with K = {K} (qweight rows), got shape {tuple(x.shape)}")
    if not 1 <= x.shape[0] <= 16:
        raise ValueError(f"awq_gemv: x must have 1 to 16 rows (a decode batch), got M = {x.shape[0]}")
    if x.device != qweight.device:
        raise ValueError(f"awq_gemv: x is on device {x.device} but the weights are on device {qweight.device}")
    M = x.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    x, qweight, scales, qzeros = x.contiguous(), qweight.contiguous(), scales.contiguous(), qzeros.contiguous()
    # The CPU interpreter runs programs one after the other, so few big ones are fastest there.
    num_sms = _num_sms(x.device) if x.is_cuda else 1
    cfg = _gemv_config(M, K, N, G, num_sms, _gemv_kernels(x, scales, G, qweight, qzeros), **(GEMV_CONFIG or {}))
    kernel, block_m, block_n, block_k, split_k = (
        cfg[k] for k in ("kernel", "BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K")
    )
    k_split = triton.cdiv(K // block_k, split_k) * block_k  # K rows per program, a whole number of steps
    to_sum = split_k > 1 or kernel == "mma"  # the mma kernel always writes fp32 partial sums
    partial = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device) if to_sum else out
    args = (x, qweight, scales, qzeros, partial, M, K, N // 8, G, k_split)
    grid = (triton.cdiv(N, block_n), split_k, triton.cdiv(M, block_m))
    warps = cfg["num_warps"]
    if kernel == "mma":
        done = _done_counters(x.device, grid[0] * grid[2])
        bf16 = x.dtype == torch.bfloat16
        # ptxas takes 128 registers for fp16 when left alone; a 120 cap (no spills) was 6% faster on an H200, 96 much
        # slower (the loads of the next step then wait until the current one is done).
        launch = {"num_warps": warps, "maxnreg": 120}
        _gemv_mma_kernel[grid](*args, out, done, LOAD=_ptx_load(N // 8), IS_BF16=bf16, WARPS=warps, **launch)
    elif kernel == "dot":
        _gemv_dot_kernel[grid](
            *args, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, NUM_STAGES=cfg["num_stages"], num_warps=warps
        )
    else:
        _gemv_fma_kernel[grid](
            *args, BLOCK_K=block_k, BLOCK_C=block_n // 8, NUM_STAGES=cfg["num_stages"], num_warps=warps
        )
    if to_sum and kernel != "mma":  # the mma kernel adds its partial sums up itself
        block = 1024
        _sum_splits_kernel[(triton.cdiv(M * N, block),)](partial, out, split_k, M * N, BLOCK=block, num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


_DONE: dict = {}  # (device, stream) -> int32 counters of _gemv_mma_kernel, all zero between calls


def _done_counters(device: torch.device, n: int) -> torch.Tensor:
    """n zeroed int32 counters for the current stream of `device`.

    The last program of each column block of _gemv_mma_kernel sets its counter back to zero, and calls on one stream
    run one after the other, so a call always finds its counters at zero. Calls on other streams get their own. (If
    a launch dies half-way, the counters are left dirty: that device's CUDA context is unusable then anyway.)
    """
    key = (device, torch.cuda.current_stream(device).cuda_stream)
    counters = _DONE.get(key)
    if counters is None or counters.numel() < n:
        counters = _DONE[key] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return counters


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pow2_divisor(n: int) -> int:
    """The largest power of two dividing n: a tile of that many rows never straddles two groups."""
    return n & -n


def _known(fn: str, known: dict, fixed: dict) -> dict:
    unknown = set(fixed) - set(known)
    if unknown:
        raise ValueError(f"{fn}: unknown config keys {sorted(unknown)}; known: {sorted(known)}")
    return fixed


def _check_pow2(fn: str, cfg: dict, keys: tuple, minimum: dict) -> None:
    for key in keys:
        value = cfg[key]
        if not isinstance(value, int) or value < minimum.get(key, 1) or value & (value - 1):
            raise ValueError(f"{fn}: {key} must be a power of two >= {minimum.get(key, 1)}, got {value!r}")


def _check_weights(fn: str, qweight, scales, qzeros) -> tuple[int, int, int]:
    """Validate the AWQ tensors before any work; return K, N and the group size G."""
    for name, t in (("qweight", qweight), ("scales", scales), ("qzeros", qzeros)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{fn}: {name} must be 2-D, got shape {tuple(t.shape)}")
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32:
            raise TypeError(f"{fn}: {name} must be int32 (eight packed 4-bit values per element), got {t.dtype}")
    if scales.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"{fn}: scales must be float16 or bfloat16, got {scales.dtype}")
    if not (qweight.device == scales.device == qzeros.device):
        raise ValueError(
            f"{fn}: qweight, scales and qzeros must be on one device, got {qweight.device}, {scales.device}, "
            f"{qzeros.device}"
        )
    K, N8 = qweight.shape
    groups, N = scales.shape
    if K == 0 or N8 == 0:
        raise ValueError(f"{fn}: qweight must not be empty, got shape {tuple(qweight.shape)}")
    if N != 8 * N8:
        raise ValueError(
            f"{fn}: scales has {N} columns but qweight [K, N/8] = {tuple(qweight.shape)} packs {8 * N8} "
            "(N must be a multiple of 8)"
        )
    if groups == 0 or K % groups != 0:
        raise ValueError(
            f"{fn}: scales has {groups} rows (one per group), which must divide K = {K}: the group size G = K / rows "
            "must be a whole number"
        )
    if tuple(qzeros.shape) != (groups, N8):
        raise ValueError(
            f"{fn}: qzeros must be [K/G, N/8] = {(groups, N8)} to match scales and qweight, got {tuple(qzeros.shape)}"
        )
    return K, N, K // groups
