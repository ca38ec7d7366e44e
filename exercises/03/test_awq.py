"""Exercise 03 specification: AWQ int4 weights (AutoAWQ's "GEMM" layout), dequantized and multiplied in Triton.

The reference below is written from the format alone, independently of any student or solution code. Correctness runs
everywhere (under the Triton interpreter without a GPU, on small shapes); speed is judged on a GPU as a fraction of
the copy bandwidth measured in the same session, or as a speedup over a baseline timed in the same test.
"""

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of a word holds column 8c + ORDER[i]
INVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # column j sits in nibble INVERSE_ORDER[j]: reading it as ORDER is a bug
DTYPES = [torch.float16, torch.bfloat16]


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


def reference_dequant(qweight, scales, qzeros, *, order=ORDER, mask=True, zeros=True, group_rows="interleave"):
    q, z = reference_unpack(qweight, order, mask), reference_unpack(qzeros, order, mask)
    if zeros == "eight":  # the symmetric-int4 habit: a constant zero point of 8
        z = torch.full_like(z, 8)
    group = qweight.shape[0] // scales.shape[0]
    if group_rows == "interleave":  # row k uses group k // G
        z, s = z.repeat_interleave(group, 0), scales.repeat_interleave(group, 0)
    else:  # row k uses group k % (K / G): the groups tiled instead of repeated
        z, s = z.repeat(group, 1), scales.repeat(group, 1)
    return ((q - z) if zeros else q).to(scales.dtype) * s


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
}


