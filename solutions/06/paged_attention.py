"""Exercise 06 reference solution: one decode step of attention over a paged KV cache, in Triton.

The cache is a pool of fixed-size blocks, `k_cache` / `v_cache` [num_blocks, block_size, KVH, D]; sequence b's token
t lives in block `block_tables[b, t // block_size]`, slot `t % block_size` (exercise 02 hands those blocks out). A
decode step has one new query per sequence and head, q [B, H, D], and attends to the sequence's `context_lens[b]`
cached tokens. Each query head h reads KV head h // (H / KVH) (grouped-query attention).

One program owns one (KV head, sequence, split): it loads the H / KVH query heads that share the KV head once, as
the rows of a [16, D] tile (padded: tensor-core products want 16 rows), walks its tokens TILE at a time, looking up
each token's block in the table, and keeps a running max m, a running sum l and an fp32 accumulator (online softmax):
every K and V byte is read once for the whole group, and the tile products run on the tensor cores.

Split-KV ("flash-decoding"): when B * KVH programs cannot fill the GPU (few sequences, long contexts), each
sequence's context is cut into `num_splits` pieces handled by separate programs, each writing its unnormalized
accumulator with its m and l; a second kernel combines them, rescaling split s by 2^(m_s - M) with M the largest
m_s. `choose_num_splits` picks the count from the batch, the KV heads, the longest context and the SM count.

Scores are kept in base 2: s = (q . k) * scale * log2(e), so that exp2 (one instruction) replaces exp.

Checking the lengths and block ids without stalling the GPU: a host that reads them back (`.tolist()`, `.item()`)
before launching the attention waits for the GPU to drain, and then the GPU waits for the host to launch: 129 us on
an H100, against a 54 us attention at B = 1 x 32768. So the default call launches a small `_validate_kernel` first,
queues the copy of its verdict to pinned host memory, launches the attention behind it, and only then waits, for
the verdict, not for the attention; the split count comes from the table's width, which the host knows. The
attention kernel itself never reads outside the pool whatever the table holds (ids are masked to it), so a bad
table launched before the verdict arrives does no harm: its output is dropped and the error raised.
CONFIG overrides the kernel's tile for every call (benchmarks set it); keys as returned by `_config`.
"""

from __future__ import annotations

import functools
import math
import os
import threading

import torch
import triton
import triton.language as tl

# Overrides used by every call when not None, e.g. {"TILE": 64, "num_warps": 4, "num_stages": 3}; a partial dict is
# completed by the heuristic `_config`.
CONFIG: dict | None = None

