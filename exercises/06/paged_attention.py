"""Exercise 06: paged attention, the decode kernel that reads the KV cache through a block table.

Exercise 02 cut the KV cache into fixed-size blocks and gave every sequence a block table: its i-th block of
tokens lives in pool block `block_tables[b, i]`, wherever that is. This exercise is the other half of PagedAttention:
the attention kernel of one decode step, which reads each sequence's keys and values straight from those scattered
blocks. Decoding is memory-bound (one new query per sequence, a few FLOPs per cached byte), so the kernel's job is to
read every K and V byte once, at the speed of memory, and never to copy the pages into a contiguous buffer first.

The layout (the one of vLLM's FlashAttention backend, exercise 02's blocks):
    q             fp16 or bf16  [B, H, D]                     the new token's query, per sequence and head
    k_cache       same dtype    [num_blocks, block_size, KVH, D]
    v_cache       same dtype    [num_blocks, block_size, KVH, D]
    block_tables  int32         [B, max_blocks]               entries past a sequence's last block are unused
    context_lens  int32         [B]                           tokens 0 .. context_lens[b] - 1 of sequence b
Token t of sequence b sits at slot t % block_size of block block_tables[b, t // block_size]. Query head h reads KV
head h // (H / KVH) (grouped-query attention: H / KVH query heads share a KV head).

You build:
  1. `paged_attention_decode`: a Triton kernel where one program handles one (sequence, KV head): it loads the
     H / KVH query heads of the group, walks the context a tile of tokens at a time through the block table, and
     keeps a running max, a running sum and an fp32 accumulator (online softmax), so K and V are read once per group.
  2. Split-KV ("flash-decoding"): with few sequences and long contexts, B * KVH programs leave most of the GPU idle.
     Cut each context into `num_splits` pieces handled by separate programs, each writing a partial result (its
     accumulator, running max and running sum); a second, reduction kernel combines them. `choose_num_splits`
     decides when the wrapper does that.

Checking the input costs something on the hot path, and students copy the pattern, so know the price: reading the
lengths back to the host (`.tolist()`, `.item()`, `int(t.max())`) before launching the attention makes the host wait
for the GPU to drain, and then the GPU wait for the host's launches: 129 us on an H100, against a 54 us attention
(B = 1, 32768 tokens) or 348 us (B = 64 x 4096). A check that costs nearly nothing: compute on the device, queue the
copy of its verdict, launch the attention, and only then wait, for the verdict, not for the attention; decide the
grid from what the host already knows (the table's width). The attention must then be harmless on bad input it was
launched with: it never reads outside the pool, whatever the table holds.

Without a GPU your kernels run under the Triton interpreter (the grader turns it on), on small shapes; the tests
count what your kernels load there (each KV head's keys once per group; every split its share), and the pages must
be read by a Triton kernel, never in torch. Run `pytest exercises/06` to check your work.
"""

from __future__ import annotations

