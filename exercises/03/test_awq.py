"""Exercise 03 specification: AWQ int4 weights (AutoAWQ's "GEMM" layout), dequantized and multiplied in Triton.

The reference below is written from the format alone, independently of any student or solution code. Correctness runs
everywhere (under the Triton interpreter without a GPU, on small shapes); speed is judged on a GPU as a fraction of
the copy bandwidth measured in the same session, or as a speedup over a baseline timed in the same test.

Every call into your kernels runs under `KernelCall`, which sees what the call does whatever names it uses: the
tensors it allocates come back full of NaN and fenced by guard bands (an output element never written cannot pass,
a write past either end is reported), the tensors torch computes are recorded (W must not be materialised by the
GEMV, nor computed in torch by the dequantization), and the Triton kernels launched are counted.
"""

import os
import sys

import pytest
import torch

from fixtures.checks import expect_error
from fixtures.kernel_watch import KernelCall, fenced, poison_value, watched

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of a word holds column 8c + ORDER[i]
INVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # column j sits in nibble INVERSE_ORDER[j]: reading it as ORDER is a bug
DTYPES = [torch.float16, torch.bfloat16]
MANTISSA_BITS = {torch.float16: 11, torch.bfloat16: 8}  # significant bits, the implicit one included


@pytest.fixture
def awq(impl):
    return impl("awq")


# --- an independent reference, from the format's definition -------------------------------------------------------


def reference_unpack(packed: torch.Tensor, order=ORDER, mask=True) -> torch.Tensor:
    """int32 [R, C/8] -> int64 [R, C]. The keyword arguments exist to imitate common mistakes."""
    nibbles = packed.long()[..., None] >> torch.arange(0, 32, 4, device=packed.device)  # sign-extending, like int32
    if mask:
        nibbles = nibbles & 0xF
    else:  # only the top nibble keeps its sign bits, which is what an unmasked int32 shift by 28 gives
        nibbles = torch.cat([nibbles[..., :7] & 0xF, nibbles[..., 7:]], dim=-1)
    columns = torch.empty_like(nibbles)
    columns[..., order] = nibbles
    return columns.flatten(-2)


def reference_dequant(
    qweight, scales, qzeros, *, order=ORDER, mask=True, zeros=True, group_rows="interleave", via_fp16=None
):
    q, z = reference_unpack(qweight, order, mask), reference_unpack(qzeros, order, mask)
    if zeros == "eight":  # the symmetric-int4 habit: a constant zero point of 8
        z = torch.full_like(z, 8)
    group = qweight.shape[0] // scales.shape[0]
    if group_rows == "interleave":  # row k uses group k // G
        z, s = z.repeat_interleave(group, 0), scales.repeat_interleave(group, 0)
    elif group_rows == "first":  # every row uses group 0
        z, s = z[:1].expand_as(q), scales[:1].expand(q.shape)
    else:  # row k uses group k % (K / G): the groups tiled instead of repeated
        z, s = z.repeat(group, 1), scales.repeat(group, 1)
    if via_fp16 == "scales":  # bf16 scales converted to fp16 on the way (.half())
        s = s.half().to(scales.dtype)
    w = ((q - z) if zeros else q).to(scales.dtype) * s
    if via_fp16 == "weights":  # (q - z) * s rounded to fp16 before the output dtype
        w = (((q - z) if zeros else q).float() * s.float()).half().to(scales.dtype)
    return w


THROUGH_FP16 = "bf16 went through fp16 on the way"
MISTAKES = {
    "nibbles read in natural order (nibble i = column i) instead of AWQ's [0, 2, 4, 6, 1, 3, 5, 7]": dict(
        order=list(range(8))
    ),
    "the top nibble sign-extended: a word's int32 sign bit is copied in by >> 28, so mask with & 0xF": dict(mask=False),
    "nibble i read into column [0, 4, 1, 5, 2, 6, 3, 7][i]: the permutation inverted (column j sits in nibble "
    "[0, 4, 1, 5, 2, 6, 3, 7][j]; nibble i holds column [0, 2, 4, 6, 1, 3, 5, 7][i])": dict(order=INVERSE_ORDER),
    "zero points not subtracted": dict(zeros=False),
    "a constant zero point of 8 subtracted instead of each group's qzeros": dict(zeros="eight"),
    "group index k % (K / G) (scale rows tiled) instead of k // G (each scale row repeated G times)": dict(
        group_rows="tile"
    ),
    "group index stuck at 0: every row used the first group's zeros and scales instead of group k // G": dict(
        group_rows="first"
    ),
    f"{THROUGH_FP16}: the scales were converted to fp16 (.half()), which cannot hold 1e-7 (it underflows to a "
    "subnormal) or 1e5 (over 65504); bf16 has fp32's range, so convert bf16 to fp32, never to fp16": dict(
        via_fp16="scales"
    ),
    f"{THROUGH_FP16}: (q - z) * s was rounded to fp16 before bf16, which cannot hold 1e-7 or 1e5; compute in "
    "fp32 and round once, to the output dtype": dict(via_fp16="weights"),
}