LOG2E = 1.4426950408889634
MIN_SPLIT_TOKENS = 256  # a split shorter than this reads too little to pay for its partial results and the combine
PROGRAMS_PER_SM = 4  # the split count aims at up to this many programs per SM (see choose_num_splits)
CPU_NUM_SMS = 132  # what choose_num_splits assumes where there is no GPU (an H100 / H200)


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation; UPCAST multiplies in fp32 (the Triton interpreter's bf16 tl.dot is wrong)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _validate_kernel(
    tables_ptr, lens_ptr, status_ptr, stride_tb, max_blocks, num_blocks, capacity,
    BLOCK_SIZE: tl.constexpr, COLUMNS: tl.constexpr,
):  # fmt: skip
    """Program seq: status[seq] = (1 if its length < 1, 2 if past the table's capacity; block ids in use outside the
    pool). One int32 pair per sequence, read by the host after the attention has been launched."""
    seq = tl.program_id(0)
    context = tl.load(lens_ptr + seq)
    used = tl.minimum(tl.cdiv(tl.maximum(context, 0), BLOCK_SIZE), max_blocks)
    bad = tl.zeros([COLUMNS], dtype=tl.int32)
    for c0 in range(0, used, COLUMNS):
        columns = c0 + tl.arange(0, COLUMNS)
        ids = tl.load(tables_ptr + seq * stride_tb + columns, mask=columns < used, other=0)
        bad += ((ids < 0) | (ids >= num_blocks)).to(tl.int32)
    tl.store(status_ptr + 2 * seq, (context < 1).to(tl.int32) + 2 * (context > capacity).to(tl.int32))
    tl.store(status_ptr + 2 * seq + 1, tl.sum(bad, axis=0))


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, m_ptr, l_ptr,
    qk_scale, num_splits, capacity, num_blocks,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_tb,
    stride_ob, stride_oh, stride_os,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr, NUM_STAGES: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Program (kv_head, seq, split): attention of the GROUP query heads of kv_head over one split of seq's context.

    SPLIT: write the fp32 accumulator with its running max m and sum l to out[seq, head, split] / m / l (partials
    for _combine_kernel); else write the normalized output in out's dtype.
    """
    kv_head = tl.program_id(0)
    seq = tl.program_id(1)
    split = tl.program_id(2)
    # Never past the table nor the pool, whatever context_lens and the table say (checked by _validate_kernel).
    context = tl.minimum(tl.load(lens_ptr + seq), capacity)
    # Split s covers tokens [s * chunk, (s + 1) * chunk), chunk a whole number of tiles; a split past the end of a
    # short context is empty: its loop does not run and it reports m = -inf, l = 0, acc = 0 (weight 0 below).
    chunk = tl.cdiv(tl.cdiv(context, num_splits), TILE) * TILE
    start = split * chunk
    end = tl.minimum(start + chunk, context)

    rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + rows  # query head h uses KV head h // GROUP
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :] * stride_qd,
        mask=(rows < GROUP)[:, None], other=0.0,
    )  # fmt: skip

    m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l = tl.zeros([GROUP_PAD], dtype=tl.float32)  # noqa: E741
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    table = tables_ptr + seq * stride_tb
    k_head = k_ptr + kv_head * stride_kh + dims[None, :] * stride_kd
    v_head = v_ptr + kv_head * stride_vh + dims[None, :] * stride_vd
    for t0 in tl.range(start, end, TILE, num_stages=NUM_STAGES):
        tokens = t0 + tl.arange(0, TILE)
        valid = tokens < end
        # Each token looks up its own block: a tile may span several blocks, or part of one.
        block = tl.load(table + tokens // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)  # pools pass 2^31 elements
        slot = tokens % BLOCK_SIZE
        present = valid & (block >= 0) & (block < num_blocks)
        k = tl.load(k_head + block[:, None] * stride_kb + slot[:, None] * stride_ks, mask=present[:, None], other=0.0)
        s = _dot(q, tl.trans(k), UPCAST) * qk_scale  # [GROUP_PAD, TILE], base-2 logits
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile holds at least one valid token
        alpha = tl.exp2(m - m_new)  # rescales what was accumulated under the old max (0 on the first tile)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)  # noqa: E741
        # Slots past the context hold garbage (NaN, even): p = 0 there, but 0 * NaN is NaN, so mask V's load too.
        v = tl.load(v_head + block[:, None] * stride_vb + slot[:, None] * stride_vs, mask=present[:, None], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
        m = m_new

    out_rows = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :]
    keep = (rows < GROUP)[:, None]
    if SPLIT:
        tl.store(out_rows + split * stride_os, acc, mask=keep)
        stats = (seq * tl.num_programs(0) * GROUP + heads) * num_splits + split
        tl.store(m_ptr + stats, m, mask=rows < GROUP)
        tl.store(l_ptr + stats, l, mask=rows < GROUP)
    else:
        tl.store(out_rows, (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _combine_kernel(
    part_ptr, m_ptr, l_ptr, out_ptr, num_heads, num_splits, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, SPLIT_TILE: tl.constexpr,
):  # fmt: skip
    """Program (seq * H + head): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s, M = max_s m_s.

    Partials are [B, H, S, D] (acc) and [B, H, S] (m, l), fp32. Each split's acc and l were accumulated under its
    own running max m_s, so they are on different scales: 2^(m_s - M) brings them to one.
    """
    row = tl.program_id(0)  # = seq * num_heads + head
    seq = row // num_heads
    head = row % num_heads
    dims = tl.arange(0, HEAD_DIM)
    first = row * num_splits
    top = tl.full([SPLIT_TILE], float("-inf"), dtype=tl.float32)
    for s0 in range(0, num_splits, SPLIT_TILE):
        splits = s0 + tl.arange(0, SPLIT_TILE)
        top = tl.maximum(top, tl.load(m_ptr + first + splits, mask=splits < num_splits, other=float("-inf")))
    m_max = tl.max(top, axis=0)  # finite: split 0 holds the context's first token
    numerator = tl.zeros([HEAD_DIM], dtype=tl.float32)
    denominator = tl.zeros([SPLIT_TILE], dtype=tl.float32)
    for s0 in range(0, num_splits, SPLIT_TILE):
        splits = s0 + tl.arange(0, SPLIT_TILE)
        inside = splits < num_splits
        m = tl.load(m_ptr + first + splits, mask=inside, other=float("-inf"))
        l = tl.load(l_ptr + first + splits, mask=inside, other=0.0)  # noqa: E741
        acc = tl.load(part_ptr + (first + splits)[:, None] * HEAD_DIM + dims[None, :], mask=inside[:, None], other=0.0)
        weight = tl.exp2(m - m_max)  # 0 for an empty split (m = -inf)
        numerator += tl.sum(acc * weight[:, None], axis=0)
        denominator += l * weight
    out = numerator / tl.sum(denominator, axis=0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------------------------------------------
# The wrapper
# ----------------------------------------------------------------------------------------------------------------


def choose_num_splits(batch_size: int, num_kv_heads: int, max_context_len: int, num_sms: int) -> int:
    """How many pieces to cut each context into: enough programs for every SM, no split under MIN_SPLIT_TOKENS.

    The largest power of two that keeps batch_size * num_kv_heads * splits within PROGRAMS_PER_SM programs per SM.
    Measured on an H200 (H = 32, KVH = 8, D = 128): B = 8 x 16384 tokens reads at 94% of the copy bandwidth with 8
    splits (512 programs), 82% with 4, and 75% with 9 (576 programs: probably a third, mostly idle round);
    B = 1 x 32768 at 72% with 64 splits, 65% with 32 and 62% with 128. A power of two also cuts the usual
    power-of-two contexts into equal splits.
    """
    room = PROGRAMS_PER_SM * num_sms // (batch_size * num_kv_heads)
    if room < 2:
        return 1
    return max(1, min(1 << (room.bit_length() - 1), max_context_len // MIN_SPLIT_TOKENS))


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
    """softmax(scale * q . K^T) V over each sequence's paged context -> [B, H, D] in q.dtype (see the stub)."""
    B, H, D, KVH, block_size, max_blocks = _check_shapes(q, k_cache, v_cache, block_tables, context_lens, scale)
    capacity = max_blocks * block_size
    if max_context_len is None:
        longest = capacity  # what the host knows without reading the lengths back
    elif isinstance(max_context_len, bool) or not isinstance(max_context_len, int):
        raise TypeError(f"max_context_len must be an int or None, got {type(max_context_len).__name__}")
    elif not 1 <= max_context_len <= capacity:
        raise ValueError(
            f"max_context_len = {max_context_len} must lie in 1 .. {capacity}, the tokens a block table of "
            f"{max_blocks} blocks of {block_size} covers"
        )
    else:
        longest = max_context_len
    if num_splits is None:
        num_splits = choose_num_splits(B, KVH, longest, _num_sms(q.device))
    elif isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")

    cfg = _config(D, q.dtype, **(CONFIG or {}))
    group = H // KVH
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    context_lens = context_lens.contiguous()
    num_blocks = k_cache.shape[0]
    verdict = None if max_context_len is not None else _validate(block_tables, context_lens, block_size, num_blocks)
    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    split = num_splits > 1
    if split:
        partial = torch.empty((B, H, num_splits, D), dtype=torch.float32, device=q.device)
        m = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
        l = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)  # noqa: E741
        target = partial
    else:
        m = l = out  # unused  # noqa: E741
        target = out
    _decode_kernel[(KVH, B, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, target, m, l,
        scale * LOG2E, num_splits, capacity, num_blocks,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0),
        target.stride(0), target.stride(1), target.stride(2) if split else 0,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=D, BLOCK_SIZE=block_size,
        TILE=cfg["TILE"], NUM_STAGES=cfg["num_stages"], SPLIT=split,
        UPCAST=os.environ.get("TRITON_INTERPRET") == "1" and q.dtype == torch.bfloat16,
        num_warps=cfg["num_warps"],
    )  # fmt: skip
    if split:
        _combine_kernel[(B * H,)](
            partial, m, l, out, H, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=D, SPLIT_TILE=min(32, triton.next_power_of_2(num_splits)), num_warps=4,
        )  # fmt: skip
    if verdict is not None:
        _raise_for_verdict(*verdict, block_tables, context_lens, block_size, num_blocks)
    return out


