"""Exercise 06 specification: one decode step of attention over a paged KV cache (PagedAttention), in Triton.

Every result is checked against a reference written here from the definition: gather each sequence's blocks through
its block table, keep its first context_len tokens, and run plain softmax attention in float64 (float32 on a GPU).
The caches are laid out to catch what a kernel must never do: block ids are shuffled across the pool, block 0 is a
null block of garbage that unused table entries point at, the slots past each context hold garbage, and every fresh
output is poisoned with NaN. Correctness runs everywhere (the Triton interpreter on the CPU, small shapes); speed is
judged on a GPU, as a fraction of the copy bandwidth and as a speedup over gathering the pages and calling SDPA.
"""

import math
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from fixtures.checks import expect_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WIDE = torch.float64 if DEVICE == "cpu" else torch.float32  # the reference's precision
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture
def attention(impl):
    return impl("paged_attention")


# --- paged inputs, and an independent reference -----------------------------------------------------------------


@dataclass
class Paged:
    q: torch.Tensor  # [B, H, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    context_lens: torch.Tensor  # int32 [B]

    @property
    def args(self) -> tuple:
        return self.q, self.k_cache, self.v_cache, self.block_tables, self.context_lens

    @property
    def block_size(self) -> int:
        return self.k_cache.shape[1]

    def clone(self) -> "Paged":
        return Paged(*(t.clone() for t in self.args))

    def to(self, device) -> "Paged":
        return Paged(*(t.to(device) for t in self.args))


def paged_inputs(lengths, block_size=16, heads=8, kv_heads=2, head_dim=64, dtype=torch.float16, *, seed=0,
                 garbage="nan", spare_columns=1, device=DEVICE) -> Paged:  # fmt: skip
    """A block pool holding len(lengths) sequences, laid out the way a kernel can get wrong.

    Block 0 is a null block of garbage; unused block-table entries (at least `spare_columns` per row) point at it.
    Each sequence's blocks are drawn from a shuffled pool, no two logically consecutive blocks physically adjacent;
    the slots past each context in its last block, and every block no sequence owns, hold garbage too: NaN, or with
    `garbage="finite"` values far from the data (so that reading them changes the result without poisoning it).
    """
    generator = torch.Generator().manual_seed(seed)
    blocks_of = [math.ceil(n / block_size) for n in lengths]
    B, max_blocks = len(lengths), max(blocks_of) + spare_columns
    num_blocks = max(1 + sum(blocks_of) + 3, B * max_blocks + 1)  # room to imitate a kernel that ignores the table
    shape = (num_blocks, block_size, kv_heads, head_dim)
    if garbage == "nan":
        k_cache, v_cache = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
    else:
        k_cache = 3 + 2 * torch.randn(shape, generator=generator)
        v_cache = 40 + 10 * torch.randn(shape, generator=generator)
    while True:  # shuffle until no sequence is contiguous by luck
        ids = (1 + torch.randperm(num_blocks - 1, generator=generator))[: sum(blocks_of)].split(blocks_of)
        if all(not bool((row[1:] == row[:-1] + 1).any()) for row in ids):
            break
    tables = torch.zeros(B, max_blocks, dtype=torch.int32)
    for b, (n, row) in enumerate(zip(lengths, ids, strict=True)):
        tables[b, : len(row)] = row.int()
        k_flat, v_flat = k_cache[row].flatten(0, 1), v_cache[row].flatten(0, 1)  # copies
        k_flat[:n] = torch.randn(n, kv_heads, head_dim, generator=generator)
        v_flat[:n] = torch.randn(n, kv_heads, head_dim, generator=generator)
        k_cache[row], v_cache[row] = k_flat.view(-1, *shape[1:]), v_flat.view(-1, *shape[1:])
    q = torch.randn(B, heads, head_dim, generator=generator)
    lens = torch.tensor(lengths, dtype=torch.int32)
    return Paged(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), tables, lens).to(device)