def random_awq(K, N, G, dtype=torch.float16, seed=0, device=DEVICE):
    """Packed words over the full int32 range (half of them negative), scales of a realistic size."""
    generator = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-(2**31), 2**31, (K, N // 8), generator=generator, dtype=torch.int64).int()
    qzeros = torch.randint(-(2**31), 2**31, (K // G, N // 8), generator=generator, dtype=torch.int64).int()
    scales = (torch.rand(K // G, N, generator=generator) * 0.02 + 0.001).to(dtype)
    return qweight.to(device), scales.to(device), qzeros.to(device)


# --- watched calls (fixtures/kernel_watch.py): allocations poisoned and fenced, torch work recorded, launches counted


def dequantize(awq, qweight, scales, qzeros, what=""):
    return watched(awq.awq_dequantize, qweight, scales, qzeros, names=("qweight", "scales", "qzeros"), what=what)[0]


def gemv(awq, x, qweight, scales, qzeros, what=""):
    return watched(awq.awq_gemv, x, qweight, scales, qzeros, names=("x", "qweight", "scales", "qzeros"), what=what)[0]


# --- the format: unpack and pack ---------------------------------------------------------------------------------


def test_unpack_reads_nibble_i_into_column_order_i(awq):
    word = sum(nibble << (4 * i) for i, nibble in enumerate(range(1, 9)))  # 0x87654321
    words = torch.tensor([[word - 2**32]], dtype=torch.int32)  # the same 32 bits, as a (negative) int32
    got = awq.unpack_awq(words.to(DEVICE)).cpu()
    expected = torch.tensor([[1, 5, 2, 6, 3, 7, 4, 8]])  # column ORDER[i] holds nibble i (= i + 1 here)
    assert_nibbles_masked(got)
    assert torch.equal(got.long(), expected), (
        f"a word whose nibbles 0..7 hold 1..8 unpacks to columns {expected.tolist()[0]} (nibble i holds column "
        f"[0, 2, 4, 6, 1, 3, 5, 7][i]), got {got.tolist()[0]}"
    )


def test_unpack_handles_negative_words(awq):
    qweight, _, _ = random_awq(16, 64, 16, seed=1)
    got = awq.unpack_awq(qweight)
    assert got.shape == (16, 64), f"[16, 8] words unpack to [16, 64] values, got {list(got.shape)}"
    assert got.dtype == torch.int32, f"unpack_awq returns int32 values, got {got.dtype}"
    if torch.equal(got.long().cpu(), reference_unpack(qweight).cpu()):
        return
    assert_nibbles_masked(got)
    named = [
        name
        for name, variant in UNPACK_MISTAKES.items()
        if torch.equal(got.long().cpu(), reference_unpack(qweight, **variant).cpu())
    ]
    pytest.fail(
        "unpack differs from the format on full-range words (half of them negative)"
        + (f": your values are exactly what this mistake gives: {named[0]}" if named else ""),
        pytrace=False,
    )


def assert_nibbles_masked(values):
    low, high = int(values.min()), int(values.max())
    assert 0 <= low and high <= 15, (
        f"unpacked values must be 4-bit (0..15), got values from {low} to {high}: mask every nibble with & 0xF "
        "(a shift leaves the bits above the nibble in place, and >> of a negative word copies its sign bit in)"
    )


UNPACK_MISTAKES = {
    "nibbles read in natural order (nibble i = column i)": dict(order=list(range(8))),
    "the permutation inverted (nibble i read into column [0, 4, 1, 5, 2, 6, 3, 7][i])": dict(order=INVERSE_ORDER),
    "the top nibble sign-extended: for negative words >> copies the sign bit in; mask every nibble with & 0xF": dict(
        mask=False
    ),
}


def python_lines(fn, *args):
    """fn(*args), and the number of Python lines it executed (library code included), counted with sys.settrace: a
    Python loop executes at least one line per iteration, whether it loops over tensors or over Python numbers."""
    lines = 0

    def trace(frame, event, arg):
        nonlocal lines
        lines += event == "line"
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        result = fn(*args)
    finally:
        sys.settrace(previous)
    return result, lines


def test_unpack_has_no_python_loop_over_elements(awq):
    """unpack_awq works on whole tensors: as many Python lines and torch operations for 32768 words as for 32 (a
    loop over rows or elements, tensors or numbers after .tolist(), does more work the more words there are)."""
    small, large = (
        random_awq(rows, 8 * columns, rows, seed=17, device="cpu")[0] for rows, columns in ((4, 8), (512, 64))
    )
    lines, ops = {}, {}
    for words in (small, large):
        with KernelCall(fence=False) as call:
            got, lines[words.numel()] = python_lines(awq.unpack_awq, words)
        ops[words.numel()] = call.ops
    assert torch.equal(got.long(), reference_unpack(large)), "unpack_awq gives wrong values on 32768 full-range words"
    few, many = small.numel(), large.numel()
    assert lines[many] <= lines[few] + 32 and ops[many] <= ops[few] + 8, (
        f"unpack_awq executed {lines[few]} Python lines and {ops[few]} torch operations for {few} words, but "
        f"{lines[many]} lines and {ops[many]} operations for {many}: the work grows with the input, so there is a "
        "Python loop over rows or elements; shift and mask whole tensors instead (eight shifts at most)"
    )


def test_pack_inverts_unpack_over_the_full_int32_range(awq):
    qweight, _, _ = random_awq(32, 128, 32, seed=2)
    values = reference_unpack(qweight).int()
    packed = awq.pack_awq(values)
    assert packed.dtype == torch.int32 and packed.shape == (32, 16), (
        f"pack must return int32 [32, 16], got {packed.dtype} {list(packed.shape)}"
    )
    assert torch.equal(packed.cpu(), qweight.cpu()), "pack_awq(unpack(words)) must give back the same words"
    assert torch.equal(awq.unpack_awq(packed).long().cpu(), values.long().cpu()), "unpack_awq(pack_awq(v)) must be v"


@pytest.mark.parametrize("bad", ["columns not a multiple of 8", "value 16", "value -1"])
def test_pack_rejects_bad_values(awq, bad):
    values = torch.zeros(2, 12 if bad.startswith("columns") else 8, dtype=torch.int32)
    values[0, 0] = {"value 16": 16, "value -1": -1}.get(bad, 0)
    expect_error(ValueError, lambda: awq.pack_awq(values.to(DEVICE)), f"pack_awq with {bad}")


# --- dequantization ----------------------------------------------------------------------------------------------


def assert_dequant_equal(got, qweight, scales, qzeros, what=""):
    expected = reference_dequant(qweight, scales, qzeros)
    assert got.dtype == scales.dtype, f"output dtype must be the scales' dtype {scales.dtype}, got {got.dtype}"
    assert got.shape == expected.shape, f"output must be [K, N] = {list(expected.shape)}, got {list(got.shape)}"
    # Bit-exact, except that the Triton interpreter truncates every fp32 -> bf16 conversion (a GPU rounds to nearest
    # even): about a fifth of a correct kernel's bf16 outputs are one ulp off there. So under the interpreter a bf16
    # element may be either rounding of the exact product, and nothing else (torch rounds to nearest even everywhere).
    one_ulp = INTERPRETED and got.dtype == torch.bfloat16

    def same(a, b):
        return torch.isclose(a.float(), b.float(), rtol=2**-7 if one_ulp else 0.0, atol=0.0) | (a.isnan() & b.isnan())

    equal = (got == expected) | (got.isnan() & expected.isnan())
    if one_ulp:
        equal |= got == truncated_dequant(qweight, scales, qzeros)
    if bool(equal.all()):
        return
    k, n = (~equal).nonzero()[0].tolist()
    message = (
        f"{what}dequantized weights differ at {int((~equal).sum())} of {equal.numel()} elements; first at [k={k}, "
        f"n={n}]: expected {expected[k, n].item():.6g}, got {got[k, n].item():.6g}."
    )
    message += unwritten(got)
    for mistake, imitation in MISTAKES.items():
        if bool(same(got, reference_dequant(qweight, scales, qzeros, **imitation)).all()):
            message += f" Your output is {'exactly ' if not one_ulp else ''}what this mistake gives: {mistake}."
    pytest.fail(message, pytrace=False)


def truncated_dequant(qweight, scales, qzeros):
    """(q - z) * s exactly in fp32, then cut to bf16 by dropping the low 16 bits: the interpreter's conversion."""
    G = qweight.shape[0] // scales.shape[0]
    q, z = reference_unpack(qweight), reference_unpack(qzeros).repeat_interleave(G, 0)
    exact = (q - z).float() * scales.float().repeat_interleave(G, 0)
    return (exact.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def unwritten(got):
    """What the NaN poison left in an output says about the tiles that never wrote it."""
    nan = got.isnan()
    if not bool(nan.any()):
        return ""
    rows, columns = nan.all(1), nan.all(0)
    if bool(rows[-1]):
        first = int(rows.flip(0).int().argmin()) if not bool(rows.all()) else rows.numel()
        k = got.shape[0] - first
        return (
            f" Rows k >= {k} were never written (outputs start as NaN): probably K = {got.shape[0]} is not a multiple "
            "of your tile's rows and the last, partial tile never ran; cover the K tail with triton.cdiv and mask it."
        )
    if bool(columns[-1]):
        first = int(columns.flip(0).int().argmin()) if not bool(columns.all()) else columns.numel()
        n = got.shape[1] - first
        return (
            f" Columns n >= {n} were never written (outputs start as NaN): probably N = {got.shape[1]} is not a "
            "multiple of your tile's columns and the last, partial tile never ran; cover the N tail with triton.cdiv "
            "and mask it."
        )
    return " Some outputs were never written (outputs start as NaN): check the masks and the grid of the last tiles."


@pytest.mark.points(2)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [32, 64, 128, "K"])
def test_dequantize_is_bit_exact(awq, group, dtype):
    K, N = 256, 136  # N / 8 = 17 words per row: not a multiple of any power-of-two tile
    G = K if group == "K" else group
    qweight, scales, qzeros = random_awq(K, N, G, dtype, seed=3)
    got = dequantize(awq, qweight, scales, qzeros, what=f"G={G}, {dtype}: ")
    assert_dequant_equal(got, qweight, scales, qzeros, what=f"G={G}, {dtype}: ")


TAILS = [(32, 8, 32), (96, 24, 32), (160, 200, 32), (64, 1032, 64), (40, 16, 40)]
# K and G that no power-of-two tile divides (the contract allows any G that divides K, G = K included).
ODD_GROUPS = [(36, 40, 36), (72, 40, 36), (96, 56, 48), (64, 24, 16)]


@pytest.mark.parametrize("K,N,G", TAILS + ODD_GROUPS)
def test_dequantize_covers_tails_of_every_size(awq, K, N, G):
    qweight, scales, qzeros = (fenced(t) for t in random_awq(K, N, G, seed=4))
    what = f"K={K}, N={N}, G={G}: "
    assert_dequant_equal(dequantize(awq, qweight, scales, qzeros, what), qweight, scales, qzeros, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_runs_in_a_triton_kernel(awq, dtype):
    """torch only allocates the output: unpacking, zeros and scales happen in a Triton kernel, for bf16 as for fp16."""
    K, N, G = 128, 64, 32
    qweight, scales, qzeros = random_awq(K, N, G, dtype, seed=14)
    if DEVICE == "cuda":
        awq.awq_dequantize(qweight, scales, qzeros)  # compile (and autotune) outside the watched call
    got, call = watched(awq.awq_dequantize, qweight, scales, qzeros, names=("qweight", "scales", "qzeros"))
    computed = call.computed()
    if sum(c.numel for c in computed) >= K * N // 2:
        largest = max(computed, key=lambda c: c.numel)
        pytest.fail(
            f"awq_dequantize computed W in torch: its torch operations made {sum(c.numel for c in computed)} "
            f"elements for a [{K}, {N}] W (largest: {largest}); the Triton kernel must produce W itself, in the "
            "output dtype: torch only allocates the output",
            pytrace=False,
        )
    assert call.launches, (
        "no Triton kernel ran during awq_dequantize: W must be computed by a @triton.jit kernel launched as "
        "kernel[grid](...), not in plain torch"
    )
    assert_dequant_equal(got, qweight, scales, qzeros)


def test_dequantize_subtracts_the_zero_point_of_each_group(awq):
    qweight, scales, _ = random_awq(64, 16, 32, seed=5)
    # Group 0's zero points are 3, group 1's 12, in every column: a kernel that subtracts a constant 8 (the symmetric
    # int4 habit) or group 0's zeros everywhere cannot pass.
    qzeros = torch.tensor([[0x33333333] * 2, [0xCCCCCCCC - 2**32] * 2], dtype=torch.int32, device=DEVICE)
    got = dequantize(awq, qweight, scales, qzeros)
    assert_dequant_equal(got, qweight, scales, qzeros, "zero points 3 and 12: ")


def test_dequantize_sign_of_the_top_nibble(awq):
    qweight = torch.full((32, 1), -(2**31), dtype=torch.int32, device=DEVICE)  # only bit 31 set: nibble 7 holds 8
    scales = torch.ones(1, 8, dtype=torch.float16, device=DEVICE)
    qzeros = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    got = dequantize(awq, qweight, scales, qzeros)
    assert_dequant_equal(got, qweight, scales, qzeros, "word 0x80000000 (q = 8 in column 7): ")


def test_dequantize_uses_the_group_of_each_row(awq):
    qweight, _, qzeros = random_awq(128, 32, 32, seed=6)
    scales = torch.arange(1, 5, dtype=torch.float16, device=DEVICE)[:, None].expand(4, 32).contiguous()
    got = dequantize(awq, qweight, scales, qzeros)
    assert_dequant_equal(got, qweight, scales, qzeros, "scale = group + 1: ")


def wide_range_bf16(shape, low, high, seed):
    """bf16 values of random sign spread log-uniformly over [10^low, 10^high]."""
    generator = torch.Generator().manual_seed(seed)
    exponent = torch.rand(shape, generator=generator) * (high - low) + low
    sign = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    return (sign * 10.0**exponent).bfloat16().to(DEVICE)


def test_dequantize_keeps_the_range_of_bf16(awq):
    """bf16 has fp32's exponent range: scales from 1e-8 to 1e5 (fp16 holds neither end) dequantize bit for bit."""
    K, N, G = 64, 64, 32
    qweight, _, qzeros = random_awq(K, N, G, seed=15)
    scales = wide_range_bf16((K // G, N), -8, 5, seed=15).abs()
    got = dequantize(awq, qweight, scales, qzeros)
    assert_dequant_equal(got, qweight, scales, qzeros, "bf16 scales from 1e-8 to 1e5: ")


def strided(t, layout):
    """The same values as t, laid out as a column-major copy or as a window of a wider, poisoned matrix."""
    if layout == "column-major":
        return t.t().contiguous().t()
    wider = torch.full((t.shape[0], t.shape[1] + 5), poison_value(t.dtype), dtype=t.dtype, device=t.device)
    return wider[:, 2 : 2 + t.shape[1]].copy_(t)


@pytest.mark.parametrize("layout", ["column-major", "sliced"])
def test_dequantize_accepts_any_strides(awq, layout):
    """qweight, scales and qzeros may be views with any strides (a transposed copy, a window of a wider matrix)."""
    qweight, scales, qzeros = random_awq(64, 64, 32, seed=7)
    views = [strided(t, layout) for t in (qweight, scales, qzeros)]
    what = f"qweight, scales and qzeros as {layout} views (honour the strides, or call .contiguous()): "
    assert_dequant_equal(dequantize(awq, *views, what), qweight, scales, qzeros, what)


# (transform of (qweight, scales, qzeros), what the error message must mention: any of these words)
BAD_WEIGHTS = {
    "qweight float": (lambda qw, s, qz: (qw.float(), s, qz), "qweight"),
    "scales float32": (lambda qw, s, qz: (qw, s.float(), qz), "scales"),
    "qzeros int64": (lambda qw, s, qz: (qw, s, qz.long()), "qzeros"),
    "qzeros rows disagree": (lambda qw, s, qz: (qw, s, qz[:2]), "qzeros"),
    "scales columns disagree": (lambda qw, s, qz: (qw, s[:, :32], qz), "scales"),
    "group does not divide K": (lambda qw, s, qz: (qw, s[:3], qz[:3]), ("group", "divi", "multiple")),  # K=128, 3 rows
    "qweight 1-d": (lambda qw, s, qz: (qw.flatten(), s, qz), "qweight"),
    "mixed devices": (lambda qw, s, qz: (qw, s.to("meta"), qz), "device"),
}


@pytest.mark.parametrize("mistake", BAD_WEIGHTS)
def test_dequantize_rejects_bad_input(awq, mistake):
    """A clear ValueError or TypeError, before any work, whose message names the argument or the problem."""
    qweight, scales, qzeros = random_awq(128, 64, 32, seed=8)
    transform, names = BAD_WEIGHTS[mistake]
    bad = transform(qweight, scales, qzeros)
    expect_error((ValueError, TypeError), lambda: awq.awq_dequantize(*bad), f"awq_dequantize with {mistake}", names)


# --- the fused GEMV ----------------------------------------------------------------------------------------------


def gemv_reference(x, qweight, scales, qzeros, x_via_fp16=False, **imitation):
    """fp32 x @ W, and the error a correct kernel may make there.

    With u the unit roundoff of the dtype (2^-11 for fp16, 2^-8 for bf16): W itself may or may not be rounded to the
    dtype before the product (u |x| @ |W|), the fp32 accumulation of K terms of at most |x| 15 |s| adds a few K 2^-24
    of that, and the output is rounded once (one ulp allowed: 2u |y|).
    """
    weights = reference_dequant(qweight, scales, qzeros, **imitation).float()
    xs = (x.half() if x_via_fp16 else x).float()
    expected = xs @ weights
    group = qweight.shape[0] // scales.shape[0]
    unit = 2.0**-11 if x.dtype == torch.float16 else 2.0**-8
    accumulation = 4 * x.shape[1] * 2.0**-24 * (xs.abs() @ (15 * scales.float().abs().repeat_interleave(group, 0)))
    bound = accumulation + unit * (xs.abs() @ weights.abs()) + 2 * unit * expected.abs() + 1e-6
    return expected, bound


GEMV_MISTAKES = {
    **MISTAKES,
    f"{THROUGH_FP16}: x was converted to fp16, where |x| above 65504 overflows to inf; bf16 has fp32's range, so "
    "convert bf16 to fp32, never to fp16": dict(x_via_fp16=True),
}


def assert_gemv_close(got, x, qweight, scales, qzeros, what=""):
    """Against fp32 x @ W, within the bound of `gemv_reference`; a failure names the mistake it matches, if any."""
    expected, bound = gemv_reference(x, qweight, scales, qzeros)
    assert got.dtype == x.dtype, f"output dtype must be x's dtype {x.dtype}, got {got.dtype}"
    assert got.shape == expected.shape, f"output must be [M, N] = {list(expected.shape)}, got {list(got.shape)}"
    error = (got.float() - expected).abs()
    bad = ~(error <= bound)  # NaN counts as bad
    if not bool(bad.any()):
        return
    m, n = bad.nonzero()[0].tolist()
    message = (
        f"{what}x @ W differs from the fp32 reference at {int(bad.sum())} of {bad.numel()} outputs; first at "
        f"[{m}, {n}]: expected {expected[m, n].item():.6g}, got {got[m, n].item():.6g} (allowed error "
        f"{bound[m, n].item():.3g})."
    )
    pytest.fail(message + gemv_diagnosis(got, x, qweight, scales, qzeros), pytrace=False)


def gemv_diagnosis(got, x, qweight, scales, qzeros):
    """The likely mistake behind a wrong GEMV output, hedged: what its values match."""
    notes = []
    beyond_fp16 = bool((x.float().abs() > 65504).any()) or bool((scales.float().abs() < 2**-14).any())
    if bool((~got.isfinite()).any()) and x.dtype == torch.bfloat16 and beyond_fp16:
        notes.append(
            " Some outputs are inf or NaN where the result is finite: probably an overflow because bf16 went through "
            "fp16 on the way (fp16's largest is 65504; inf - inf is NaN)."
        )
    elif bool(got.isinf().any()):
        notes.append(" Some outputs are inf where the result is finite: an overflow.")
    elif bool(got.isnan().any()):
        notes.append(
            " Some outputs are NaN: never written (outputs start as NaN: check the masks and the grid of the last "
            "tiles), or an overflow."
        )
    for mistake, imitation in GEMV_MISTAKES.items():
        wrong, bound = gemv_reference(x, qweight, scales, qzeros, **imitation)
        if bool(((got.float() - wrong).abs() <= bound).all()):
            notes.append(f" Your output matches what this mistake gives, so probably: {mistake}.")
    K = x.shape[1]
    weights = reference_dequant(qweight, scales, qzeros).float()
    bound = gemv_reference(x, qweight, scales, qzeros)[1]
    for rows in sorted({K - K % step for step in (8, 16, 32, 64, 128) if 0 < K - K % step < K}, reverse=True):
        partial = x[:, :rows].float() @ weights[:rows]
        if bool(((got.float() - partial).abs() <= bound).all()):
            notes.append(
                f" Your output is x @ W without rows k >= {rows}: probably the K tail was skipped (K = {K} is not a "
                "multiple of your step); cover it and mask the last step."
            )
            break
    return "".join(notes) or (
        " One common cause: a zero point or scale of the wrong group or column; accumulate in fp32 and apply each "
        "group's zero and scale."
    )


@pytest.mark.points(2)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 3, 16])
def test_gemv_matches_fp32_reference(awq, M, dtype):
    K, N, G = 256, 144, 64  # N: a tail in every tile width; a multiple of 16, as fast GPU paths may want
    qweight, scales, qzeros = random_awq(K, N, G, dtype, seed=9)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype).to(DEVICE)
    what = f"M={M}, {dtype}: "
    assert_gemv_close(gemv(awq, x, qweight, scales, qzeros, what), x, qweight, scales, qzeros, what)


@pytest.mark.parametrize(
    "K,N,G", [(32, 8, 32), (128, 24, 128), (384, 264, 128), (384, 272, 128), (40, 16, 40)] + ODD_GROUPS
)
def test_gemv_covers_tails_and_group_sizes(awq, K, N, G):
    qweight, scales, qzeros = (fenced(t) for t in random_awq(K, N, G, seed=10))
    x = fenced(torch.randn(2, K, generator=torch.Generator().manual_seed(K)).half().to(DEVICE))
    what = f"K={K}, N={N}, G={G}: "
    assert_gemv_close(gemv(awq, x, qweight, scales, qzeros, what), x, qweight, scales, qzeros, what)


def test_gemv_never_materialises_the_dequantized_weights(awq, monkeypatch):
    """The fused kernel keeps each tile of W in registers: the call allocates its output (and, with a split K, the
    fp32 partial sums), never W or the unpacked q, whatever computes them (torch, awq_dequantize, another kernel)."""
    K, N, G = 1024, 256, 128
    qweight, scales, qzeros = random_awq(K, N, G, seed=11)
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(11)).half().to(DEVICE)
    called = []
    dequantize_ = awq.awq_dequantize
    monkeypatch.setattr(awq, "awq_dequantize", lambda *a, **k: called.append(1) or dequantize_(*a, **k))
    if DEVICE == "cuda":
        awq.awq_gemv(x, qweight, scales, qzeros)  # compile (and autotune) outside the watched call
    got, call = watched(awq.awq_gemv, x, qweight, scales, qzeros, names=("x", "qweight", "scales", "qzeros"))
    total = sum(c.nbytes for c in call.created)
    if total >= K * N:  # half the bytes of W in fp16
        largest = max(call.created, key=lambda c: c.nbytes)
        pytest.fail(
            f"awq_gemv materialises W: one call created {total} bytes of tensors (largest: {largest}) where W in "
            f"fp16 is {2 * K * N}" + (", and it called awq_dequantize" if called else "") + ". A fused kernel "
            "unpacks each tile in registers, multiplies and accumulates: it never writes W (or q) to memory",
            pytrace=False,
        )
    assert call.launches, "no Triton kernel ran during awq_gemv: x @ W must be computed by a fused Triton kernel"
    assert_gemv_close(got, x, qweight, scales, qzeros)


@pytest.mark.parametrize("dtype,M", [(torch.float16, 1), (torch.bfloat16, 1), (torch.float16, 3)], ids=str)
def test_gemv_accumulates_in_fp32(awq, dtype, M):
    """On data where every product and every partial sum is exact in fp32 (small integers times powers of two), a
    kernel that accumulates in fp32 makes one error: its final rounding to the dtype, within one ulp of the output.
    Kept in fp16 or bf16, the running sums of K = 8192 rows are rounded at every step and drift by many ulps."""
    K, N, G = 8192, 128, 128
    generator = torch.Generator().manual_seed(16)
    qweight, _, qzeros = random_awq(K, N, G, seed=16)
    scales = (2.0 ** -torch.randint(4, 8, (K // G, N), generator=generator).float()).to(dtype).to(DEVICE)
    x = (torch.randint(-4, 5, (M, K), generator=generator) * 0.25).to(dtype).to(DEVICE)
    got = gemv(awq, x, qweight, scales, qzeros, f"K={K}, {dtype}: ")
    exact = x.double() @ reference_dequant(qweight, scales, qzeros).double()  # every term and sum exact
    ulp = torch.ldexp(torch.ones_like(exact), torch.frexp(exact).exponent - MANTISSA_BITS[dtype])
    ulps = (got.double() - exact).abs() / ulp
    bad = ~(ulps <= 1)  # NaN counts as bad
    if not bool(bad.any()):
        return
    m, n = bad.nonzero()[0].tolist()
    message = (
        f"K={K}, {dtype}, M={M}: {int(bad.sum())} of {bad.numel()} outputs are more than one ulp from the exact "
        f"x @ W (up to {ulps.nan_to_num(float('inf')).max().item():.3g} ulps; first at [{m}, {n}]: expected "
        f"{exact[m, n].item():.8g}, got {got[m, n].item():.8g}). Every product and partial sum is exact in fp32 here, "
        "so a kernel that accumulates in fp32 is off by its final rounding only."
    )
    if bool(ulps.isfinite().all()) and ulps.max() <= 2**10:
        message += (
            f" Probably the sums were accumulated in {str(dtype).removeprefix('torch.')}: keep the accumulator in "
            "fp32 (tl.zeros(..., dtype=tl.float32)), add each tile's products to it in fp32, and round only the "
            "final result."
        )
    else:
        message += gemv_diagnosis(got, x, qweight, scales, qzeros)
    pytest.fail(message, pytrace=False)


def test_gemv_keeps_the_range_of_bf16(awq):
    """bf16 has fp32's exponent range: |x| up to 3e5 and scales down to 1e-8 (fp16 holds neither) multiply right."""
    K, N, G = 256, 64, 64
    qweight, _, qzeros = random_awq(K, N, G, seed=18)
    scales = wide_range_bf16((K // G, N), -8, -6, seed=18).abs()
    x = wide_range_bf16((2, K), 3, 5.5, seed=19)
    what = "bf16 x up to 3e5, scales from 1e-8 to 1e-6: "
    assert_gemv_close(gemv(awq, x, qweight, scales, qzeros, what), x, qweight, scales, qzeros, what)


STRIDED_X = {
    "column-major": lambda x: x.t().contiguous().t(),
    "sliced": lambda x: strided(x, "sliced"),
    "every other row": lambda x: torch.stack([x, torch.full_like(x, float("nan"))], 1).flatten(0, 1)[::2],
}


@pytest.mark.parametrize("layout", ["x column-major", "x sliced", "x every other row", "weights column-major",
                                    "weights sliced"])  # fmt: skip
def test_gemv_accepts_any_strides(awq, layout):
    """x, qweight, scales and qzeros may be views with any strides (transposed, a window of a wider matrix, a slice
    of rows)."""
    qweight, scales, qzeros = random_awq(128, 64, 32, seed=20)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(20)).half().to(DEVICE)
    part, kind = layout.split(" ", 1)
    args = (
        (STRIDED_X[kind](x), qweight, scales, qzeros)
        if part == "x"
        else (x, *(strided(t, kind) for t in (qweight, scales, qzeros)))
    )
    strides = f"strides {list(args[0].stride())}" if part == "x" else "views"
    what = f"{layout} ({strides}: honour the strides, or call .contiguous()): "
    assert_gemv_close(gemv(awq, *args, what), x, qweight, scales, qzeros, what)


BAD_X = {  # x, and what the error message must mention (any of these words)
    "x float32 with fp16 scales": (lambda: torch.randn(1, 128), ("dtype", "float", "half")),
    "x float16 with bf16 scales": (lambda: torch.randn(1, 128).half(), ("dtype", "float", "half")),
    "x columns disagree with K": (lambda: torch.randn(1, 96).half(), None),
    "x 1-d": (lambda: torch.randn(128).half(), None),
    "x with no rows (M = 0)": (lambda: torch.randn(0, 128).half(), None),
    "x with 17 rows (M > 16)": (lambda: torch.randn(17, 128).half(), None),
    "x on another device": (lambda: torch.randn(1, 128, device="meta").half(), "device"),
}


@pytest.mark.parametrize("mistake", BAD_X)
def test_gemv_rejects_bad_x(awq, mistake):
    """x [M, K] with 1 <= M <= 16, in the scales' dtype, on the weights' device; otherwise a clear error, up front."""
    qweight, scales, qzeros = random_awq(128, 64, 32, torch.bfloat16 if "bf16" in mistake else torch.float16, 12)
    make, names = BAD_X[mistake]
    x = make()
    x = x if x.device.type == "meta" else x.to(DEVICE)
    expect_error((ValueError, TypeError), lambda: awq.awq_gemv(x, qweight, scales, qzeros), f"awq_gemv with {mistake}",
                 names)  # fmt: skip


@pytest.mark.parametrize("mistake", BAD_WEIGHTS)
def test_gemv_rejects_bad_weights(awq, mistake):
    """The same validation of the weights as awq_dequantize."""
    qweight, scales, qzeros = random_awq(128, 64, 32, seed=8)
    transform, names = BAD_WEIGHTS[mistake]
    bad = transform(qweight, scales, qzeros)
    x = torch.randn(1, 128).half().to(DEVICE)
    expect_error((ValueError, TypeError), lambda: awq.awq_gemv(x, *bad), f"awq_gemv with {mistake}", names)


@pytest.mark.gpu
def test_gemv_never_allocates_the_dequantized_matrix(awq):
    K, N, G = 4096, 4096, 128
    qweight, scales, qzeros = random_awq(K, N, G, seed=13)
    x = torch.randn(1, K, device="cuda").half()
    awq.awq_gemv(x, qweight, scales, qzeros)  # compile outside the measurement
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    awq.awq_gemv(x, qweight, scales, qzeros)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < K * N * 2 // 4, (
        f"awq_gemv allocated {extra / 2**20:.1f} MiB beyond its inputs; the dequantized W would be "
        f"{K * N * 2 / 2**20:.0f} MiB: the fused kernel must keep W in registers"
    )


# --- speed (GPU): fractions of the copy bandwidth and speedups, thresholds in thresholds.toml -------------------


def fresh_awq(K, N, G):
    return lambda: (random_awq(K, N, G, seed=int(torch.randint(1 << 30, ()))), {})


@pytest.mark.speed
@pytest.mark.parametrize("K,N", [(4096, 4096), (8192, 28672)], ids=lambda v: str(v))
def test_dequantize_speed_as_a_fraction_of_copy_bandwidth(awq, speed, K, N):
    G = 128
    timing = speed.bench(
        awq.awq_dequantize,
        fresh_awq(K, N, G),
        rounds=20,
        warmup=3,
        check=lambda out, *inputs: assert_dequant_equal(out, *inputs, what="timed run: "),
    )
    moved = K * N // 2 + (K // G) * N // 2 + (K // G) * N * 2 + K * N * 2  # packed q, packed z, scales, output
    fraction = speed.bandwidth_fraction(timing, moved)
    speed.judge(
        f"dequant_roofline_{K}x{N}",
        fraction,
        roofline=fraction,
        detail=f"{timing.median * 1e6:.1f} us, {moved / timing.median / 1e9:.0f} GB/s",
    )


@pytest.mark.speed
@pytest.mark.points(2)
def test_gemv_at_batch_1_reads_the_packed_weights_near_copy_bandwidth(awq, speed):
    K, N, G = 8192, 28672, 128

    def setup():
        (qweight, scales, qzeros), _ = fresh_awq(K, N, G)()
        return (torch.randn(1, K, device="cuda").half(), qweight, scales, qzeros), {}

    def dequantize_then_matmul(x, qweight, scales, qzeros):
        return x @ awq.awq_dequantize(qweight, scales, qzeros)

    def check(out, *inputs):
        assert_gemv_close(out, *inputs, what="timed run: ")

    baseline = speed.time(dequantize_then_matmul, setup, rounds=10, warmup=2)
    timing = speed.bench(awq.awq_gemv, setup, rounds=30, warmup=3, check=check)
    moved = K * N // 2 + (K // G) * N // 2 + (K // G) * N * 2 + K * 2 + N * 2
    fraction = speed.bandwidth_fraction(timing, moved)
    detail = f"{timing.median * 1e6:.1f} us; dequantize + matmul {baseline.median * 1e6:.1f} us"
    speed.judge("gemv_speedup_over_dequant_matmul", baseline.median / timing.median, detail=detail)
    speed.judge("gemv_roofline_8192x28672", fraction, roofline=fraction, detail=detail)
