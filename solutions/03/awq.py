"""Exercise 03 reference solution: AWQ 4-bit weights, unpacked, dequantized and multiplied in Triton.

AWQ stores a [K, N] weight matrix as 4-bit integers q, eight to an int32, with one scale s and one 4-bit zero point z
per column and per group of G consecutive rows: w[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]. The eight nibbles
of a word are not in column order: nibble i (bits 4i..4i+3) holds column AWQ_ORDER[i] = [0, 2, 4, 6, 1, 3, 5, 7][i]
of the word's group of eight columns.

`awq_dequantize` expands the packed matrix to fp16/bf16, bit for bit what a plain torch reference computes. It reads
K*N/2 bytes and writes K*N*2, so it is a memory-bound kernel whose job is wide, coalesced loads and stores.

`awq_gemv` computes x @ W for the few rows of x of a decode step without ever writing W to memory: at batch 1 its cost
is reading the K*N/2 packed bytes once. What makes it fast:
  * split-K: programs also split the K rows and write fp32 partial sums, which a second small kernel adds up in a
    fixed order (deterministic, unlike atomics), so that a GEMV with few output columns still fills every SM;
  * no integer -> float conversions (a quarter-rate pipe): a nibble ORed into the mantissa of 2^23 is the float
    2^23 + q, and subtracting 2^23 + z gives q - z exactly;
  * small per-program accumulators (each step is reduced over its rows at once), so many programs share an SM, and
    a software-pipelined loop over K (`tl.range(num_stages=...)`): many loads in flight.
For more rows of x the same loop feeds tensor cores (`tl.dot`) with the exact small integers q - z.

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


@triton.jit
def _sum_splits_kernel(partial_ptr, out_ptr, SPLIT_K, MN, BLOCK: tl.constexpr):
    """out[i] = sum over s of partial[s, i], in order s = 0, 1, ..: the result does not depend on timing."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT_K):
        total += tl.load(partial_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, total, mask=mask)


def _gemv_config(M: int, K: int, N: int, G: int, num_sms: int = 132, dot_ok: bool = True, **fixed) -> dict:
    """Launch configuration of awq_gemv; `fixed` overrides any key (see GEMV_CONFIG), the others adapt to it.

    dot: the tensor-core kernel (default for M > 1) or the CUDA-core FMA kernel (M == 1).
    BLOCK_M: rows of x per program. BLOCK_N: output columns per program. BLOCK_K: K rows per pipelined step (a
    power of two dividing G). SPLIT_K: programs along K, each given a whole number of steps (effective value).
    num_warps, num_stages: per program; num_stages is the depth of the software pipeline over K.
    The default aims at about four programs per SM, each streaming a long slice of K.
    """
    known = ("dot", "BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages")
    fixed = _known("gemv_config", dict.fromkeys(known), fixed)
    dot = fixed.get("dot", dot_ok and M > 1 and _pow2_divisor(G) >= 16)
    if dot:
        cfg = {"BLOCK_M": min(64, max(16, triton.next_power_of_2(M))), "BLOCK_N": 128, "BLOCK_K": 64}
    else:
        # One x row per program; 256 columns and 64 rows per step were best on an H200 across shapes.
        cfg = {"BLOCK_M": 1, "BLOCK_N": 256, "BLOCK_K": 64}
    cfg.update(dot=dot, num_warps=4, num_stages=3)
    cfg.update({key: value for key, value in fixed.items() if key != "SPLIT_K"})
    if not dot:
        cfg["BLOCK_M"] = 1  # the FMA kernel takes one row of x per program
    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], _pow2_divisor(G))
    _check_pow2("gemv_config", cfg, ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps"), minimum={"BLOCK_N": 8})
    if dot and (cfg["BLOCK_K"] < 16 or cfg["BLOCK_M"] < 16 or cfg["BLOCK_N"] < 16):
        raise ValueError(f"gemv_config: tl.dot needs BLOCK_M, BLOCK_N, BLOCK_K >= 16 (BLOCK_K divides G = {G}): {cfg}")
    steps = K // cfg["BLOCK_K"]
    if "SPLIT_K" in fixed:
        split_k = max(1, min(int(fixed["SPLIT_K"]), steps))
    else:
        programs = triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(M, cfg["BLOCK_M"])
        want = max(1, round(8 * num_sms / programs))
        # A divisor of the step count gives every program the same amount of work; four steps at least each.
        divisors = [d for d in range(1, max(1, steps // 4) + 1) if steps % d == 0]
        split_k = min(divisors, key=lambda d: max(d / want, want / d))
    cfg["SPLIT_K"] = triton.cdiv(steps, triton.cdiv(steps, split_k))  # what whole steps per program give
    return {key: cfg[key] for key in known}


def awq_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor) -> torch.Tensor:
    """y = x @ dequantize(qweight, scales, qzeros): x [M, K] in scales.dtype -> y [M, N] in x.dtype."""
    K, N, G = _check_weights("awq_gemv", qweight, scales, qzeros)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"awq_gemv: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != scales.dtype:
        raise TypeError(f"awq_gemv: x must have the scales' dtype {scales.dtype}, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"awq_gemv: x must be [M, K] with K = {K} (qweight rows), got shape {tuple(x.shape)}")
    if x.device != qweight.device:
        raise ValueError(f"awq_gemv: x is on device {x.device} but the weights are on device {qweight.device}")
    M = x.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    # The CPU interpreter (tests) runs programs one after the other, so few big ones are fastest there; and its
    # tl.dot gets bfloat16 wrong.
    num_sms = _num_sms(x.device) if x.is_cuda else 1
    dot_ok = x.is_cuda or x.dtype != torch.bfloat16
    cfg = _gemv_config(M, K, N, G, num_sms, dot_ok, **(GEMV_CONFIG or {}))
    if cfg["dot"] and not dot_ok:
        raise ValueError("awq_gemv: the Triton CPU interpreter computes tl.dot on bfloat16 wrongly; use dot=False")
    block_m, block_n, block_k, split_k = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"]
    k_split = triton.cdiv(K // block_k, split_k) * block_k  # K rows per program, a whole number of steps
    partial = out if split_k == 1 else torch.empty((split_k, M, N), dtype=torch.float32, device=x.device)
    args = (x.contiguous(), qweight.contiguous(), scales.contiguous(), qzeros.contiguous(), partial, M, K, N // 8, G)
    grid = (triton.cdiv(N, block_n), split_k, triton.cdiv(M, block_m))
    launch = {"num_warps": cfg["num_warps"]}
    if cfg["dot"]:
        _gemv_dot_kernel[grid](
            *args, k_split, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, NUM_STAGES=cfg["num_stages"], **launch
        )
    else:
        _gemv_fma_kernel[grid](
            *args, k_split, BLOCK_K=block_k, BLOCK_C=block_n // 8, NUM_STAGES=cfg["num_stages"], **launch
        )
    if split_k > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(M * N, block),)](partial, out, split_k, M * N, BLOCK=block, num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


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
