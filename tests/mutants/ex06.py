# ruff: noqa: E501  (mutants are data: one replacement per line reads best)
"""Exercise 06 mutants: the reference paged-attention kernels with one mistake each, as students make them.

Each mutant runs only the tests that should name it (`pytest_args`), and its run stops at the first failure that does.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mutation import Mutant  # noqa: E402

F = "paged_attention.py"
RAGGED = ("-k", "matches_dense and bs16-d128")  # one layout of the ragged, NaN-garbage test
TABLE = ("-k", "reads_each_token and 32")
SPLIT = ("-k", "split_kv and 3-torch.float16")
SCALE = "scale * LOG2E, num_splits, capacity,"
BLOCK_LOOKUP = "block = tl.load(table + tokens // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)"
V_LOAD = "v = tl.load(v_head + block[:, None] * stride_vb + slot[:, None] * stride_vs, mask=valid[:, None], other=0.0)"

MUTANTS = [
    # Masking the context's end.
    Mutant("attends to the padding of the last block", F, "end = tl.minimum(start + chunk, context)",
           "end = tl.minimum(start + chunk, tl.cdiv(context, BLOCK_SIZE) * BLOCK_SIZE)", "past context_len", RAGGED),
    Mutant("V loaded without a mask (scores masked: 0 x NaN)", F, V_LOAD,
           "v = tl.load(v_head + block[:, None] * stride_vb + slot[:, None] * stride_vs)", "past context_len", RAGGED),
    # Block and offset arithmetic.
    Mutant("block table ignored: logical block i read from pool block i", F, BLOCK_LOOKUP,
           "block = (tokens // BLOCK_SIZE).to(tl.int64)", "block table ignored", TABLE),
    Mutant("one block id per tile (a tile spans several blocks)", F, BLOCK_LOOKUP,
           "block = tl.load(table + t0 // BLOCK_SIZE + tokens * 0, mask=valid, other=0).to(tl.int64)",
           "block/offset arithmetic", TABLE),
    Mutant("block size 16 hard-coded", F, "slot = tokens % BLOCK_SIZE", "slot = tokens % 16", "block/offset arithmetic", TABLE),
    Mutant("caches assumed contiguous (strides computed, not read)", F, "*k_cache.stride(), *v_cache.stride()",
           "block_size * KVH * D, KVH * D, D, 1, block_size * KVH * D, KVH * D, D, 1", "strided views", ("-k", "strided")),
    # Grouped-query attention.
    Mutant("GQA: query head h reads KV head h % KVH", F, "heads = kv_head * GROUP + rows  # query head h uses KV head h // GROUP",
           "heads = rows * tl.num_programs(0) + kv_head", "h // (H / KVH)", ("-k", "gqa_heads")),
    # Online softmax.
    Mutant("softmax without subtracting the running max", F,
           "m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile holds at least one valid token",
           "m_new = tl.where(m == float('-inf'), 0.0, m)", "without subtracting the running max", ("-k", "large_logits")),
    Mutant("running max starts at 0 instead of -inf", F,
           'm = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)', "m = tl.zeros([GROUP_PAD], dtype=tl.float32)",
           "instead of -inf", ("-k", "large_logits")),
    Mutant("accumulator not rescaled when the running max rises", F,
           "acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)", "acc = acc + _dot(p.to(v.dtype), v, UPCAST)",
           "rescaled", ("-k", "running_max")),
    # The scale.
    Mutant("scale applied twice", F, SCALE, "scale * scale * LOG2E, num_splits, capacity,", "scale applied twice", RAGGED),
    Mutant("scale not applied", F, SCALE, "LOG2E, num_splits, capacity,", "scale not applied", RAGGED),
    Mutant("exp2 without log2(e)", F, SCALE, "scale, num_splits, capacity,", "without converting the logits to base 2", RAGGED),
    Mutant("1/sqrt(D) instead of the scale argument", F, SCALE, "D**-0.5 * LOG2E, num_splits, capacity,",
           "instead of the scale argument", ("-k", "scale_is_the_callers")),
    # Split-KV.
    Mutant("split-KV partials combined without rescaling", F, "weight = tl.exp2(m - m_max)  # 0 for an empty split (m = -inf)",
           "weight = tl.where(m > float('-inf'), 1.0, 0.0)", "combined without rescaling", SPLIT),
    Mutant("split-KV chunks of context // num_splits: the remainder dropped", F,
           "chunk = tl.cdiv(tl.cdiv(context, num_splits), TILE) * TILE", "chunk = context // num_splits",
           "exactly once", SPLIT),
    Mutant("an empty split returns without writing its partials", F,
           "    end = tl.minimum(start + chunk, context)\n",
           "    end = tl.minimum(start + chunk, context)\n    if end <= start:\n        return\n",
           "holds no tokens", ("-k", "split_kv and 8-torch.float16")),
    Mutant("the wrapper never splits", F,
           "    if room < 2:", "    if True:",
           "splits_long_contexts", ("-k", "splits_long_contexts")),
    # The wrapper: output, strides, validation.
    Mutant("output in float32", F, "out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)",
           "out = torch.empty((B, H, D), dtype=torch.float32, device=q.device)", "q's dtype", RAGGED),
    Mutant("q assumed contiguous", F, "*q.stride(), *k_cache.stride()", "H * D, D, 1, *k_cache.stride()",
           "strided views", ("-k", "strided")),
    Mutant("int64 block tables accepted", F, "if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:",
           "if context_lens.dtype != torch.int32:", "block_tables int64", ("-k", "rejects_bad_input and int64")),
    Mutant("a context longer than its table accepted", F, "    if longest > capacity:", "    if False:",
           "longer than its table", ("-k", "rejects_bad_input and longer")),
    Mutant("H not a multiple of KVH accepted", F, "if num_blocks < 1 or KVH < 1 or H % KVH != 0:",
           "if num_blocks < 1 or KVH < 1:", "H not a multiple of KVH", ("-k", "rejects_bad_input and multiple")),
    Mutant("v_cache shape not checked", F, "    if v_cache.shape != k_cache.shape:", "    if v_cache.dim() != 4:",
           "v_cache shape differs", ("-k", "rejects_bad_input and v_cache")),
]