def random_awq(K, N, G, dtype=torch.float16, seed=0, device=DEVICE):
    """Packed words over the full int32 range (half of them negative), scales of a realistic size."""
    generator = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-(2**31), 2**31, (K, N // 8), generator=generator, dtype=torch.int64).int()
    qzeros = torch.randint(-(2**31), 2**31, (K // G, N // 8), generator=generator, dtype=torch.int64).int()
    scales = (torch.rand(K // G, N, generator=generator) * 0.02 + 0.001).to(dtype)
    return qweight.to(device), scales.to(device), qzeros.to(device)


def assert_dequant_equal(got, qweight, scales, qzeros, what=""):
    expected = reference_dequant(qweight, scales, qzeros)
    assert got.dtype == scales.dtype, f"output dtype must be the scales' dtype {scales.dtype}, got {got.dtype}"
    assert got.shape == expected.shape, f"output must be [K, N] = {list(expected.shape)}, got {list(got.shape)}"
    # Bit-exact, except that the Triton interpreter truncates every fp32 -> bf16 conversion (a GPU rounds to nearest
    # even): about a fifth of a correct kernel's bf16 outputs are one ulp off there.
    one_ulp = INTERPRETED and got.dtype == torch.bfloat16
    same = torch.isclose(got.float(), expected.float(), rtol=2**-7 if one_ulp else 0.0, atol=0.0)
    if bool(same.all()):
        return
    k, n = (~same).nonzero()[0].tolist()
    message = (
        f"{what}dequantized weights differ at {int((~same).sum())} of {same.numel()} elements; first at [k={k}, "
        f"n={n}]: expected {expected[k, n].item():.6g}, got {got[k, n].item():.6g}."
    )
    if bool(got.isnan().any()):
        message += " Some outputs were never written (NaN poison): check the masks of the last tiles."
    for mistake, imitation in MISTAKES.items():
        if torch.equal(got, reference_dequant(qweight, scales, qzeros, **imitation)):
            message += f" Your output is exactly what this mistake gives: {mistake}."
    pytest.fail(message, pytrace=False)


GUARD = 1024  # elements of poison past the end of every fresh buffer, checked after the test


@pytest.fixture
def poisoned(monkeypatch):
    """Fresh float outputs come back full of NaN, so an element the kernel never writes cannot pass as a zero; and
    each buffer is followed by a guarded band, so a kernel that writes past its end (a missing mask) is caught
    instead of corrupting memory."""
    empty, bands = torch.empty, []

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**31) if t.dtype == torch.int32 else 0)

    def guarded_empty(*size, dtype=None, device=None, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        count = 1
        for dim in shape:
            count *= dim
        flat = poison(empty(count + GUARD, dtype=dtype, device=device, **kwargs))
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
        same = torch.equal(flat[count:].isnan(), band.isnan()) and torch.equal(
            flat[count:].nan_to_num(), band.nan_to_num()
        )
        assert same, f"a kernel wrote past the end of a {count}-element output: mask the loads and stores of the tail"


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
    with pytest.raises(ValueError):
        awq.pack_awq(values.to(DEVICE))


# --- dequantization ----------------------------------------------------------------------------------------------


@pytest.mark.points(2)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [32, 64, 128, "K"])
def test_dequantize_is_bit_exact(awq, poisoned, group, dtype):
    K, N = 256, 136  # N / 8 = 17 words per row: not a multiple of any power-of-two tile
    G = K if group == "K" else group
    qweight, scales, qzeros = random_awq(K, N, G, dtype, seed=3)
    inputs = [t.clone() for t in (qweight, scales, qzeros)]
    got = awq.awq_dequantize(qweight, scales, qzeros)
    assert_dequant_equal(got, qweight, scales, qzeros, what=f"G={G}, {dtype}: ")
    for before, after in zip(inputs, (qweight, scales, qzeros), strict=True):
        assert torch.equal(before, after), "awq_dequantize modified its inputs"


@pytest.mark.parametrize("K,N,G", [(32, 8, 32), (96, 24, 32), (160, 200, 32), (64, 1032, 64), (40, 16, 40)])
def test_dequantize_covers_tails_of_every_size(awq, poisoned, K, N, G):
    qweight, scales, qzeros = random_awq(K, N, G, seed=4)
    assert_dequant_equal(awq.awq_dequantize(qweight, scales, qzeros), qweight, scales, qzeros, f"K={K}, N={N}: ")


def test_dequantize_subtracts_the_zero_point_of_each_group(awq):
    qweight, scales, _ = random_awq(64, 16, 32, seed=5)
    # Group 0's zero points are 3, group 1's 12, in every column: a kernel that subtracts a constant 8 (the symmetric
    # int4 habit) or group 0's zeros everywhere cannot pass.
    qzeros = torch.tensor([[0x33333333] * 2, [0xCCCCCCCC - 2**32] * 2], dtype=torch.int32, device=DEVICE)
    assert_dequant_equal(awq.awq_dequantize(qweight, scales, qzeros), qweight, scales, qzeros, "zero points 3 and 12: ")


def test_dequantize_sign_of_the_top_nibble(awq):
    qweight = torch.full((32, 1), -(2**31), dtype=torch.int32, device=DEVICE)  # only bit 31 set: nibble 7 holds 8
    scales = torch.ones(1, 8, dtype=torch.float16, device=DEVICE)
    qzeros = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    got = awq.awq_dequantize(qweight, scales, qzeros)
    assert_dequant_equal(got, qweight, scales, qzeros, "word 0x80000000 (q = 8 in column 7): ")


def test_dequantize_uses_the_group_of_each_row(awq):
    qweight, _, qzeros = random_awq(128, 32, 32, seed=6)
    scales = torch.arange(1, 5, dtype=torch.float16, device=DEVICE)[:, None].expand(4, 32).contiguous()
    assert_dequant_equal(awq.awq_dequantize(qweight, scales, qzeros), qweight, scales, qzeros, "scale = group + 1: ")


def test_dequantize_accepts_non_contiguous_inputs_or_rejects_them_clearly(awq):
    qweight, scales, qzeros = random_awq(64, 64, 32, seed=7)
    strided = qweight.t().contiguous().t()  # same values, column-major
    try:
        got = awq.awq_dequantize(strided, scales, qzeros)
    except ValueError as error:
        assert "contiguous" in str(error), f"a rejection of a non-contiguous qweight must say so, got: {error}"
        return
    assert_dequant_equal(got, qweight, scales, qzeros, "column-major qweight: ")


BAD_WEIGHTS = {
    "qweight float": lambda qw, s, qz: (qw.float(), s, qz),
    "scales float32": lambda qw, s, qz: (qw, s.float(), qz),
    "qzeros int64": lambda qw, s, qz: (qw, s, qz.long()),
    "qzeros rows disagree": lambda qw, s, qz: (qw, s, qz[:2]),
    "scales columns disagree": lambda qw, s, qz: (qw, s[:, :32], qz),
    "group does not divide K": lambda qw, s, qz: (qw, s[:3], qz[:3]),  # K = 128 over 3 scale rows
    "qweight 1-d": lambda qw, s, qz: (qw.flatten(), s, qz),
    "mixed devices": lambda qw, s, qz: (qw, s.to("meta"), qz),
}


@pytest.mark.parametrize("mistake", BAD_WEIGHTS)
def test_dequantize_rejects_bad_input(awq, mistake):
    qweight, scales, qzeros = random_awq(128, 64, 32, seed=8)
    with pytest.raises((ValueError, TypeError)):
        awq.awq_dequantize(*BAD_WEIGHTS[mistake](qweight, scales, qzeros))


# --- the fused GEMV ----------------------------------------------------------------------------------------------


def assert_gemv_close(got, x, qweight, scales, qzeros, what=""):
    """Against fp32 x @ W, within a bound derived from the roundings a correct kernel may do.

    With u the unit roundoff of the dtype (2^-11 for fp16, 2^-8 for bf16): W itself may or may not be rounded to the
    dtype before the product (u |x| @ |W|), the fp32 accumulation of K terms of at most |x| 15 |s| adds a few K 2^-24
    of that, and the output is rounded once (one ulp allowed: 2u |y|).
    """
    weights = reference_dequant(qweight, scales, qzeros).float()
    expected = x.float() @ weights
    group = qweight.shape[0] // scales.shape[0]
    unit = 2.0**-11 if x.dtype == torch.float16 else 2.0**-8
    accumulation = (
        4 * x.shape[1] * 2.0**-24 * (x.float().abs() @ (15 * scales.float().abs().repeat_interleave(group, 0)))
    )
    bound = accumulation + unit * (x.float().abs() @ weights.abs()) + 2 * unit * expected.abs() + 1e-6
    assert got.dtype == x.dtype, f"output dtype must be x's dtype {x.dtype}, got {got.dtype}"
    assert got.shape == expected.shape, f"output must be [M, N] = {list(expected.shape)}, got {list(got.shape)}"
    error = (got.float() - expected).abs()
    bad = ~(error <= bound)  # NaN counts as bad
    if bool(bad.any()):
        m, n = bad.nonzero()[0].tolist()
        pytest.fail(
            f"{what}x @ W differs from the fp32 reference at {int(bad.sum())} of {bad.numel()} outputs; first at "
            f"[{m}, {n}]: expected {expected[m, n].item():.6g}, got {got[m, n].item():.6g} (allowed error "
            f"{bound[m, n].item():.3g}). Accumulate in fp32 and apply each group's zero and scale.",
            pytrace=False,
        )


@pytest.mark.points(2)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 3, 16])
def test_gemv_matches_fp32_reference(awq, poisoned, M, dtype):
    K, N, G = 256, 144, 64  # N: a tail in every tile width; a multiple of 16, as fast GPU paths may want
    qweight, scales, qzeros = random_awq(K, N, G, dtype, seed=9)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype).to(DEVICE)
    inputs = [t.clone() for t in (x, qweight, scales, qzeros)]
    assert_gemv_close(awq.awq_gemv(x, qweight, scales, qzeros), x, qweight, scales, qzeros, f"M={M}, {dtype}: ")
    for before, after in zip(inputs, (x, qweight, scales, qzeros), strict=True):
        assert torch.equal(before, after), "awq_gemv modified its inputs"


