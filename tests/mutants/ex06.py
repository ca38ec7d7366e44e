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
V_LOAD = "v = tl.load(v_head + block[:, None] * stride_vb + slot[:, None] * stride_vs, mask=present[:, None], other=0.0)"
LAUNCH = (
    "    _decode_kernel[(KVH, B, num_splits)](\n"
    "        q, k_cache, v_cache, block_tables, context_lens, target, m, l,\n"
    "        scale * LOG2E, num_splits, capacity, num_blocks,\n"
    "        *q.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0),\n"
    "        target.stride(0), target.stride(1), target.stride(2) if split else 0,\n"
    "        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=D, BLOCK_SIZE=block_size,\n"
)
# One launch per member of a head group: every query head's program reads its KV head's K and V again.
PER_HEAD_LAUNCH = (
    "    for member in range(group):\n"
    "        _decode_kernel[(KVH, B, num_splits)](\n"
    "        q.unflatten(1, (KVH, group))[:, :, member], k_cache, v_cache, block_tables, context_lens,\n"
    "        target.unflatten(1, (KVH, group))[:, :, member], m, l,\n"
    "        scale * LOG2E, num_splits, capacity, num_blocks,\n"
    "        *q.unflatten(1, (KVH, group))[:, :, member].stride(), *k_cache.stride(), *v_cache.stride(),\n"
    "        block_tables.stride(0), target.stride(0), target.stride(1) * group, target.stride(2) if split else 0,\n"
    "        GROUP=1, GROUP_PAD=16, HEAD_DIM=D, BLOCK_SIZE=block_size,\n"
)
# The pages gathered in torch and attended to per sequence: what a student writes who skips the kernel.
TORCH_ATTENTION = (
    "    if True:\n"
    "        outs = []\n"
    "        for b, n in enumerate(context_lens.tolist()):\n"
    "            ids = block_tables[b, : -(-n // block_size)].long()\n"
    "            k = k_cache[ids].flatten(0, 1)[:n].transpose(0, 1).repeat_interleave(H // KVH, 0).float()\n"
    "            v = v_cache[ids].flatten(0, 1)[:n].transpose(0, 1).repeat_interleave(H // KVH, 0).float()\n"
    "            probs = torch.softmax(scale * (q[b].float()[:, None] @ k.transpose(1, 2)), dim=-1)\n"
    "            outs.append((probs @ v)[:, 0])\n"
    "        return torch.stack(outs).to(q.dtype)\n"
)
OUT = "    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)\n"
ACC = "acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)"
COMBINE_TOP = 'top = tl.full([SPLIT_TILE], float("-inf"), dtype=tl.float32)'
BAD_IDS = "bad += ((ids < 0) | (ids >= num_blocks)).to(tl.int32)"
USED = "used = tl.minimum(tl.cdiv(tl.maximum(context, 0), BLOCK_SIZE), max_blocks)"
SCALE_CHECK = "not (0 < scale < math.inf)"
LOGITS_MINUS = ("-k", "large_logits and logits-200")
BAD = "rejects_bad_input and "

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
    Mutant("a context longer than its table accepted", F, " + 2 * (context > capacity).to(tl.int32))", ")",
           "longer than its table", ("-k", "rejects_bad_input and longer")),
    Mutant("H not a multiple of KVH accepted", F, "if num_blocks < 1 or KVH < 1 or H % KVH != 0:",
           "if num_blocks < 1 or KVH < 1:", "H not a multiple of KVH", ("-k", "rejects_bad_input and multiple")),
    Mutant("v_cache shape not checked", F, "    if v_cache.shape != k_cache.shape:", "    if v_cache.dim() != 4:",
           "v_cache shape differs", ("-k", "rejects_bad_input and v_cache")),
    # No Triton kernel: the pages gathered in torch (with no launch at all, or after the check's launch).
    Mutant("no Triton kernel: the pages gathered in torch, softmax per sequence", F,
           "    capacity = max_blocks * block_size\n", "    capacity = max_blocks * block_size\n" + TORCH_ATTENTION,
           "no Triton kernel ran", RAGGED),
    Mutant("the check in Triton, the attention in torch", F, OUT, TORCH_ATTENTION + OUT, "torch read k_cache", RAGGED),
    # Structure: K and V once per group, every split its share.
    Mutant("one launch per query head: K and V read once per query head", F, LAUNCH, PER_HEAD_LAUNCH,
           "read once for its whole group", ("-k", "read_once_per_group and 1")),
    Mutant("one tile over the whole context: every split after the first empty", F,
           "chunk = tl.cdiv(tl.cdiv(context, num_splits), TILE) * TILE", "chunk = tl.cdiv(context, TILE) * TILE",
           "every split must read its share", ("-k", "read_once_per_group and 4")),
    Mutant("num_splits ignored: always one pass", F, "    cfg = _config(D, q.dtype, **(CONFIG or {}))\n",
           "    num_splits = 1\n    cfg = _config(D, q.dtype, **(CONFIG or {}))\n", "every split must read its share",
           ("-k", "read_once_per_group and 4")),
    # Range.
    Mutant("accumulator rounded to fp16 at every tile", F, ACC, f"acc = ({ACC.split(' = ', 1)[1]}).to(tl.float16).to(tl.float32)",
           "in fp32", ("-k", "accumulates_in_fp32 and single")),
    Mutant("split partials stored in fp16", F, "tl.store(out_rows + split * stride_os, acc, mask=keep)",
           "tl.store(out_rows + split * stride_os, acc.to(tl.float16), mask=keep)", "in fp32",
           ("-k", "accumulates_in_fp32 and 4-splits")),
    Mutant("running sum in fp16", F, "l = l * alpha + tl.sum(p, axis=1)  # noqa: E741",
           "l = (l * alpha + tl.sum(p, axis=1)).to(tl.float16).to(tl.float32)  # noqa: E741", "65504", ("-k", "65504")),
    Mutant("bf16 routed through fp16 in P @ V", F, ACC,
           "acc = acc * alpha[:, None] + _dot(p.to(tl.float16), v.to(tl.float16), UPCAST)", "through fp16",
           ("-k", "range_of_bf16")),
    # Online softmax, with splits and the group's padded rows.
    Mutant("the combine's max starts at 0", F, COMBINE_TOP, "top = tl.zeros([SPLIT_TILE], dtype=tl.float32)",
           "starts at -inf too", ("-k", "large_logits and logits-200 and 3-splits")),
    Mutant("the combine pads missing splits with m = 0", F, 'mask=splits < num_splits, other=float("-inf")))',
           "mask=splits < num_splits, other=0.0))", "does not exist", ("-k", "large_logits and logits-200 and 3-splits")),
    Mutant("one max shared by the group's rows, padded rows included", F,
           "m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile holds at least one valid token",
           "m_new = tl.maximum(m, tl.max(tl.max(s, axis=1), axis=0))", "padded rows", LOGITS_MINUS),
    Mutant("masked logits set to a finite -100", F, 's = tl.where(valid[None, :], s, float("-inf"))',
           "s = tl.where(valid[None, :], s, -100.0)", "not a finite number", LOGITS_MINUS),
    Mutant("split-KV combine in base e", F, "weight = tl.exp2(m - m_max)", "weight = tl.exp(m - m_max)",
           "w_s = exp(m_s - M)", SPLIT),
    Mutant("split-KV combine: denominator not weighted", F, "denominator += l * weight", "denominator += l",
           "sum_s w_s l_s", SPLIT),
    # choose_num_splits.
    Mutant("no minimum split length", F, "max_context_len // MIN_SPLIT_TOKENS", "max_context_len",
           "no split under 128", ("-k", "few_hundred")),
    Mutant("splitting only at batch 1", F, "    if room < 2:\n        return 1", "    if batch_size > 1:\n        return 1",
           "a batch of 1 is not the only", ("-k", "not_only_a_single")),
    # Block-table edges.
    Mutant("a context that fills its table refused", F, "2 * (context > capacity)", "2 * (context >= capacity)",
           "a full table", ("-k", "fill_its_table")),
    Mutant("max_context_len equal to the table's capacity refused", F, "elif not 1 <= max_context_len <= capacity:",
           "elif not 1 <= max_context_len < capacity:", "max_context_len=48", ("-k", "fill_its_table")),
    Mutant("negative block ids accepted", F, BAD_IDS, "bad += (ids >= num_blocks).to(tl.int32)",
           "negative block id", ("-k", BAD + "negative")),
    Mutant("the partly used last block not checked", F, USED,
           "used = tl.minimum(tl.maximum(context, 0) // BLOCK_SIZE, max_blocks)", "partly used last block",
           ("-k", BAD + "partly")),
    Mutant("unused table entries checked too (-1 there refused)", F, "mask=columns < used, other=0)",
           "mask=columns < max_blocks, other=0)", "unused table entries", ("-k", "fill_its_table")),
    Mutant("block table ignored, in the NaN-garbage test", F, BLOCK_LOOKUP, "block = (tokens // BLOCK_SIZE).to(tl.int64)",
           "block table ignored", RAGGED),
    Mutant("the table's row stride assumed to be max_blocks", F, "block_tables.stride(0),\n        target.stride(0)",
           "max_blocks,\n        target.stride(0)", "strided views", ("-k", "strided")),
    # Bad input.
    Mutant("an infinite scale accepted", F, SCALE_CHECK, "not (0 < scale)", "scale infinite", ("-k", BAD + "infinite")),
    Mutant("a negative scale accepted", F, SCALE_CHECK, "not (scale != 0 and scale < math.inf)", "scale negative",
           ("-k", BAD + "negative")),
    Mutant("head dim 512 accepted", F, "D > 256", "D > 512", "head dim 512", ("-k", BAD + "512")),
    Mutant("only q checked for being a tensor", F, "    for name, t in named:\n", "    for name, t in named[:1]:\n",
           "block_tables a list", ("-k", BAD + "list")),
    Mutant("v_cache read with k_cache's strides", F, "*k_cache.stride(), *v_cache.stride()",
           "*k_cache.stride(), *k_cache.stride()", "strided views", ("-k", "strided")),
    Mutant("max_context_len taken as every sequence's length", F, "    context_lens = context_lens.contiguous()\n",
           "    context_lens = context_lens.contiguous() if max_context_len is None else torch.full_like(context_lens, "
           "max_context_len)\n", "max_context_len_is_only", ("-k", "max_context_len_is_only")),
    Mutant("q scaled in place", F, "        q, k_cache, v_cache, block_tables, context_lens, target, m, l,\n        scale * LOG2E,",
           "        q.mul_(scale), k_cache, v_cache, block_tables, context_lens, target, m, l,\n        LOG2E,",
           "modified its input q", RAGGED),
]