def reference_attention(p: Paged, scale: float, *, kv_of="group", blocks="table", until="context"):
    """softmax(scale q . k) @ v over each sequence's context, in WIDE precision: (output, P @ |V|), [B, H, D] each.

    The keyword arguments imitate common mistakes: kv_of="modulo" (query head h reads KV head h % KVH),
    blocks="logical" / "contiguous" (the block table ignored), until="block end" (the padding attended to).
    """
    q, lens = p.q.to(WIDE), p.context_lens.long()
    B, H, D = q.shape
    block_size, KVH = p.k_cache.shape[1], p.k_cache.shape[2]
    tables = p.block_tables.long()
    if blocks == "logical":  # logical block i of every sequence read from pool block i
        tables = torch.arange(tables.shape[1], device=q.device).expand_as(tables)
    elif blocks == "contiguous":  # sequence b's blocks assumed to be pool blocks b * max_blocks + i
        tables = torch.arange(tables.numel(), device=q.device).view_as(tables)
    k = p.k_cache[tables].flatten(1, 2).to(WIDE)  # [B, T, KVH, D]
    v = p.v_cache[tables].flatten(1, 2).to(WIDE)
    limit = lens if until == "context" else (lens + block_size - 1) // block_size * block_size
    keep = torch.arange(k.shape[1], device=q.device)[None, :] < limit[:, None]  # [B, T]
    # Query head h reads KV head h // G: group the heads as [B, KVH, G, D]. The "modulo" mistake reads h % KVH,
    # i.e. the heads grouped the other way round.
    order = torch.arange(H, device=q.device)
    if kv_of == "modulo":
        order = order.view(H // KVH, KVH).t().flatten()
    grouped = q[:, order].view(B, KVH, H // KVH, D)
    scores = scale * torch.einsum("bkgd,btkd->bkgt", grouped, k)
    probs = torch.softmax(torch.where(keep[:, None, None, :], scores, -math.inf), dim=-1)
    v = torch.where(keep[:, :, None, None], v, 0.0)  # never 0 * NaN: the reference itself reads no garbage
    out = torch.einsum("bkgt,btkd->bkgd", probs, v).reshape(B, H, D)
    magnitude = torch.einsum("bkgt,btkd->bkgd", probs, v.abs()).reshape(B, H, D)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(H, device=q.device)
    return out[:, inverse], magnitude[:, inverse]


def allowed_error(expected, magnitude, dtype):
    """What a correct kernel may be off by, with u the unit roundoff of the dtype (2^-11 fp16, 2^-8 bf16).

    Probabilities rounded to the dtype before the P @ V product, or the scale folded into q in the dtype, cost a few
    u of P @ |V|; the output is rounded once (the interpreter truncates bf16: up to 2u of |out|).
    """
    unit = 2.0**-11 if dtype == torch.float16 else 2.0**-8
    return 4 * unit * magnitude + 2 * unit * expected.abs() + 1e-6


MISTAKES = {
    "the scale applied twice (softmax of scale² q·k)": lambda s, d: dict(scale=s * s),
    "the scale not applied (softmax of q·k)": lambda s, d: dict(scale=1.0),
    "exp2 used without converting the logits to base 2 (exp2(x) = exp(x ln 2): multiply by log2(e) first)": (
        lambda s, d: dict(scale=s * math.log(2))
    ),
    "1/sqrt(D) used instead of the scale argument": lambda s, d: dict(scale=d**-0.5),
    "wrong GQA head mapping: query head h read KV head h % KVH; it must read KV head h // (H / KVH)": (
        lambda s, d: dict(scale=s, kv_of="modulo")
    ),
    "the block table ignored: logical block i of every sequence read from pool block i": (
        lambda s, d: dict(scale=s, blocks="logical")
    ),
    "the block table ignored: sequence b's blocks read as pool blocks b * max_blocks + i (contiguous)": (
        lambda s, d: dict(scale=s, blocks="contiguous")
    ),
    "attending to padding past context_len (every slot of the last block was attended to)": (
        lambda s, d: dict(scale=s, until="block end")
    ),
}


def close(got, expected, bound) -> torch.Tensor:
    """Elementwise: within the bound, or NaN exactly where the expectation is NaN (for imitations)."""
    both_nan = got.isnan() & expected.isnan()
    return both_nan | ((got.to(WIDE) - expected).abs() <= bound)


def assert_attention_close(got, p: Paged, scale, what="", hint=""):
    expected, magnitude = reference_attention(p, scale)
    assert got.dtype == p.q.dtype, f"{what}the output must have q's dtype {p.q.dtype}, got {got.dtype}"
    assert got.shape == p.q.shape, f"{what}the output must be [B, H, D] = {list(p.q.shape)}, got {list(got.shape)}"
    good = close(got, expected, allowed_error(expected, magnitude, got.dtype))
    if bool(good.all()):
        return
    b, h, d = (~good).nonzero()[0].tolist()
    lengths = p.context_lens.tolist()
    message = (
        f"{what}attention differs from the float reference at {int((~good).sum())} of {good.numel()} outputs; first "
        f"at [b={b}, h={h}, d={d}] (context_len {lengths[b]}, block size {p.block_size}): expected "
        f"{expected[b, h, d].item():.5g}, got {got[b, h, d].item():.5g}."
    )
    pytest.fail(" ".join([message, *diagnose(got, p, scale, good), hint]).strip(), pytrace=False)


def diagnose(got, p: Paged, scale, good) -> list[str]:
    """Name the mistake when the output is exactly what it gives; otherwise hedge from the pattern of errors."""
    lengths, block_size = p.context_lens.tolist(), p.block_size
    H, KVH = p.q.shape[1], p.k_cache.shape[2]
    for mistake, imitation in MISTAKES.items():
        kwargs = imitation(scale, p.q.shape[-1])
        if kwargs["scale"] == scale and len(kwargs) == 1:
            continue  # the test's own scale: not a mistake here
        imitated, magnitude = reference_attention(p, **kwargs)
        if bool(imitated.isnan().all()):
            continue  # says nothing: an unwritten (NaN) output would match it too
        if bool(close(got, imitated, allowed_error(imitated, magnitude, got.dtype)).all()):
            return [f"Your output is what this mistake gives: {mistake}."]
    hints = []
    nan_rows = sorted({b for b in range(len(lengths)) if bool(got[b].isnan().any())})
    if nan_rows:
        inside = [b for b, n in enumerate(lengths) if n % block_size]
        if nan_rows == inside:
            hints.append(
                f"NaN came out for exactly the sequences whose context ends inside a block "
                f"({[lengths[b] for b in inside]} tokens, blocks of {block_size}): the slots past context_len hold "
                "garbage (NaN here), which must never reach the result: mask them out of the scores and out of V's "
                "load too (p = 0 times NaN is NaN)."
            )
        else:
            hints.append(
                f"NaN in the output of sequences {nan_rows}: this test fills unused cache slots, every block no "
                "sequence owns, unused block-table entries (they point at block 0) and fresh outputs with NaN, and "
                "one of them reached the result. Common causes: a load past context_len without a mask (p = 0 "
                "there, but 0 times NaN is NaN), or an output element never written."
            )
        return hints
    wrong_rows = ~good.all(dim=-1)  # [B, H]
    wrong_heads = wrong_rows.any(dim=0)
    long_rows = [b for b, n in enumerate(lengths) if n > block_size]
    short_rows = [b for b, n in enumerate(lengths) if n <= block_size]
    if short_rows and long_rows and not bool(wrong_rows[short_rows].any()) and bool(wrong_rows[long_rows].any()):
        hints.append(
            "Sequences that fit in one block are right and longer ones are not. One common cause is wrong "
            "block/offset arithmetic past the first block: token t of sequence b lives at slot t % block_size of "
            "block block_tables[b, t // block_size]. Another, for a kernel that walks the context in tiles, is a "
            "running max that rises without the accumulator and the running sum being rescaled by exp(m_old - m_new)."
        )
    elif H > KVH and bool(wrong_heads.any()) and not bool(wrong_heads.all()):
        right = (~wrong_heads).nonzero().flatten().tolist()
        hints.append(
            f"Query heads {right} are right in every sequence, others are not: probably the wrong KV head for some "
            f"heads; with H = {H} and KVH = {KVH}, query head h reads KV head h // (H / KVH) = h // {H // KVH}."
        )
    return hints


def assert_unchanged(before: Paged, after: Paged):
    for name, old, new in zip(("q", "k_cache", "v_cache", "block_tables", "context_lens"), before.args, after.args,
                              strict=True):  # fmt: skip
        same = torch.equal(old.isnan(), new.isnan()) and torch.equal(old.nan_to_num(), new.nan_to_num())
        assert same, f"paged_attention_decode modified its input {name}"


GUARD = 1024  # elements of poison past the end of every fresh buffer, checked after the test


@pytest.fixture
def poisoned(monkeypatch):
    """Fresh float buffers (outputs, partial results) come back full of NaN, so an element the kernels never write
    cannot pass; each is followed by a guarded band, so a kernel that writes past its end is caught."""
    empty, bands = torch.empty, []

    def guarded_empty(*size, dtype=None, device=None, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        count = math.prod(shape)
        flat = empty(count + GUARD, dtype=dtype, device=device, **kwargs)
        flat.fill_(float("nan") if flat.is_floating_point() else -1)
        bands.append((flat, count, flat[count:].clone()))
        return flat[:count].view(shape)

    monkeypatch.setattr(torch, "empty", guarded_empty)
    monkeypatch.setattr(
        torch,
        "empty_like",
        lambda t, **k: guarded_empty(t.shape, dtype=k.get("dtype", t.dtype), device=k.get("device", t.device)),
    )
    yield
    for flat, count, band in bands:
        tail = flat[count:]
        same = torch.equal(tail.isnan(), band.isnan()) and torch.equal(tail.nan_to_num(), band.nan_to_num())
        assert same, f"a kernel wrote past the end of a {count}-element buffer: mask the stores of the tail"


# --- correctness: ragged contexts through shuffled block tables ------------------------------------------------

# (block size, head dim, H, KVH, dtype): every block size, head dim, GQA ratio (H / KVH = 1, 4, 8) and dtype.
LAYOUTS = [
    (16, 128, 8, 2, torch.float16),
    (32, 64, 8, 1, torch.float16),
    (16, 64, 4, 4, torch.bfloat16),
    (32, 128, 16, 2, torch.bfloat16),
    (32, 64, 2, 2, torch.float16),
    (16, 64, 8, 1, torch.bfloat16),
]


def ragged(block_size):
    """1 token, one short of a block, a full block, one past it, and a long context: where tails go wrong."""
    return [1, block_size - 1, block_size, block_size + 1, 5 * block_size + 3]


def layout_id(layout):
    block_size, head_dim, heads, kv_heads, dtype = layout
    return f"bs{block_size}-d{head_dim}-gqa{heads // kv_heads}-{str(dtype).removeprefix('torch.')}"


@pytest.mark.points(2)
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_matches_dense_attention_over_ragged_paged_contexts(attention, poisoned, layout):
    """Each query head attends to its sequence's context_len tokens, read through the block table; the garbage
    (NaN) in unused slots, unused table entries and unowned blocks never reaches the result; inputs are untouched."""
    block_size, head_dim, heads, kv_heads, dtype = layout
    p = paged_inputs(ragged(block_size), block_size, heads, kv_heads, head_dim, dtype, seed=1)
    before = p.clone()
    scale = head_dim**-0.5
    got = attention.paged_attention_decode(*p.args, scale)
    assert_attention_close(got, p, scale, what=f"{layout_id(layout)}: ")
    assert_unchanged(before, p)


@pytest.mark.parametrize("block_size", [16, 32])
def test_reads_each_token_through_the_block_table(attention, block_size):
    """Token t of sequence b is slot t % block_size of block block_tables[b, t // block_size]. Here the garbage is
    finite, so a kernel that reads the wrong slots gives a wrong number, not NaN, and the mistake can be named."""
    p = paged_inputs([3, 2 * block_size + 5, 4 * block_size, 7 * block_size - 2], block_size, 8, 2, 64, seed=2,
                     garbage="finite")  # fmt: skip
    assert_attention_close(attention.paged_attention_decode(*p.args, 0.125), p, 0.125)


def test_gqa_heads_of_a_group_share_their_kv_head(attention):
    """With 8 query heads on 2 KV heads, heads 0-3 read KV head 0 and heads 4-7 KV head 1 (h // (H / KVH))."""
    p = paged_inputs([40, 70], 16, 8, 2, 64, seed=3, garbage="finite")
    assert_attention_close(attention.paged_attention_decode(*p.args, 0.125), p, 0.125)


def test_scale_is_the_callers(attention):
    """The logits are scale * q . k with the scale passed in (here not 1/sqrt(D)), applied once, in base e."""
    p = paged_inputs([33, 50], 16, 4, 2, 64, seed=4)
    assert_attention_close(attention.paged_attention_decode(*p.args, 0.3), p, 0.3, what="scale 0.3: ")


def logit_offset(p: Paged, offset: float, scale: float, rise=False) -> Paged:
    """Make every logit about `offset` (or rising from 0 to `offset` along the context), with a spread of ~1.

    The query heads of a group share a direction u, and every cached key gets a multiple of u added.
    """
    generator = torch.Generator().manual_seed(5)
    B, H, D = p.q.shape
    KVH = p.k_cache.shape[2]
    u = torch.randn(D, generator=generator)
    q = u + 0.3 * torch.randn(B, H, D, generator=generator)
    step = offset / (scale * float(u @ u))
    keys = p.k_cache.float().cpu()
    for b, n in enumerate(p.context_lens.tolist()):
        ids = p.block_tables[b].long().cpu()[: math.ceil(n / p.block_size)]
        tokens = keys[ids].flatten(0, 1)
        weights = torch.linspace(0, 1, n) if rise else torch.ones(n)
        tokens[:n] += step * weights[:, None, None] * u.expand(KVH, D)
        keys[ids] = tokens.view(len(ids), p.block_size, KVH, D)
    dtype, device = p.q.dtype, p.q.device
    return Paged(q.to(dtype).to(device), keys.to(dtype).to(device), p.v_cache, p.block_tables, p.context_lens)


@pytest.mark.parametrize("offset", [200.0, -200.0], ids=["logits+200", "logits-200"])
def test_large_logits_neither_overflow_nor_underflow(attention, poisoned, offset):
    """Softmax subtracts the running max: exp(200) overflows fp32 (its largest exp argument is about 88) and
    exp(-200) underflows to 0, yet softmax is the same for logits shifted by any constant."""
    scale = 64**-0.5
    p = logit_offset(paged_inputs([7, 40, 90], 16, 4, 1, 64, seed=6), offset, scale)
    got = attention.paged_attention_decode(*p.args, scale)
    if offset > 0:
        hint = ("With logits near +200, probably softmax without subtracting the running max: exp(200) overflows "
                "fp32 to inf, and inf / inf is NaN.")  # fmt: skip
    else:
        hint = ("With every logit near -200, probably the running max starts at 0 instead of -inf (or is not "
                "subtracted): exp(-200) underflows to 0 and the normalization is 0 / 0.")  # fmt: skip
    assert_attention_close(got, p, scale, what=f"logits near {offset:+.0f}: ", hint=hint)


def test_running_max_rises_across_the_context(attention, poisoned):
    """The logits rise along the context, so a kernel that walks it in tiles meets a larger max at every tile and
    must rescale what it accumulated (output and sum) by exp(m_old - m_new) each time."""
    scale = 64**-0.5
    p = logit_offset(paged_inputs([300, 170, 64], 16, 4, 1, 64, seed=7), 12.0, scale, rise=True)
    hint = ("The logits rise along the context here: when the running max grows, the accumulator and the running "
            "sum must both be rescaled by exp(m_old - m_new).")  # fmt: skip
    assert_attention_close(attention.paged_attention_decode(*p.args, scale), p, scale, hint=hint)


def test_strided_views_are_read_through_their_strides(attention, poisoned):
    """q may be a slice of a fused qkv projection, the caches views of another layout ([num_blocks, KVH,
    block_size, D] permuted), the block table a slice of a wider one: read every tensor through its strides."""
    base = paged_inputs([20, 45, 3], 16, 8, 2, 64, seed=8)
    B, H, D = base.q.shape
    qkv = torch.randn(B, 3 * H * D).to(base.q.dtype).to(DEVICE)
    qkv[:, : H * D] = base.q.flatten(1)
    q = qkv[:, : H * D].view(B, H, D)  # row stride 3 H D
    k_cache = base.k_cache.transpose(1, 2).contiguous().transpose(1, 2)  # same values, head-major blocks
    v_cache = base.v_cache.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.zeros(B, base.block_tables.shape[1] + 5, dtype=torch.int32, device=DEVICE)
    wide[:, : base.block_tables.shape[1]] = base.block_tables
    tables = wide[:, : base.block_tables.shape[1]]  # row stride max_blocks + 5
    got = attention.paged_attention_decode(q, k_cache, v_cache, tables, base.context_lens, 0.125)
    assert_attention_close(got, base, 0.125, what="strided views: ")


# --- split-KV ("flash-decoding") --------------------------------------------------------------------------------


@pytest.mark.points(2)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_splits", [2, 3, 8])
def test_split_kv_matches_the_single_pass(attention, poisoned, num_splits, dtype):
    """num_splits = S cuts each context into S pieces attended by separate programs, whose partial results a
    reduction combines: the same attention as one pass. Short contexts leave splits empty, which add nothing."""
    p = paged_inputs([1, 2, 17, 100, 257, 600], 16, 8, 2, 64, dtype, seed=9)
    scale = 0.125
    assert_attention_close(attention.paged_attention_decode(*p.args, scale, num_splits=1), p, scale,
                           what="num_splits=1: ")  # fmt: skip
    got = attention.paged_attention_decode(*p.args, scale, num_splits=num_splits)
    expected, magnitude = reference_attention(p, scale)
    if bool(close(got, expected, allowed_error(expected, magnitude, dtype)).all()):
        return
    what = f"num_splits={num_splits} (right with num_splits=1): "
    if bool(got.isnan().any()):
        assert_attention_close(got, p, scale, what=what, hint=(
            "The contexts of 1 and 2 tokens leave most splits empty: a split that holds no tokens must still write "
            "its partials, with m = -inf, l = 0 and a zero accumulator (weight 0 in the combine); note that "
            "exp(-inf - (-inf)) is NaN, and an unwritten partial is NaN here. And every token needs a split: "
            "together they cover 0 .. context_len - 1 exactly once (chunks of context_len // num_splits tokens "
            "cover nothing when the context is shorter than num_splits)."))  # fmt: skip
    uniform = Paged(torch.zeros_like(p.q), *p.args[1:])  # every score 0: the output is the mean of V
    flat = attention.paged_attention_decode(*uniform.args, scale, num_splits=num_splits)
    mean_expected, mean_magnitude = reference_attention(uniform, scale)
    if not bool(close(flat, mean_expected, allowed_error(mean_expected, mean_magnitude, dtype)).all()):
        assert_attention_close(flat, uniform, scale, what=f"q = 0, num_splits={num_splits}: ", hint=(
            "With every score equal the output must be the plain mean of V over the context: the splits probably "
            "skip or double-count tokens (together they must cover 0 .. context_len - 1 exactly once), or the "
            "combine weighs the partials by something other than their sums l_s."))  # fmt: skip
    assert_attention_close(got, p, scale, what=what, hint=(
        "Right when every split has the same max (q = 0), wrong otherwise: probably the split-KV partials combined "
        "without rescaling: each split's sum l_s and accumulator were taken relative to its own max m_s, so both "
        "must be scaled by exp(m_s - M), M the largest m_s, before they are added."))  # fmt: skip


def test_wrapper_splits_long_contexts_of_small_batches(attention):
    """choose_num_splits: one split when the batch alone gives every SM several programs, or the context is short;
    for a single sequence with a long context, enough splits that every SM gets a program."""
    choose = attention.choose_num_splits
    many = choose(1, 8, 32768, 132)
    assert isinstance(many, int) and many * 8 >= 132, (
        f"choose_num_splits(batch 1, 8 KV heads, context 32768, 132 SMs) = {many!r}: 8 programs leave most of the "
        "132 SMs idle; at least 17 splits give each SM a program"
    )
    assert choose(256, 8, 4096, 132) == 1, (
        f"choose_num_splits(batch 256, 8 KV heads, context 4096, 132 SMs) = {choose(256, 8, 4096, 132)!r}: 2048 "
        "programs already fill 132 SMs many times over, so splitting only adds a reduction (expected 1)"
    )
    assert choose(1, 1, 64, 132) == 1, (
        f"choose_num_splits(batch 1, 1 KV head, context 64, 132 SMs) = {choose(1, 1, 64, 132)!r}: 64 tokens are too "
        "few to pay for a second kernel (expected 1)"
    )


def test_the_wrappers_own_choice_is_right(attention, poisoned):
    """With num_splits left to the wrapper (and max_context_len given or not), one long sequence comes out right."""
    p = paged_inputs([1200], 16, 4, 1, 64, seed=10)
    assert_attention_close(attention.paged_attention_decode(*p.args, 0.125), p, 0.125, what="default split: ")
    got = attention.paged_attention_decode(*p.args, 0.125, max_context_len=1200)
    assert_attention_close(got, p, 0.125, what="max_context_len=1200: ")


# --- bad input ----------------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "q a list": (lambda p: dict(q=p.q.tolist()), "q"),
    "q 2-d": (lambda p: dict(q=p.q[:, 0]), "q"),
    "v_cache shape differs from k_cache": (lambda p: dict(v_cache=p.v_cache[:, :, :1]), "v_cache"),
    "head dims of q and cache differ": (lambda p: dict(q=p.q[..., :32]), "head dim"),
    "H not a multiple of KVH": (lambda p: dict(q=p.q[:, :3]), "multiple"),
    "block_tables int64": (lambda p: dict(block_tables=p.block_tables.long()), "int32"),
    "context_lens int64": (lambda p: dict(context_lens=p.context_lens.long()), "int32"),
    "block_tables rows differ from the batch": (lambda p: dict(block_tables=p.block_tables[:1]), "block_tables"),
    "context_lens length differs from the batch": (lambda p: dict(context_lens=p.context_lens[:1]), "context_lens"),
    "a context longer than its table covers": (
        lambda p: dict(
            context_lens=torch.tensor([5, 16 * p.block_tables.shape[1] + 1], dtype=torch.int32, device=DEVICE)
        ),
        "longer",
    ),  # fmt: skip
    "max_context_len longer than the table covers": (
        lambda p: dict(max_context_len=16 * p.block_tables.shape[1] + 1),
        "max_context_len",
    ),
    "a context of 0 tokens": (
        lambda p: dict(context_lens=torch.tensor([0, 9], dtype=torch.int32, device=DEVICE)),
        "at least 1",
    ),  # fmt: skip
    "a block id outside the pool": (
        lambda p: dict(
            block_tables=torch.where(p.block_tables == p.block_tables[1, 0], p.k_cache.shape[0], p.block_tables)
        ),
        "pool",
    ),  # fmt: skip
    "q float32": (lambda p: dict(q=p.q.float()), "float16"),
    "caches of another dtype than q": (
        lambda p: dict(k_cache=p.k_cache.bfloat16(), v_cache=p.v_cache.bfloat16()),
        "dtype",
    ),  # fmt: skip
    "head dim not a power of two": (
        lambda p: dict(q=p.q[..., :48], k_cache=p.k_cache[..., :48], v_cache=p.v_cache[..., :48]),
        "power of two",
    ),
    "head dim 8 (under 16)": (
        lambda p: dict(q=p.q[..., :8], k_cache=p.k_cache[..., :8], v_cache=p.v_cache[..., :8]),
        "head dim",
    ),
    "block size not a power of two": (
        lambda p: dict(k_cache=p.k_cache[:, :12], v_cache=p.v_cache[:, :12]),
        "power of two",
    ),
    "scale 0": (lambda p: dict(scale=0.0), "scale"),
    "scale NaN": (lambda p: dict(scale=float("nan")), "scale"),
    "num_splits 0": (lambda p: dict(num_splits=0), "num_splits"),
    "mixed devices": (lambda p: dict(k_cache=p.k_cache.to("meta")), "device"),
}


@pytest.mark.parametrize("mistake", BAD_INPUTS)
def test_rejects_bad_input(attention, mistake):
    """Wrong ranks, dtypes and shapes, contexts the table cannot hold, bad scales and split counts: a clear
    ValueError or TypeError before any work."""
    p = paged_inputs([5, 20], 16, 4, 2, 64, seed=11)
    change, word = BAD_INPUTS[mistake]
    kwargs = dict(q=p.q, k_cache=p.k_cache, v_cache=p.v_cache, block_tables=p.block_tables,
                  context_lens=p.context_lens, scale=0.125)  # fmt: skip
    kwargs.update(change(p))
    error = TypeError if any(w in mistake for w in ("list", "int64", "float32", "dtype")) else ValueError
    expect_error(error, lambda: attention.paged_attention_decode(**kwargs), mistake, match=word)


# --- speed (GPU): fractions of the copy bandwidth and speedups over gather + SDPA, thresholds in thresholds.toml --

SPEED_SHAPES = [(64, 4096), (8, 16384), (1, 32768)]  # (batch, context); H = 32, KVH = 8, D = 128, fp16, blocks of 16


def gather_then_sdpa(q, k_cache, v_cache, block_tables, context_lens, scale, **_):
    """The baseline: copy each sequence's pages into contiguous K and V, then torch's SDPA (equal contexts)."""
    k = k_cache[block_tables.long()].flatten(1, 2).transpose(1, 2)  # [B, KVH, T, D]
    v = v_cache[block_tables.long()].flatten(1, 2).transpose(1, 2)
    return F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)[:, :, 0]


@pytest.mark.speed
@pytest.mark.points(2)
@pytest.mark.parametrize("batch,context", SPEED_SHAPES, ids=lambda v: str(v))
def test_decode_speed_as_a_fraction_of_copy_bandwidth(attention, speed, batch, context):
    heads, kv_heads, head_dim, block_size = 32, 8, 128, 16
    blocks = batch * context // block_size
    k_cache = torch.randn(blocks + 1, block_size, kv_heads, head_dim, device="cuda").half()
    v_cache = torch.randn(blocks + 1, block_size, kv_heads, head_dim, device="cuda").half()
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    scale = head_dim**-0.5

    def setup():  # a fresh query and a fresh shuffle of the pool every call
        q = torch.randn(batch, heads, head_dim, device="cuda").half()
        tables = (1 + torch.randperm(blocks, device="cuda")).int().view(batch, -1)
        return (q, k_cache, v_cache, tables, lens, scale), {"max_context_len": context}

    def check(out, *args, **kwargs):
        assert_attention_close(out, Paged(*args[:5]), args[5], what="timed run: ")

    baseline = speed.time(gather_then_sdpa, setup, rounds=10, warmup=2, check=check)
    timing = speed.bench(attention.paged_attention_decode, setup, rounds=20, warmup=3, check=check)
    moved = 2 * batch * context * kv_heads * head_dim * 2 + 2 * batch * heads * head_dim * 2  # K, V; q, output
    fraction = speed.bandwidth_fraction(timing, moved)
    detail = f"{timing.median * 1e6:.1f} us ({moved / timing.median / 1e9:.0f} GB/s); gather + SDPA " \
             f"{baseline.median * 1e6:.1f} us"  # fmt: skip
    shape = f"b{batch}_ctx{context}"
    speed.judge(f"speedup_over_gather_sdpa_{shape}", baseline.median / timing.median, detail=detail)
    speed.judge(f"roofline_{shape}", fraction, roofline=fraction, detail=detail)