import os  # noqa: F401  (os.environ.get("TRITON_INTERPRET") == "1" under the interpreter)

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """tl.dot(a, b) with an fp32 result. Given: under the Triton interpreter (triton 3.9), tl.dot on bf16 operands
    returns garbage, so pass UPCAST=True there (interpreter on and bf16 inputs) to multiply in fp32 instead."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


def choose_num_splits(batch_size: int, num_kv_heads: int, max_context_len: int, num_sms: int) -> int:
    """How many pieces the wrapper cuts every context into when the caller leaves num_splits to it: an int >= 1.

    1 when batch_size * num_kv_heads programs already give each of the num_sms SMs several (2048 programs on 132
    SMs need no help), or when the context is too short to pay for a second kernel (64 tokens). Otherwise enough
    splits that every SM gets at least one program (batch 1, 8 KV heads, a 32768-token context on 132 SMs: at least
    17; batch 8 x 8 KV heads, 64 programs, wants splitting too), each split long enough (a few hundred tokens, never
    under 128) that its partial results cost little next to its reads. The wrapper passes the SM count of q's GPU;
    without CUDA it passes 132 (an H100's): torch.cuda.get_device_properties fails on a CPU.
    """
    # TODO: programs = batch_size * num_kv_heads. If that is a few per SM already, return 1; else aim at a few
    #  programs per SM, and cap the count so that no split is shorter than a few hundred tokens (at least 128).
    raise NotImplementedError("choose_num_splits: enough splits to give every SM programs, none too short")


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    max_context_len: int | None = None,
) -> torch.Tensor:
    """One decode step: out[b, h] = softmax(scale * q[b, h] . K_b^T) V_b over sequence b's context_lens[b] tokens.

    Shapes and dtypes as in the module docstring; block_size a power of two, D a power of two from 16 to 256; K_b
    and V_b are the keys and values of KV head h // (H / KVH), token t read from slot t % block_size of block
    block_tables[b, t // block_size]. Whatever sits in the slots past a context and in unused table entries is
    garbage (even NaN) that must never reach the result. The logits are scale * q . k with the scale given.
    Returns a new [B, H, D] tensor in q's dtype. Accumulates in fp32 with an online softmax that subtracts the
    running max, so that logits of +-200 neither overflow nor underflow. Inputs are never modified; q, the caches
    and the block table may be strided views (a slice of a fused qkv tensor, a permuted cache, a slice of a wider
    table).

    num_splits: None lets the wrapper choose with choose_num_splits; S >= 1 forces S splits per context (1: a single
    pass), each split in its own program over its own share of the context. Splits that hold no tokens (a short
    context cut into many) contribute nothing.
    max_context_len: the longest context (1 .. max_blocks * block_size), when the caller knows it on the host (a
    serving engine's scheduler does); each sequence still attends to its own context_lens[b] tokens. Given, the
    caller vouches for the lengths and block ids: the wrapper does not check them (the kernel still never reads
    outside the pool). Left out (the default call), the wrapper checks them itself, on the device, without making
    the attention wait (module docstring), and splits as if the longest context filled the table.
    The block table's entries past a sequence's last block are unused: they may hold anything (-1, ids past the
    pool) and are never read nor checked.

    TypeError for a non-tensor argument (a list for block_tables, say: "block_tables must be a torch.Tensor"), q
    not float16/bfloat16, caches of another dtype than q, or block_tables / context_lens not int32. ValueError for
    shapes that disagree (ranks, B, the head dim, v_cache against k_cache), H not a multiple of KVH, block_size or
    the head dim not a power of two (head dim from 16 to 256), a scale that is not a positive finite number ("scale
    must be ..."), num_splits < 1, max_context_len outside 1 .. max_blocks * block_size ("max_context_len ..."), or
    tensors on different devices ("device"); and, in the default call, a context under 1 token ("at least 1"), a
    context longer than its table covers ("longer than its block table covers"), or a block id in use (a negative
    one, or one in a partly used last block, included) outside the pool ("outside the pool's 0 .. num_blocks - 1").
    Inputs are unchanged after an error.
    """
    # TODO: validate everything the shapes tell (no device reads). Without max_context_len, check the lengths and
    #  the block ids in use on the device (a small kernel, one program per sequence), queue the copy of its verdict
    #  to the host (pinned memory, non_blocking=True, an event), launch the attention, then wait for the verdict
    #  and raise. Never .tolist() / .item() before the launch: that is the 129 us sync.
    # TODO: the kernel, grid (KVH, B, num_splits): load the group's H / KVH query rows as one [16, D] tile (pad with
    #  zeros: tl.dot wants at least 16 rows), then for each tile of TILE tokens of the split: look up each token's
    #  block id, load K [TILE, D] (mask tokens past the context, and ids outside 0 .. num_blocks - 1: the kernel
    #  may run before the verdict arrives), s = q @ K^T * scale, set masked logits to -inf,
    #  m_new = max(m, max(s)), alpha = exp(m - m_new), p = exp(s - m_new), l = l * alpha + sum(p),
    #  acc = acc * alpha + p @ V (mask V's load as well: p = 0 times NaN garbage is NaN), m = m_new.
    #  exp2 is one instruction: use it with logits multiplied by log2(e). Single pass: write acc / l in q's dtype.
    # TODO: split-KV: each split writes acc, m and l (fp32) to scratch buffers; a second kernel combines them,
    #  rescaling split s by exp(m_s - M) with M the largest m_s: out = sum_s w_s acc_s / sum_s w_s l_s.
    #  An empty split has m = -inf, l = 0, acc = 0 (weight 0): make sure it writes exactly that, and no NaN.
    raise NotImplementedError(
        "paged_attention_decode: one program per (KV head, sequence, split); online softmax over tiles of tokens "
        "looked up through the block table"
    )