@pytest.mark.parametrize("K,N,G", [(32, 8, 32), (128, 24, 128), (384, 264, 128), (384, 272, 128), (40, 16, 40)])
def test_gemv_covers_tails_and_group_sizes(awq, poisoned, K, N, G):
    qweight, scales, qzeros = random_awq(K, N, G, seed=10)
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(K)).half().to(DEVICE)
    assert_gemv_close(awq.awq_gemv(x, qweight, scales, qzeros), x, qweight, scales, qzeros, f"K={K}, N={N}, G={G}: ")


def test_gemv_does_not_go_through_dequantize(awq, monkeypatch):
    qweight, scales, qzeros = random_awq(64, 32, 32, seed=11)
    x = torch.randn(1, 64).half().to(DEVICE)

    def refuse(*args, **kwargs):
        raise AssertionError("awq_gemv called awq_dequantize: the fused kernel must never write W to memory")

    monkeypatch.setattr(awq, "awq_dequantize", refuse)
    assert_gemv_close(awq.awq_gemv(x, qweight, scales, qzeros), x, qweight, scales, qzeros)


@pytest.mark.parametrize(
    "mistake", ["x float32 with fp16 scales", "x columns disagree with K", "x 1-d", "x on another device"]
)
def test_gemv_rejects_bad_input(awq, mistake):
    qweight, scales, qzeros = random_awq(128, 64, 32, seed=12)
    x = {
        "x float32 with fp16 scales": torch.randn(1, 128),
        "x columns disagree with K": torch.randn(1, 96).half(),
        "x 1-d": torch.randn(128).half(),
        "x on another device": torch.randn(1, 128, device="meta").half(),
    }[mistake]
    x = x if x.device.type == "meta" else x.to(DEVICE)
    with pytest.raises((ValueError, TypeError)):
        awq.awq_gemv(x, qweight, scales, qzeros)


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