def _config(head_dim: int, dtype: torch.dtype, **fixed) -> dict:
    """TILE tokens per step (a power of two, at least 16: the tensor cores' minimum), num_warps, num_stages.

    `fixed` overrides any key (see CONFIG).
    """
    cfg = {"TILE": 64 if head_dim <= 128 else 32, "num_warps": 4, "num_stages": 3}
    unknown = set(fixed) - set(cfg)
    if unknown:
        raise ValueError(f"CONFIG: unknown keys {sorted(unknown)}; known: {sorted(cfg)}")
    cfg.update(fixed)
    if cfg["TILE"] < 16 or cfg["TILE"] & (cfg["TILE"] - 1):
        raise ValueError(f"CONFIG: TILE must be a power of two of at least 16, got {cfg['TILE']}")
    return cfg


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return CPU_NUM_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _check_shapes(q, k_cache, v_cache, block_tables, context_lens, scale) -> tuple[int, ...]:
    """Everything that can be checked without reading device memory; returns B, H, D, KVH, block_size, max_blocks."""
    named = (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
             ("context_lens", context_lens))  # fmt: skip
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    devices = {t.device for _, t in named}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {', '.join(f'{n}: {t.device}' for n, t in named)}")
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, D] (one new token per sequence), got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [num_blocks, block_size, KVH, D], got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"q must be float16 or bfloat16, got {q.dtype}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"k_cache and v_cache must have q's dtype {q.dtype}, got {k_cache.dtype} and {v_cache.dtype}")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise TypeError(
            f"block_tables and context_lens must be int32, got {block_tables.dtype} and {context_lens.dtype}"
        )
    B, H, D = q.shape
    num_blocks, block_size, KVH, head_dim = k_cache.shape
    if head_dim != D:
        raise ValueError(f"the caches' head dim {head_dim} differs from q's {D}")
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"head dim must be a power of two from 16 to 256, got {D}")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block size must be a power of two, got {block_size}")
    if num_blocks < 1 or KVH < 1 or H % KVH != 0:
        raise ValueError(f"H = {H} query heads must be a multiple of KVH = {KVH} KV heads (grouped-query attention)")
    if block_tables.dim() != 2 or block_tables.shape[0] != B or block_tables.shape[1] < 1:
        raise ValueError(f"block_tables must be [B, max_blocks] with B = {B}, got shape {tuple(block_tables.shape)}")
    if context_lens.shape != (B,):
        raise ValueError(f"context_lens must be [B] = [{B}], got shape {tuple(context_lens.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0 < scale < math.inf):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return B, H, D, KVH, block_size, block_tables.shape[1]


def _validate(block_tables, context_lens, block_size: int, num_blocks: int):
    """Launch _validate_kernel; return its status [B, 2] and, on CUDA, an event recorded right after it.

    Nothing waits here: the caller queues the attention next, then `_raise_for_verdict` fetches the verdict.
    """
    B, max_blocks = block_tables.shape
    status = torch.empty((B, 2), dtype=torch.int32, device=block_tables.device)
    _validate_kernel[(B,)](
        block_tables, context_lens, status, block_tables.stride(0), max_blocks, num_blocks, max_blocks * block_size,
        BLOCK_SIZE=block_size, COLUMNS=min(1024, triton.next_power_of_2(max_blocks)), num_warps=4,
    )  # fmt: skip
    if status.device.type != "cuda":
        return status, None
    checked = torch.cuda.Event()
    checked.record()
    return status, checked


_VERDICTS = threading.local()  # per thread: a pinned host buffer per batch size, and a side stream per device


def _fetch_verdict(status: torch.Tensor, checked) -> torch.Tensor:
    """The status on the host, waiting for the check kernel only. The copy runs on a side stream that waits for
    the check's event, so the attention queued after the check on the caller's stream is neither waited for nor
    delayed: on the caller's stream the GPU goes from the check straight to the attention, while the host waits
    for a few microseconds of work. (A copy on the caller's stream would either wait for the attention, or, issued
    before it, leave the GPU idle while the host allocates and copies.)"""
    if not hasattr(_VERDICTS, "buffers"):
        _VERDICTS.buffers, _VERDICTS.streams = {}, {}
    device = status.device
    side = _VERDICTS.streams.get(device)
    if side is None:
        side = _VERDICTS.streams[device] = torch.cuda.Stream(device, priority=-1)
    verdict = _VERDICTS.buffers.get(status.shape)
    if verdict is None:
        verdict = _VERDICTS.buffers[status.shape] = torch.empty(status.shape, dtype=torch.int32, pin_memory=True)
    side.wait_event(checked)
    with torch.cuda.stream(side):
        verdict.copy_(status, non_blocking=True)
    side.synchronize()  # the copy, and the check it waited for; the status stays alive until then
    return verdict


def _raise_for_verdict(status, checked, block_tables, context_lens, block_size: int, num_blocks: int) -> None:
    """Fetch the verdict (not waiting for the attention); on bad input, read the values back to say what is wrong."""
    verdict = _fetch_verdict(status, checked) if checked is not None else status
    flags, bad_ids = verdict.sum(dim=0).tolist() if bool(verdict.any()) else (0, 0)
    if not flags and not bad_ids:
        return
    lengths = context_lens.tolist()
    capacity = block_tables.shape[1] * block_size
    if min(lengths) < 1:
        raise ValueError(f"every context length must be at least 1 (a decode step attends to its own token), got "
                         f"{min(lengths)}")  # fmt: skip
    if max(lengths) > capacity:
        raise ValueError(
            f"a context of {max(lengths)} tokens is longer than its block table covers: {block_tables.shape[1]} "
            f"blocks of {block_size} tokens = {capacity}"
        )
    raise ValueError(f"{bad_ids} block ids in use lie outside the pool's 0 .. {num_blocks - 1}")
