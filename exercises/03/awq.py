"""Exercise 03: AWQ int4 weights, unpacked on the GPU.

Decoding one token reads every weight once and does about one multiply-add with it, so at batch 1 the speed of a
linear layer is the speed of reading its weights. Storing them in 4 bits instead of 16 reads a quarter of the bytes.
AWQ (activation-aware weight quantization) stores a [K, N] weight matrix (K in-features, N out-features, y = x @ W)
as 4-bit integers q with, per column and per group of G consecutive rows, a scale s and a 4-bit zero point z:

    w[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]

The layout is the real one of AutoAWQ's "GEMM" checkpoints, so your kernels could read a real model:
    qweight  int32 [K, N/8]     eight 4-bit q per word
    qzeros   int32 [K/G, N/8]   eight 4-bit z per word, packed the same way
    scales   fp16 or bf16 [K/G, N]
    G        the group size, inferred as K // scales.shape[0]: checkpoints use 32, 64, 128 or K (one group), but
             any G that divides K is valid (the tests use 36 and 48 too), so tiles must not assume a power of two
The eight nibbles of a word are NOT in column order. Nibble i (bits 4i .. 4i+3) holds column 8c + ORDER[i] of the
word's group of eight columns c, with ORDER = [0, 2, 4, 6, 1, 3, 5, 7]. Packed words use all 32 bits, so many are
negative as int32: an arithmetic right shift copies the sign bit in, so mask with & 0xF after shifting.

You build:
  1. `unpack_awq` / `pack_awq` in plain torch: the format, made concrete.
  2. `awq_dequantize`: a Triton kernel that expands the packed matrix to fp16/bf16. It is memory-bound: it reads
     K*N/2 bytes and writes K*N*2, so fast means wide, coalesced stores.
  3. `awq_gemv`: a fused Triton kernel for decode (x has M = 1 .. 16 rows) that computes x @ W while reading the
     packed weights once and never writing W to memory: a quarter of the bytes of an fp16 matmul.

bf16 has the exponent range of fp32 (1e-38 .. 3e38), fp16 does not (6e-8 .. 65504): compute in fp32 and round once,
to the output dtype; a bf16 value that goes through fp16 on the way is lost (the tests use bf16 scales of 1e-8 and
|x| of 1e5).

Without a GPU your kernels run under the Triton interpreter (the grader turns it on), on small shapes.
Run `pytest exercises/03` to check your work.
"""

from __future__ import annotations

import torch
import triton  # noqa: F401
import triton.language as tl  # noqa: F401

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column 8c + ORDER[i]


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C/8] packed words -> int32 [R, C] values in 0..15, in natural column order.

    Works on any device, in plain torch on whole tensors: no Python loop over rows or elements (the tests count the
    Python lines and torch operations it runs on 32 and on 32768 words: they must not grow).
    """
    # TODO: shift each word right by 0, 4, ..., 28 bits and mask with 0xF: that gives nibbles 0..7 of each word.
    #  Nibble i belongs to column ORDER[i] of the word's eight columns: put it there.
    raise NotImplementedError("unpack_awq: (packed >> 4i) & 0xF is nibble i, which holds column ORDER[i]")


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """Integer values in 0..15, [R, C] with C a multiple of 8 -> int32 [R, C/8] in AWQ's nibble order.

    The exact inverse of unpack_awq. ValueError if C is not a multiple of 8 or a value is outside 0..15.
    """
    # TODO: column ORDER[i] of each group of eight goes to bits 4i..4i+3. Nibble 7 reaches bit 31, the sign bit of
    #  an int32: build the words in int64 and wrap them into the int32 range.
    raise NotImplementedError("pack_awq: put column ORDER[i] of each group of eight into bits 4i .. 4i+3")


def awq_dequantize(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor) -> torch.Tensor:
    """W = (q - z) * s as a [K, N] tensor of scales.dtype, computed by a Triton kernel.

    qweight int32 [K, N/8], scales fp16/bf16 [K/G, N], qzeros int32 [K/G, N/8], all on one device; G = K // rows of
    scales must divide K, and may be any such divisor. Bit for bit what torch computes as
    `(q - z).to(scales.dtype) * s` (a product of a small integer and a scale is exact in fp32, so convert to fp32,
    multiply, and round once to the output dtype, to nearest even; never through fp16 for bf16). torch only
    allocates the output: the kernel computes W, for bf16 as for fp16 (under the interpreter a Triton fp32 -> bf16
    conversion truncates instead of rounding: that one-ulp difference is allowed there, and only there). K and N need
    not be multiples of your tile sizes (K = G = 36 is valid): mask the tails (rows past K included: a row past K
    reads no scale and stores nothing), and write nothing outside the output. Inputs may have any strides
    (transposed or sliced views): index them through their strides, or call .contiguous() first. Inputs are never
    modified.
    ValueError or TypeError, before any work, for wrong dtypes, shapes that disagree (a 1-d qweight included), a
    group count that does not divide K, or mixed devices; the message names the offending argument or the problem.
    """
    # TODO: validate; allocate the output; launch a 2-D grid of programs, each expanding a [BLOCK_K, BLOCK_N] tile.
    #  Inside the kernel: load the packed words (column n of the output is in word n // 8, in nibble
    #  [0, 4, 1, 5, 2, 6, 3, 7][n % 8]: the inverse of ORDER, since nibble i holds column ORDER[i]), shift and mask,
    #  subtract the zero of group k // G, multiply by the scale of that group.
    raise NotImplementedError("awq_dequantize: one Triton program per output tile; unpack, subtract z, times s")


def awq_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor) -> torch.Tensor:
    """x @ W for a decode step: x [M, K] (1 <= M <= 16, same dtype as scales) -> [M, N] in x.dtype.

    A fused Triton kernel: each program unpacks tiles of the packed weights in registers, multiplies them with x
    and accumulates in fp32 (the running sums too: only the final result is rounded to x.dtype). It never writes
    the dequantized W (nor the unpacked q) to memory: a call allocates its output and, if it splits K, fp32 partial
    sums; nothing of W's size. Any strides, any G that divides K, tails of K and N as for awq_dequantize.
    Same validation as awq_dequantize, plus x: ValueError or TypeError if x is not 2-d, has M outside 1 .. 16 or K
    columns that disagree with qweight, has another dtype than scales, or lives on another device.
    """
    # TODO: start from your dequantize kernel and multiply instead of storing. Then think about bytes in flight:
    #  at M = 1 there are only N / BLOCK_N programs; splitting K across programs (and adding up the partial sums)
    #  keeps every SM busy.
    raise NotImplementedError("awq_gemv: dequantize tiles in registers and accumulate x @ W in fp32")
