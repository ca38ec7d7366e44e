"""Exercise 08 specification: post-training quantization (RTN, AWQ, GPTQ) of the course model, and its export formats.

The algorithms are checked on small hand-made or seeded matrices against references written in this file from their
definitions (GPTQ against a float64 textbook implementation); on the course model's own calibration activations
(fixtures/quantization.py: held-out standard-library text the model never trained on); and end to end, by the
perplexity each method leaves on held-out evaluation text. The formats are checked against independent
implementations: the `gguf` package's reference quantizers (where installed), torch's float8_e4m3fn conversion, and
exercise 03's AWQ layout, read back by a reference written from the format (and, where the instructors' solutions are
present, by exercise 03's reference kernels; on a GPU, the exported course model decodes through its fused GEMV).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fixtures.checks import expect_error
from fixtures.llama import Llama
from fixtures.quantization import LINEARS, course_llama, decoder_layer, forward, text_windows

THRESHOLDS = Path(__file__).resolve().parent / "thresholds.toml"
COURSE_BITS, COURSE_GROUP = 4, 128  # the perplexity table's setting
CALIBRATION_WINDOWS, EVALUATION_WINDOWS, WINDOW = 16, 64, 256  # 4k calibration tokens, 16k evaluation tokens


@pytest.fixture
def quant(impl):
    return impl("quantize")


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_no_grad():
    """One CPU thread: GPTQ's column loop is thousands of small operations, and on a CPU shared with other jobs a
    second OpenMP thread made them sixty times slower (threads spin-waiting for each other), not faster. Nothing
    here needs gradients."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(threads)


# Results of the code under test that several tests read (the quantized course model per method): computed once per
# session and module, never modified by a test.
_RESULTS: dict = {}


def once(owner: str, key, make):
    key = (owner, key)
    if key not in _RESULTS:
        _RESULTS[key] = make()
    return _RESULTS[key]


# --- references written from the definitions ----------------------------------------------------------------------


def reference_params(groups: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """groups [..., G] -> (scale as an fp16 value, zero point) of the asymmetric min/max quantizer, in groups' dtype."""
    top = 2**bits - 1
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low).clamp_min(1e-5) / top).half().to(groups.dtype)
    return scale, (-torch.round(low / scale)).clamp(0, top)


def reference_rtn(weight: torch.Tensor, bits: int, group: int):
    """(codes, scales fp16, zeros) as float32 / fp16 tensors [N, K], [N, K/G], [N, K/G]."""
    N, K = weight.shape
    groups = weight.float().reshape(N, K // group, group)
    scale, zero = reference_params(groups, bits)
    codes = (torch.round(groups / scale[..., None]) + zero[..., None]).clamp(0, 2**bits - 1)
    return codes.reshape(N, K), scale.half(), zero


def dequantized(codes, scales, zeros, group: int) -> torch.Tensor:
    return (codes.float() - zeros.float().repeat_interleave(group, 1)) * scales.float().repeat_interleave(group, 1)


def as_quantized(quant, weight, bits=4, group=128):
    """A QuantizedTensor of the reference RTN, built without the student's quantizers (for the exporters' tests)."""
    codes, scales, zeros = reference_rtn(weight, bits, group)
    return quant.QuantizedTensor(codes.to(torch.uint8), scales, zeros.to(torch.uint8), bits, group)


def check_quantized(result, shape, bits: int, group: int, what: str):
    """The result's types, shapes and ranges; returns (codes, scales, zeros) as float32, fp16, float32."""
    N, K = shape
    assert type(result).__name__ == "QuantizedTensor", f"{what}: return a QuantizedTensor, got {type(result).__name__}"
    codes, scales, zeros = result.codes, result.scales, result.zeros
    assert result.bits == bits and result.group_size == group, (
        f"{what}: the result must record bits={bits} and group_size={group}, got {result.bits} and {result.group_size}"
    )
    if tuple(scales.shape) in {(N // group, K), (K, N // group)} - {(N, K // group)}:
        pytest.fail(
            f"{what}: scales have shape {list(scales.shape)}, one per group of G output channels: groups along the "
            f"wrong axis. A group is G consecutive input channels (columns) of one row: scales must be [N, K / G] = "
            f"{[N, K // group]}",
            pytrace=False,
        )
    for name, t, dtype, size in (("codes", codes, torch.uint8, (N, K)), ("scales", scales, torch.float16,
                                 (N, K // group)), ("zeros", zeros, torch.uint8, (N, K // group))):  # fmt: skip
        assert t.dtype == dtype and tuple(t.shape) == size, (
            f"{what}: {name} must be {dtype} {list(size)}, got {t.dtype} {list(t.shape)}"
        )
    return codes.float(), scales, zeros.float()


def output_error(weight, fake, x) -> float:
    """Mean over tokens and outputs of the squared change of x @ W.T."""
    x = x.reshape(-1, x.shape[-1]).double()
    return float(((x @ (weight.double() - fake.double()).T) ** 2).mean())


# --- round to nearest ----------------------------------------------------------------------------------------------


def test_rtn_exact_codes_scales_and_zero_points_on_a_hand_made_matrix(quant):
    weight = torch.tensor(
        [
            [0.0, 1.5, 3.0, 15.0, -1.0, 0.0, 2.0, 0.5],  # group (-1 .. 2): s = 0.2, z = 5
            [-7.5, 0.0, 2.5, 7.5, 0.0, 30.0, 10.0, 20.0],  # group (0 .. 30): s = 2, z = 0
        ]
    )
    result = quant.quantize_rtn(weight, bits=4, group_size=4)
    codes, scales, zeros = check_quantized(result, (2, 8), 4, 4, "quantize_rtn 4-bit, G=4")
    # s = (max - min) / 15 rounded to fp16; z = -round(min / s); q = round(w / s) + z (torch.round: half to even).
    expected_scales = torch.tensor([[1.0, 3 / 15], [1.0, 2.0]]).half()
    expected_zeros = torch.tensor([[0.0, 5.0], [8.0, 0.0]])  # -round(-1 / fp16(0.2)) = 5; -round(-7.5) = 8 (even)
    s = torch.tensor([3 / 15]).half().float().item()
    expected_codes = torch.tensor(
        [
            [0.0, 2.0, 3.0, 15.0, round(-1 / s) + 5, 5.0, round(2 / s) + 5, round(0.5 / s) + 5],
            [0.0, 8.0, 10.0, 15.0, 0.0, 15.0, 5.0, 10.0],  # round(2.5) = 2 (to even), + 8; round(7.5) + 8 = 16 -> 15
        ]
    )
    assert torch.equal(scales, expected_scales), f"scales: expected {expected_scales.tolist()}, got {scales.tolist()}"
    assert torch.equal(zeros, expected_zeros), f"zero points: expected {expected_zeros.tolist()}, got {zeros.tolist()}"
    assert torch.equal(codes, expected_codes), (
        f"codes: expected {expected_codes.tolist()}, got {codes.tolist()} (q = round(w / s) + z with torch.round, "
        "half to even, and s the fp16 scale)"
    )


def test_rtn_clamps_the_zero_point_and_the_codes_at_both_ends(quant):
    weight = torch.tensor(
        [
            [2.0, 3.0, 4.0, 17.0],  # all positive: -round(min / s) = -2 -> z = 0, and then q(17) = 17 -> 15
            [-17.0, -4.0, -3.0, -2.0],  # all negative: -round(min / s) = 17 -> z = 15, and then q(-17) = -2 -> 0
        ]
    )
    codes, scales, zeros = check_quantized(quant.quantize_rtn(weight, 4, 4), (2, 4), 4, 4, "quantize_rtn")
    if zeros.max() > 15:
        pytest.fail(f"zero points {zeros.flatten().tolist()}: zero point not clamped to 0 .. 15 (a group all of one "
                    "sign puts -round(min / s) outside the range)", pytrace=False)  # fmt: skip
    if bool((codes == 254).any()) or bool((codes > 15).any()):
        pytest.fail(f"codes {codes.tolist()}: codes not clamped to 0 .. 15 after adding the zero point (a code below "
                    "0 wraps around in uint8)", pytrace=False)  # fmt: skip
    assert zeros.flatten().tolist() == [0.0, 15.0], f"zero points must be clamped to [0, 15], got {zeros.tolist()}"
    assert codes.tolist() == [[2.0, 3.0, 4.0, 15.0], [0.0, 11.0, 12.0, 13.0]], (
        f"codes must be clamp(round(w / s) + z, 0, 15) = [[2, 3, 4, 15], [0, 11, 12, 13]], got {codes.tolist()}"
    )


def test_rtn_groups_run_along_the_input_channels_of_each_row(quant):
    N, K, G = 32, 64, 16  # square groups of the transposed matrix would have the same count: check the values
    weight = torch.randn(N, K, generator=torch.Generator().manual_seed(1)) * torch.logspace(-2, 1, N)[:, None]
    result = quant.quantize_rtn(weight, 4, G)
    codes, scales, zeros = check_quantized(result, (N, K), 4, G, "quantize_rtn")
    expected_codes, expected_scales, expected_zeros = reference_rtn(weight, 4, G)
    if not torch.equal(scales, expected_scales):
        wrong = reference_rtn(weight.T.contiguous(), 4, G)[1]  # [K, N / G]: groups of G output channels
        if torch.equal(scales.float().flatten().sort()[0], wrong.float().flatten().sort()[0]):
            pytest.fail("scales come from groups of G output channels: groups along the wrong axis (a group is G "
                        "consecutive input channels of one row)", pytrace=False)  # fmt: skip
        bad = (scales != expected_scales).nonzero()[0].tolist()
        pytest.fail(f"scale of row {bad[0]}, group {bad[1]}: expected {expected_scales[bad[0], bad[1]].item():.6g} "
                    f"(fp16 of (max - min) / 15 over w[{bad[0]}, {bad[1] * G}:{bad[1] * G + G}]), got "
                    f"{scales[bad[0], bad[1]].item():.6g}", pytrace=False)  # fmt: skip
    assert torch.equal(zeros, expected_zeros), "zero points differ from z = clamp(-round(min / s), 0, 15)"
    assert torch.equal(codes, expected_codes), "codes differ from q = clamp(round(w / s) + z, 0, 15)"


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 64), (8, 256)])
def test_rtn_round_trip_error_is_at_most_half_a_step(quant, bits, group):
    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(bits * group)) * 0.05
    result = quant.quantize_rtn(weight, bits, group)
    codes, scales, zeros = check_quantized(result, (48, 256), bits, group, f"quantize_rtn {bits}-bit, G={group}")
    step = scales.float().repeat_interleave(group, 1)
    error = (weight - dequantized(codes, scales, zeros, group)).abs()
    # Half a step, plus the slack of rounding s to fp16: the top code may then clip by up to (2^bits - 1) 2^-11 steps.
    assert bool((error <= (0.5 + (2**bits - 1) * 2**-11 + 1e-4) * step).all()), (
        f"|w - (q - z) s| reaches {float((error / step).max()):.3f} steps (s) somewhere; round to nearest allows half "
        "a step"
    )
    expected = reference_rtn(weight, bits, group)
    assert torch.equal(codes, expected[0]) and torch.equal(zeros, expected[2]), (
        f"{bits}-bit codes or zero points differ from the convention (top = 2^bits - 1 = {2**bits - 1})"
    )
    assert torch.equal(result.dequantize(), dequantized(codes, scales, zeros, group)), (
        "QuantizedTensor.dequantize() must give (codes - zeros) * scales"
    )


def test_rtn_accepts_any_float_dtype(quant):
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    codes, scales, zeros = check_quantized(quant.quantize_rtn(weight, 4, 32), (16, 64), 4, 32, "bf16 weight")
    expected = reference_rtn(weight.float(), 4, 32)
    assert torch.equal(codes, expected[0]) and torch.equal(scales, expected[1]), (
        "a bf16 weight must give the codes of its float32 values"
    )


BAD_RTN = {
    "group size 48 does not divide K = 64": (ValueError, lambda q, w: q.quantize_rtn(w, 4, 48)),
    "bits 3": (ValueError, lambda q, w: q.quantize_rtn(w, 3, 32)),
    "bits 16": (ValueError, lambda q, w: q.quantize_rtn(w, 16, 32)),
    "a 1-d weight": (TypeError, lambda q, w: q.quantize_rtn(w[0], 4, 32)),
    "an integer weight": (TypeError, lambda q, w: q.quantize_rtn(w.long(), 4, 32)),
}


@pytest.mark.parametrize("bad", BAD_RTN)
def test_rtn_rejects_bad_input(quant, bad):
    error, call = BAD_RTN[bad]
    weight = torch.randn(8, 64)
    expect_error(error, lambda: call(quant, weight), f"quantize_rtn with {bad}")


# --- GPTQ ----------------------------------------------------------------------------------------------------------


def test_hessian_is_twice_the_mean_outer_product_of_the_inputs(quant):
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(3))
    flat = x.reshape(15, 16).double()
    expected = 2 * flat.T @ flat / 15
    got = quant.hessian(x)
    assert got.dtype == torch.float32 and got.shape == (16, 16), f"float32 [16, 16] expected, got {got.dtype} " \
                                                                 f"{list(got.shape)}"  # fmt: skip
    if torch.allclose(got.double(), expected / 2, rtol=1e-5):
        pytest.fail("hessian is X^T X / n: the factor 2 is missing (H = 2 X^T X / n)", pytrace=False)
    if torch.allclose(got.double(), expected * 15, rtol=1e-5):
        pytest.fail("hessian is 2 X^T X, not divided by the token count n", pytrace=False)
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-6), "hessian must be 2 X^T X / n over all tokens"
    expect_error(ValueError, lambda: quant.hessian(x[:, :0]), "hessian of no tokens")


def textbook_gptq(weight, hess, bits, group, act_order, damp=0.01, mistake=None):
    """GPTQ in float64, one column at a time, full updates: (codes [N, K], margins). `mistake` names a wrong variant,
    to recognize it in a failing result. margins: how close the data came to a rounding boundary, where float32 and
    float64 may round differently: "codes" in steps, "scales" in fp16 steps."""
    W, H = weight.double().clone(), hess.double().clone()
    N, K = W.shape
    top = 2**bits - 1
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    scales, zeros = torch.zeros(N, K // group, dtype=torch.float64), torch.zeros(N, K // group, dtype=torch.float64)
    order = torch.arange(K)
    if act_order:
        scales[:], zeros[:] = reference_params(W.reshape(N, K // group, group), bits)
        order = torch.argsort(H.diagonal(), descending=True, stable=True)
    W, H = W[:, order], H[order][:, order]
    if mistake != "no damping":
        H += damp * H.diagonal().mean() * torch.eye(K, dtype=torch.float64)
    inverse = torch.linalg.inv(H)
    factor = {
        "the Cholesky factor of H instead of H^-1": torch.linalg.cholesky(H, upper=True),
        "H^-1 itself instead of its Cholesky factor": inverse,
    }.get(mistake, torch.linalg.cholesky(inverse, upper=True))
    codes = torch.zeros(N, K, dtype=torch.float64)
    margins = {"codes": math.inf, "scales": math.inf}
    for i in range(K):
        column = int(order[i])
        g = column // group
        if not act_order and column % group == 0:
            current = W[:, i : i + group] if mistake != "group range from the original weights" else \
                weight.double()[:, column : column + group]  # fmt: skip
            exact = (current.amax(-1) - current.amin(-1)).clamp_min(1e-5) / top
            scales[:, g], zeros[:, g] = reference_params(current, bits)
            margins["scales"] = min(margins["scales"], float(_fp16_margin(exact)))
            margins["codes"] = min(margins["codes"], float(_round_margin(current.amin(-1) / scales[:, g])))
        w = W[:, i]
        values = w / scales[:, g]
        margins["codes"] = min(margins["codes"], float(_round_margin(values)))
        q = (torch.round(values) + zeros[:, g]).clamp(0, top)
        codes[:, column if mistake != "act-order permutation not undone" else i] = q
        if mistake == "no error propagation":
            continue
        error = (w - (q - zeros[:, g]) * scales[:, g]) / (factor[i, i] if mistake != "error not divided by U_ii" else 1)
        W[:, i + 1 :] -= error[:, None] * factor[i, i + 1 :][None, :]
    return codes, margins


def _round_margin(values):
    """Distance of values to the nearest rounding boundary (x.5), in steps; values far outside the range clamp."""
    return ((values - values.floor() - 0.5).abs()).min()


def _fp16_margin(values):
    """Distance of values to the nearest fp16 rounding boundary, in fp16 steps."""
    steps = torch.exp2(torch.floor(torch.log2(values)) - 10)
    return ((values / steps - (values / steps).floor() - 0.5).abs()).min()


GPTQ_MISTAKES = (
    "no error propagation",
    "error not divided by U_ii",
    "the Cholesky factor of H instead of H^-1",
    "H^-1 itself instead of its Cholesky factor",
    "act-order permutation not undone",
    "group range from the original weights",
)


def correlated_problem(seed: int, N=8, K=32, tokens=128, spread=1.0):
    """A weight and a Hessian whose channels are correlated (so that errors move) and differ in scale (so that
    act-order's permutation is far from the identity)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.eye(K) + 0.4 * torch.randn(K, K, generator=g) / math.sqrt(K)
    x = (torch.randn(tokens, K, generator=g) @ mixing) * torch.exp(spread * torch.randn(K, generator=g))
    weight = torch.randn(N, K, generator=g) * 0.1
    return weight, 2 * x.T @ x / tokens


GPTQ_CASES = {  # name: (seed, bits, group, act_order, block_size)
    "4-bit G=8, one block": (11, 4, 8, False, 128),
    "4-bit G=8, blocks of 12 (groups cross blocks)": (11, 4, 8, False, 12),
    "4-bit G=16, blocks of 4": (12, 4, 16, False, 4),
    "8-bit G=32": (13, 8, 32, False, 8),
    "4-bit G=8, act-order": (14, 4, 8, True, 128),
    "4-bit G=8, act-order, blocks of 12": (14, 4, 8, True, 12),
}


@pytest.mark.points(2)
@pytest.mark.parametrize("case", GPTQ_CASES)
def test_gptq_equals_a_float64_textbook_implementation(quant, case):
    seed, bits, group, act_order, block = GPTQ_CASES[case]
    weight, hess = correlated_problem(seed)
    expected, margins = textbook_gptq(weight, hess, bits, group, act_order)
    # The data's own check: float32 and float64 could only disagree on values this close to a rounding boundary.
    assert margins["codes"] > 2e-4 and margins["scales"] > 1e-2, f"test data too close to rounding: {margins}"
    result = quant.gptq_quantize(weight, hess, bits, group, block_size=block, act_order=act_order)
    codes, _, _ = check_quantized(result, weight.shape, bits, group, f"gptq_quantize ({case})")
    if torch.equal(codes, expected.float()):
        return
    agreement = float((codes == expected.float()).float().mean())
    named = [m for m in GPTQ_MISTAKES if torch.equal(codes, textbook_gptq(weight, hess, bits, group, act_order,
                                                                          mistake=m)[0].float())]  # fmt: skip
    if not act_order and torch.equal(codes, reference_rtn(weight, bits, group)[0]):
        named = [
            "no error propagation: the codes are plain RTN's (is the update missing, or is U the lower Cholesky "
            "factor, whose rows are zero right of the diagonal?)"
        ]
    if not named and block < weight.shape[1]:
        whole = quant.gptq_quantize(weight, hess, bits, group, block_size=weight.shape[1], act_order=act_order)
        if torch.equal(whole.codes.float(), expected.float()):
            named = [
                f"the lazy batch update: with one block of {weight.shape[1]} columns your codes are right, with "
                f"blocks of {block} they are not (each block's errors must reach every later column, and a group "
                "that starts inside a block needs the block's pending updates)"
            ]
    first = (codes != expected.float()).nonzero()[0].tolist()
    pytest.fail(
        f"{case}: codes differ from the textbook's at {1 - agreement:.0%} of the weights, first at row {first[0]}, "
        f"column {first[1]}" + (f"; they are exactly what this mistake gives: {named[0]}" if named else ""),
        pytrace=False,
    )


def test_gptq_with_an_identity_hessian_is_rtn(quant):
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    hess = quant.hessian(torch.eye(64))  # X = I: no correlations, nothing for an error to move onto
    expected = reference_rtn(weight, 4, 16)
    for act_order in (False, True):
        codes, scales, zeros = check_quantized(
            quant.gptq_quantize(weight, hess, 4, 16, act_order=act_order), (16, 64), 4, 16, "gptq_quantize"
        )
        assert torch.equal(codes, expected[0]) and torch.equal(scales, expected[1]), (
            f"with H proportional to I (act_order={act_order}) GPTQ must give RTN's codes exactly: U is diagonal, so "
            "no error moves"
        )


def test_gptq_survives_a_singular_hessian(quant):
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(5))
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(6))  # 4 tokens, 32 channels: rank 4
    x[:, 7] = 0  # an input channel no token uses: H[7, 7] = 0
    hess = quant.hessian(x)
    try:
        result = quant.gptq_quantize(weight, hess, 4, 8)
    except RuntimeError as error:  # torch.linalg.LinAlgError is a RuntimeError
        pytest.fail(f"gptq_quantize failed on a singular Hessian ({type(error).__name__}: {str(error)[:120]}): no "
                    "damping? H += damp * mean(diag(H)) * I makes it invertible", pytrace=False)  # fmt: skip
    codes, scales, zeros = check_quantized(result, (8, 32), 4, 8, "gptq_quantize on a singular Hessian")
    fake = dequantized(codes, scales, zeros, 8)
    assert bool(torch.isfinite(scales.float()).all()) and bool(torch.isfinite(fake).all()), (
        "NaN or inf in the result on a singular Hessian: no damping?"
    )
    assert bool((fake[:, 7] == 0).all()), "an unused input channel (H_kk = 0) must get W[:, k] = 0, as GPTQ does"
    expected, _ = textbook_gptq(weight, hess, 4, 8, False)
    assert float((codes == expected.float()).float().mean()) > 0.95, "codes differ from the textbook's (damp = 0.01)"


@pytest.fixture(scope="module")
def course_activations():
    """The inputs of layers 0 and 1's linears, from the float course model on calibration text."""
    llama = course_llama()
    hidden = llama.embed(text_windows("calibration", WINDOW, 8))  # 2k tokens: enough for one layer's statistics
    inputs = {}
    for layer in (0, 1):
        hidden, inputs[layer] = decoder_layer(llama, layer, hidden)
    return llama, inputs


@pytest.mark.points(2)
def test_gptq_lowers_the_output_error_below_rtn_on_course_activations(quant, course_activations):
    llama, inputs = course_activations
    lines, worst = [], 0.0
    for name in LINEARS:
        weight, x = getattr(llama.layers[1], name), inputs[1][name]
        result = quant.gptq_quantize(weight, quant.hessian(x), COURSE_BITS, COURSE_GROUP)
        fake = dequantized(*check_quantized(result, weight.shape, 4, 128, f"gptq_quantize ({name})"), COURSE_GROUP)
        rtn = dequantized(*reference_rtn(weight, 4, 128), 128)
        ratio = output_error(weight, fake, x) / output_error(weight, rtn, x)
        worst = max(worst, ratio)
        lines.append(f"{name} {ratio:.2f}")
    # The reference: 0.07 (qkv), 0.19 (out), 0.20 (gate_up), 0.42 (down).
    assert worst < 0.75, (
        "GPTQ's output error over RTN's on layer 1 of the course model: " + ", ".join(lines) + "; each should be "
        "well under 1 (the reference reaches 0.07-0.42): is the error propagated to the later columns?"
    )


BAD_GPTQ = {
    "a Hessian of the wrong shape": lambda q, w, h: q.gptq_quantize(w, h[:16, :16], 4, 8),
    "group size 12 not dividing K = 32": lambda q, w, h: q.gptq_quantize(w, h, 4, 12),
    "bits 2": lambda q, w, h: q.gptq_quantize(w, h, 2, 8),
    "damp 0": lambda q, w, h: q.gptq_quantize(w, h, 4, 8, damp=0.0),
    "block size 0": lambda q, w, h: q.gptq_quantize(w, h, 4, 8, block_size=0),
}


@pytest.mark.parametrize("bad", BAD_GPTQ)
def test_gptq_rejects_bad_input(quant, bad):
    weight, hess = correlated_problem(7)
    expect_error(ValueError, lambda: BAD_GPTQ[bad](quant, weight, hess), f"gptq_quantize with {bad}")


# --- AWQ -----------------------------------------------------------------------------------------------------------


def reference_awq_scales(x, alpha):
    s = x.reshape(-1, x.shape[-1]).double().abs().mean(0).pow(alpha).clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


def test_awq_scales_are_the_mean_magnitude_to_the_alpha_normalized(quant):
    x = torch.tensor([[[1.0, -4.0, 0.0, 2.0]], [[3.0, 4.0, 0.0, -6.0]]])  # mean |x|: 2, 4, 0, 4
    got = quant.awq_scales(x, 0.5)
    expected = reference_awq_scales(x, 0.5)  # sqrt: 1.41, 2, 1e-4 (clamped), 2; over sqrt(2 * 1e-4)
    assert got.dtype == torch.float32 and got.shape == (4,), f"float32 [4] expected, got {got.dtype} {list(got.shape)}"
    if torch.allclose(got.double(), reference_awq_scales(x.abs().amax(0, keepdim=True), 0.5), rtol=1e-5):
        pytest.fail("awq_scales uses max |x|: AWQ's statistic is the mean magnitude per input channel",
                    pytrace=False)  # fmt: skip
    raw = x.reshape(-1, 4).abs().mean(0).pow(0.5).clamp_min(1e-4)
    if torch.allclose(got, raw, rtol=1e-5):
        pytest.fail("awq_scales are not normalized: divide by sqrt(max(s) * min(s))", pytrace=False)
    assert torch.allclose(got.double(), expected, rtol=1e-5), f"expected {expected.tolist()}, got {got.tolist()}"
    ones = quant.awq_scales(x, 0.0)
    assert torch.equal(ones, torch.ones(4)), f"alpha = 0 must give all ones, got {ones.tolist()}"


def reference_awq_errors(weight, x, bits, group, grid, variant=None):
    x = x.reshape(-1, x.shape[-1]).double()
    errors = []
    for step in range(grid):
        s = reference_awq_scales(x, step / grid)
        fake = dequantized(*reference_rtn((weight.double() * s).float(), bits, group), group).double()
        if variant == "the activations not divided by s (Q(W s) used as the weight)":
            errors.append(float(((x @ (weight.double() - fake).T) ** 2).mean()))
        elif variant == "the error measured on the weights, not on the outputs":
            errors.append(float(((weight.double() - fake / s) ** 2).mean()))
        else:
            errors.append(float(((x @ (weight.double() - fake / s).T) ** 2).mean()))
    return errors


def close_lists(got: list, expected: list) -> bool:
    return all(math.isclose(a, b, rel_tol=2e-3) for a, b in zip(got, expected, strict=True))


@pytest.mark.points(2)
@pytest.mark.parametrize("name", ["gate_up", "down"])
def test_awq_search_measures_the_output_error_of_each_alpha(quant, course_activations, name):
    llama, inputs = course_activations
    weight, x = getattr(llama.layers[0], name), inputs[0][name][:4]  # 1024 tokens
    scales, alpha, errors = quant.awq_search(weight, x, 4, 128, grid=10)
    expected = reference_awq_errors(weight, x, 4, 128, 10)
    assert isinstance(errors, list) and len(errors) == 10, f"errors: a list of 10 (one per alpha), got {errors!r}"
    if not close_lists(errors, expected):
        variants = ("the activations not divided by s (Q(W s) used as the weight)",
                    "the error measured on the weights, not on the outputs")  # fmt: skip
        named = [v for v in variants if close_lists(errors, reference_awq_errors(weight, x, 4, 128, 10, v))]
        pytest.fail(
            f"errors per alpha {[f'{e:.4g}' for e in errors]}, expected {[f'{e:.4g}' for e in expected]} (mean over "
            "tokens and outputs of ((x / s) @ Q(W * s).T - x @ W.T)^2)"
            + (f"; exactly what this mistake gives: {named[0]}" if named else ""),
            pytrace=False,
        )
    best = min(range(10), key=errors.__getitem__) / 10
    assert math.isclose(alpha, best, abs_tol=1e-9), f"the best alpha has the least error: {best}, got {alpha}"
    assert torch.allclose(scales.double(), reference_awq_scales(x, best), rtol=1e-5), (
        "the returned scales must be awq_scales(x, best alpha)"
    )


def test_awq_search_lowers_the_output_error_on_the_course_model(quant, course_activations):
    llama, inputs = course_activations
    for name in ("gate_up", "down"):  # the layer with the most uneven activations (see the README's picture)
        weight, x = getattr(llama.layers[0], name), inputs[0][name]
        scales, alpha, _ = quant.awq_search(weight, x, 4, 128)
        fake = dequantized(*reference_rtn(weight * scales, 4, 128), 128) / scales
        rtn = dequantized(*reference_rtn(weight, 4, 128), 128)
        ratio = output_error(weight, fake, x) / output_error(weight, rtn, x)
        # The reference: 0.71 (gate_up) and 0.63 (down), both at alpha 0.35.
        assert alpha > 0 and ratio < 0.9, (
            f"layer 0 {name}: the searched alpha {alpha} leaves {ratio:.2f} of plain RTN's output error (alpha = 0); "
            "the reference's search leaves 0.63-0.71"
        )


def test_awq_clip_keeps_per_row_and_group_the_range_with_the_least_output_error(quant):
    g = torch.Generator().manual_seed(8)
    weight = torch.randn(16, 64, generator=g) * 0.1
    weight[:, 5] *= 8  # a few large weights: ranges worth clipping
    x = torch.randn(600, 64, generator=g) * torch.exp(torch.randn(64, generator=g))
    got = quant.awq_clip(weight, x, 4, 32, grid=20, max_shrink=0.5, tokens=256)  # every 600 // 256 = 2nd token
    assert got.dtype == torch.float32 and got.shape == weight.shape, f"float32 [16, 64] expected, got {got.dtype} " \
                                                                    f"{list(got.shape)}"  # fmt: skip
    groups = weight.reshape(16, 2, 32)
    top = groups.abs().amax(-1, keepdim=True)
    tokens = x[::2].T.reshape(2, 32, 300).double()
    errors, candidates = [], []
    for i in range(10):
        clipped = groups.clamp(-top * (1 - i / 20), top * (1 - i / 20))
        fake = dequantized(*reference_rtn(clipped.reshape(16, 64), 4, 32), 32).reshape(16, 2, 32).double()
        share = torch.einsum("ngk,gkt->ngt", fake - groups.double(), tokens)
        errors.append(share.pow(2).mean(-1))
        candidates.append(clipped)
    errors = torch.stack(errors)  # [ratios, N, groups]
    chosen = got.reshape(16, 2, 32)
    allowed = errors <= errors.min(0).values * (1 + 1e-4)  # ties within float noise: either is right
    matches = torch.stack([((c - chosen).abs() <= 1e-6 * top).all(-1) for c in candidates])
    fine = (matches & allowed).any(0)
    if not bool(fine.all()):
        n, group = (~fine).nonzero()[0].tolist()
        picked = [i for i in range(10) if bool(matches[i, n, group])]
        pytest.fail(
            f"row {n}, group {group}: the clamp ratio with the least output error is "
            f"{1 - int(errors[:, n, group].argmin()) / 20:.2f}; your group is "
            + (f"clamped at ratio {1 - picked[0] / 20:.2f}" if picked else "no clamp of the weights to [-r m, r m]")
            + " (the error: mean over tokens of (sum over the group's k of x_k (Q(c)_k - w_k))^2)",
            pytrace=False,
        )


# --- folding the AWQ scales into the model -------------------------------------------------------------------------


def small_llama() -> Llama:
    """The course model's first two layers: a real model, small enough for quick tests."""
    return course_llama(layers=2)


FOLDED_INTO = {"qkv": "attention_norm", "gate_up": "mlp_norm", "down": "gate_up"}


@pytest.mark.parametrize("linear", ["qkv", "gate_up", "down"])
def test_folding_awq_scales_leaves_the_float_model_unchanged(quant, linear):
    llama = small_llama()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(9))
    before = forward(llama, ids)
    K = getattr(llama.layers[1], linear).shape[1]
    scales = torch.exp(torch.randn(K, generator=torch.Generator().manual_seed(10)))
    weight, previous = getattr(llama.layers[1], linear).clone(), getattr(llama.layers[1], FOLDED_INTO[linear]).clone()
    quant.fold_awq_scales(llama, 1, linear, scales)
    w = llama.layers[1]
    assert torch.allclose(getattr(w, linear), weight * scales, rtol=1e-6), (
        f"{linear}'s input column k must be multiplied by s_k (W[:, k] * s[k])"
    )
    if torch.equal(getattr(w, FOLDED_INTO[linear]), previous):
        pytest.fail(f"the scales were applied to {linear}'s weights but not folded into the previous operator "
                    f"({FOLDED_INTO[linear]}): the float model now computes something else", pytrace=False)  # fmt: skip
    after = forward(llama, ids)
    change = float((after - before).abs().max())
    assert change < 1e-3, (
        f"after folding scales into {linear} the logits moved by {change:.3g}: the operator before it must divide by "
        "s exactly what the weights multiply ("
        + {"qkv": "attention_norm", "gate_up": "mlp_norm", "down": "the up rows: the second half of gate_up"}[linear]
        + ")"
    )


BAD_FOLDS = {
    "out (no per-channel operator before it)": ("out", lambda k: torch.ones(k)),
    "a negative scale": ("qkv", lambda k: -torch.ones(k)),
    "scales of the wrong length": ("down", lambda k: torch.ones(k + 1)),
}


@pytest.mark.parametrize("bad", BAD_FOLDS)
def test_folding_rejects_bad_input_and_changes_nothing(quant, bad):
    llama = small_llama()
    linear, make = BAD_FOLDS[bad]
    before = copy.deepcopy(llama)
    expect_error(ValueError, lambda: quant.fold_awq_scales(llama, 0, linear, make(getattr(llama.layers[0],
                                                                                         linear).shape[1])),
                 f"fold_awq_scales with {bad}")  # fmt: skip
    for name in (*LINEARS, "attention_norm", "mlp_norm"):
        assert torch.equal(getattr(llama.layers[0], name), getattr(before.layers[0], name)), f"{name} was changed"


# --- the whole model -----------------------------------------------------------------------------------------------


def test_quantize_model_writes_the_fake_quantized_weights_and_returns_the_codes(quant):
    llama = small_llama()
    original = copy.deepcopy(llama)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(11))
    result = quant.quantize_model(llama, ids, "rtn", 4, 64)
    expected_keys = {(layer, name) for layer in range(2) for name in LINEARS}
    assert isinstance(result, dict) and set(result) == expected_keys, (
        f"quantize_model returns {{(layer, name): QuantizedTensor}} for every layer and linear, got keys "
        f"{sorted(result) if isinstance(result, dict) else type(result).__name__}"
    )
    for (layer, name), quantized in sorted(result.items()):
        weight = getattr(original.layers[layer], name)
        codes, scales, zeros = check_quantized(quantized, weight.shape, 4, 64, f"layer {layer} {name}")
        expected = reference_rtn(weight, 4, 64)
        assert torch.equal(codes, expected[0]), f"layer {layer} {name}: rtn codes differ from quantize_rtn's"
        assert torch.equal(getattr(llama.layers[layer], name), dequantized(codes, scales, zeros, 64)), (
            f"layer {layer} {name}: the model's weight must be replaced by the dequantized codes"
        )
    for name in ("embedding", "final_norm", "lm_head"):
        assert torch.equal(getattr(llama, name), getattr(original, name)), f"rtn must leave {name} unchanged"
    for layer, w in enumerate(llama.layers):
        for name in ("attention_norm", "mlp_norm"):
            assert torch.equal(getattr(w, name), getattr(original.layers[layer], name)), (
                f"rtn must leave layer {layer}'s {name} unchanged"
            )


@pytest.mark.points(2)
def test_quantize_model_calibrates_each_layer_on_the_quantized_prefix(quant, monkeypatch):
    llama = small_llama()
    original = copy.deepcopy(llama)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(12))
    calls = []
    real = quant.gptq_quantize

    def watched(weight, hessian, *args, **kwargs):
        calls.append((weight.detach().clone(), hessian.detach().clone()))
        return real(weight, hessian, *args, **kwargs)

    monkeypatch.setattr(quant, "gptq_quantize", watched)
    quant.quantize_model(llama, ids, "gptq", 4, 128)
    assert len(calls) == 8, f"method 'gptq' must call gptq_quantize once per linear (8 here), it called it {len(calls)}"
    embedded = llama.embed(ids)
    quantized_prefix = decoder_layer(llama, 0, embedded)[0]  # layer 0 as quantize_model left it
    float_prefix = decoder_layer(original, 0, embedded)[0]
    for name in LINEARS:
        weight = getattr(original.layers[1], name)
        seen = [h for w, h in calls if w.shape == weight.shape and torch.equal(w, weight)]
        assert seen, f"gptq_quantize never received layer 1's float {name} weight"
        expected = quant.hessian(decoder_layer(original, 1, quantized_prefix)[1][name])
        if torch.allclose(seen[0], expected, rtol=1e-4, atol=1e-6):
            continue
        wrong = quant.hessian(decoder_layer(original, 1, float_prefix)[1][name])
        if torch.allclose(seen[0], wrong, rtol=1e-4, atol=1e-6):
            pytest.fail(f"layer 1 {name}: calibrated on the float model's activations instead of the quantized "
                        "prefix's: run each quantized layer to get the next layer's input", pytrace=False)  # fmt: skip
        pytest.fail(f"layer 1 {name}: the Hessian passed to gptq_quantize is not hessian() of the layer's input "
                    "(the float layer 1 run on what the quantized layer 0 produced)", pytrace=False)  # fmt: skip


BAD_MODEL_CALLS = {
    "an empty calibration set": lambda q, m: q.quantize_model(m, torch.zeros(0, 16, dtype=torch.long), "rtn"),
    "group size 48 (does not divide 256)": lambda q, m: q.quantize_model(m, torch.zeros(1, 8, dtype=torch.long),
                                                                         "rtn", 4, 48),
    "bits 3": lambda q, m: q.quantize_model(m, torch.zeros(1, 8, dtype=torch.long), "rtn", 3),
    "an unknown method": lambda q, m: q.quantize_model(m, torch.zeros(1, 8, dtype=torch.long), "smoothquant"),
}  # fmt: skip


@pytest.mark.parametrize("bad", BAD_MODEL_CALLS)
def test_quantize_model_rejects_bad_input_and_changes_nothing(quant, bad):
    llama = small_llama()
    before = copy.deepcopy(llama)
    expect_error(ValueError, lambda: BAD_MODEL_CALLS[bad](quant, llama), f"quantize_model with {bad}")
    for layer, w in enumerate(llama.layers):
        for name in (*LINEARS, "attention_norm", "mlp_norm"):
            assert torch.equal(getattr(w, name), getattr(before.layers[layer], name)), (
                f"quantize_model raised, but layer {layer}'s {name} was changed: validate before touching the model"
            )


def reference_perplexity(llama, ids, variant=None, batch_size=8):
    if variant == "a mean of per-row perplexities":
        return sum(reference_perplexity(llama, ids[i : i + 1]) for i in range(len(ids))) / len(ids)
    if variant == "a mean of per-batch perplexities":
        chunks = ids.split(batch_size)
        return sum(reference_perplexity(llama, c) for c in chunks) / len(chunks)
    logits = forward(llama, ids).double()
    if variant == "logits not shifted (token t scored with row t, not row t - 1)":
        nll = F.cross_entropy(logits[:, 1:].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    else:
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return math.exp(float(nll))


PERPLEXITY_MISTAKES = (
    "logits not shifted (token t scored with row t, not row t - 1)",
    "a mean of per-row perplexities",
    "a mean of per-batch perplexities",
)


def test_perplexity_is_exp_of_the_mean_token_negative_log_likelihood(quant):
    llama = small_llama()
    ids = torch.randint(0, 256, (5, 19), generator=torch.Generator().manual_seed(13))
    expected = reference_perplexity(llama, ids)
    for batch_size in (2, 8):
        got = quant.perplexity(llama, ids, batch_size=batch_size)
        assert isinstance(got, float), f"perplexity returns a Python float, got {type(got).__name__}"
        if math.isclose(got, expected, rel_tol=1e-5):
            continue
        named = [m for m in PERPLEXITY_MISTAKES if math.isclose(got, reference_perplexity(llama, ids, m, batch_size),
                                                                rel_tol=1e-5)]  # fmt: skip
        pytest.fail(f"batch_size={batch_size}: expected {expected:.6g}, got {got:.6g}"
                    + (f": exactly what {named[0]} gives" if named else ""), pytrace=False)  # fmt: skip
    for bad, ids_bad in (("one token per row", ids[:, :1]), ("no rows", ids[:0])):
        expect_error(ValueError, lambda ids_bad=ids_bad: quant.perplexity(llama, ids_bad), f"perplexity of {bad}")


# --- the perplexity table: fp32, RTN, AWQ, GPTQ at 4 bits, G = 128 ---------------------------------------------------


@pytest.fixture(scope="module")
def evaluation_text():
    return text_windows("evaluation", WINDOW, EVALUATION_WINDOWS)


def quantized_course(quant, method: str):
    """(llama, codes): the course model quantized by quantize_model at 4 bits, G = 128, on the calibration text."""

    def make():
        llama = course_llama()
        calibration = text_windows("calibration", WINDOW, CALIBRATION_WINDOWS)
        return llama, quant.quantize_model(llama, calibration, method, COURSE_BITS, COURSE_GROUP)

    return once(quant.__name__, ("course model", method), make)


def course_perplexity(quant, method: str, evaluation_text) -> float:
    """The test's own perplexity (not the student's function) of the course model, float or quantized."""
    if method == "fp32":  # does not depend on the code under test
        return once("float", "perplexity", lambda: reference_perplexity(course_llama(), evaluation_text))
    return once(quant.__name__, ("perplexity", method),
                lambda: reference_perplexity(quantized_course(quant, method)[0], evaluation_text))  # fmt: skip


def judge_recovery(request, quant, method, evaluation_text):
    from grader.thresholds import resolve

    # The method first: an unfinished quantize_model fails before the float model is evaluated.
    table = {m: course_perplexity(quant, m, evaluation_text) for m in (method, "rtn", "fp32")}
    table = {m: table[m] for m in ("fp32", "rtn", method)}
    rtn_increase = table["rtn"] - table["fp32"]
    assert rtn_increase > 0, (
        f"RTN at 4 bits left the perplexity at {table['rtn']:.4f} against fp32's {table['fp32']:.4f}: quantizing must "
        "cost something. Does quantize_model write the dequantized weights into the model?"
    )
    ratio = (table[method] - table["fp32"]) / rtn_increase
    impl = request.config.getoption("impl") or os.environ.get("INFERLAB_IMPL") or "student"  # as the grader reads it
    threshold = resolve(THRESHOLDS, f"{method}_increase_over_rtn", impl, None)
    text = ", ".join(f"{m} {p:.4f}" for m, p in table.items())
    assert threshold.passes(ratio), (
        f"{threshold.what}: {ratio:.2f}, needs {threshold.symbol} {threshold.value:g} ({threshold.source}). Perplexity "
        f"on {EVALUATION_WINDOWS} x {WINDOW} held-out tokens: {text}"
    )


# Long by design: the first of these quantizes the course model and evaluates it three times on 16k tokens (about
# 10 s on an idle 2-core CPU; a loaded CI runner can take ten times that).
@pytest.mark.points(3)
@pytest.mark.time_limit(400)
def test_gptq_recovers_a_clear_share_of_the_perplexity_rtn_loses(quant, request, evaluation_text):
    judge_recovery(request, quant, "gptq", evaluation_text)


@pytest.mark.points(3)
@pytest.mark.time_limit(400)
def test_awq_recovers_a_clear_share_of_the_perplexity_rtn_loses(quant, request, evaluation_text):
    judge_recovery(request, quant, "awq", evaluation_text)


# --- export: AutoAWQ's GEMM layout (exercise 03) --------------------------------------------------------------------

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column 8c + AWQ_ORDER[i]


def unpack_words(words: torch.Tensor) -> torch.Tensor:
    """Exercise 03's format, read back: int32 [R, C] -> int64 [R, 8C] values in column order."""
    nibbles = (words.long()[..., None] >> (4 * torch.arange(8))) & 0xF  # nibble i
    out = torch.empty_like(nibbles)
    out[..., list(AWQ_ORDER)] = nibbles
    return out.reshape(words.shape[0], -1)


def test_awq_export_packs_the_transposed_codes_in_awq_nibble_order(quant):
    codes = torch.arange(1, 9, dtype=torch.uint8)[:, None].repeat(1, 8)  # [N=8, K=8]: row n holds n + 1
    zeros = torch.tensor([[15], [0], [1], [2], [3], [4], [5], [6]], dtype=torch.uint8)
    quantized = quant.QuantizedTensor(codes, torch.ones(8, 1, dtype=torch.float16), zeros, 4, 8)
    qweight, scales, qzeros = quant.export_awq(quantized)
    assert qweight.dtype == torch.int32 and tuple(qweight.shape) == (8, 1), (
        f"qweight must be int32 [K, N/8] = [8, 1], got {qweight.dtype} {list(qweight.shape)}"
    )
    word = sum((AWQ_ORDER[i] + 1) << (4 * i) for i in range(8))  # nibble i holds column ORDER[i], value ORDER[i] + 1
    expected = word - 2**32 if word >= 2**31 else word
    natural = sum((i + 1) << (4 * i) for i in range(8))
    got = int(qweight[0, 0])
    if got == 0x11111111:
        pytest.fail(
            "qweight's row 0 holds output channel 0's codes (all 1): not transposed. Our codes are [N, K], "
            "AWQ's qweight packs q.T [K, N]: row k holds input channel k of every output",
            pytrace=False,
        )
    if got in (natural, natural - 2**32):
        pytest.fail("nibble i holds column i: nibbles packed in natural order; AWQ puts column [0, 2, 4, 6, 1, 3, 5, "
                    "7][i] into nibble i", pytrace=False)  # fmt: skip
    assert got == expected, f"qweight word: expected {expected:#x} (column ORDER[i] in nibble i), got {got:#x}"
    assert scales.dtype == torch.float16 and tuple(scales.shape) == (1, 8), (
        f"scales: float16 [K/G, N] = [1, 8], got {scales.dtype} {list(scales.shape)}"
    )
    assert qzeros.dtype == torch.int32 and tuple(qzeros.shape) == (1, 1), "qzeros: int32 [K/G, N/8] = [1, 1]"
    assert unpack_words(qzeros).flatten().tolist() == zeros.flatten().tolist(), (
        "qzeros must pack zeros.T in the same nibble order (zero 15 in column 0 sets the word's low nibble)"
    )


def test_awq_export_dequantizes_to_the_fake_quantized_weights_exactly(quant):
    weight = course_llama().layers[3].gate_up  # [1536, 256]
    quantized = as_quantized(quant, weight, 4, 128)
    qweight, scales, qzeros = quant.export_awq(quantized)
    K, N = 256, 1536
    assert tuple(qweight.shape) == (K, N // 8) and tuple(qzeros.shape) == (2, N // 8) and tuple(scales.shape) == (2, N)
    q, z = unpack_words(qweight), unpack_words(qzeros)
    assert torch.equal(q, quantized.codes.T.long()), "unpacking qweight must give the codes, transposed"
    restored = (q - z.repeat_interleave(128, 0)).float() * scales.float().repeat_interleave(128, 0)
    assert torch.equal(restored.T, quantized.dequantize()), "(q - z) * s of the export must equal the fake-quantized W"
    expect_error(ValueError, lambda: quant.export_awq(as_quantized(quant, weight[:64], 8, 128)), "export of 8-bit")
    expect_error(ValueError, lambda: quant.export_awq(as_quantized(quant, weight[:12], 4, 128)), "N = 12 (not 8k)")


@pytest.fixture
def exercise_03_reference(request):
    """Exercise 03's reference module (solutions/03/awq.py, or under --solutions PATH): the instructors' only."""
    root = request.config.getoption("solutions") or os.environ.get("INFERLAB_SOLUTIONS")
    path = Path(root or request.config.rootpath / "solutions").expanduser().resolve() / "03" / "awq.py"
    if not path.is_file():
        pytest.skip("exercise 03's reference kernels (solutions/03) are not in this repo: the export is checked "
                    "against the format by the other tests")  # fmt: skip
    return load_module(str(path))


@functools.cache
def load_module(path: str):
    name = f"inferlab_exercise_08_uses_{Path(path).parent.name}_{Path(path).stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Triton reads a kernel's source through its module
    spec.loader.exec_module(module)
    return module


def test_awq_export_reads_back_through_exercise_03s_reference(quant, exercise_03_reference):
    weight = course_llama().layers[0].out[:64]  # [64, 256]: small enough for the Triton interpreter
    quantized = as_quantized(quant, weight, 4, 64)
    qweight, scales, qzeros = quant.export_awq(quantized)
    assert torch.equal(exercise_03_reference.unpack_awq(qweight).long(), quantized.codes.T.long()), (
        "exercise 03's unpack_awq does not read the codes back"
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton runs on the GPU there, not interpreted
    restored = exercise_03_reference.awq_dequantize(qweight.to(device), scales.to(device), qzeros.to(device))
    restored = restored.cpu()
    assert torch.equal(restored.T, quantized.dequantize().half()), "exercise 03's awq_dequantize disagrees"


# --- export: GGUF Q8_0 and Q4_0 -------------------------------------------------------------------------------------


def test_gguf_q8_0_block_by_hand(quant):
    block = torch.tensor([127.0, -63.5, 0.5, 1.5, 2.5, -2.5, 126.5, 0.49999997] + [0.0] * 24)[None]
    got = quant.export_gguf(block, "Q8_0")
    assert got.dtype == torch.uint8 and tuple(got.shape) == (1, 34), (
        f"one Q8_0 block is 34 bytes (fp16 d, 32 int8), got {got.dtype} {list(got.shape)}"
    )
    assert got[0, :2].tolist() == list(torch.tensor([1.0]).half().view(torch.uint8).tolist()), (
        f"d = max|x| / 127 = 1.0 as little-endian fp16 (bytes 0x00 0x3c), got {got[0, :2].tolist()}"
    )
    q = got[0, 2:10].view(torch.int8).tolist()
    if q[2:6] == [0, 2, 2, -2]:
        pytest.fail("0.5 -> 0 and 2.5 -> 2: rounded half to even (torch.round); GGUF rounds half away from zero, "
                    "as C's roundf", pytrace=False)  # fmt: skip
    assert q == [127, -64, 1, 2, 3, -3, 127, 0], f"codes: expected [127, -64, 1, 2, 3, -3, 127, 0], got {q}"


def test_gguf_q4_0_block_by_hand(quant):
    values = torch.tensor([-8.0, 4.0, 1.0, -1.0] + [0.0] * 12 + [2.0, 7.0, -7.0, 0.0] + [0.0] * 12)[None]
    got = quant.export_gguf(values, "Q4_0")
    assert got.dtype == torch.uint8 and tuple(got.shape) == (1, 18), (
        f"one Q4_0 block is 18 bytes (fp16 d, 16 bytes of nibbles), got {got.dtype} {list(got.shape)}"
    )
    d = got[0, :2].view(torch.float16).item()
    if d == -1.0:
        pytest.fail("d = -1: the scale came from max |x| without its sign; m is the value of largest magnitude "
                    "*with* its sign (here -8), d = m / -8 = 1", pytrace=False)  # fmt: skip
    assert d == 1.0, f"d = m / -8 with m = -8 (the value of largest magnitude) is 1.0, got {d}"
    q = [int(b) & 0xF for b in got[0, 2:]] + [int(b) >> 4 for b in got[0, 2:]]
    expected = [0, 12, 9, 7] + [8] * 12 + [10, 15, 1, 8] + [8] * 12  # q = x / d + 8 (7 + 8 = 15, the top code)
    interleaved = [int(b) >> s & 0xF for b in got[0, 2:] for s in (0, 4)]
    if interleaved == expected:
        pytest.fail("byte j holds q[2j] and q[2j + 1]: nibbles interleaved; Q4_0's byte j holds q[j] (low nibble) "
                    "and q[j + 16] (high nibble)", pytrace=False)  # fmt: skip
    assert q == expected, f"codes (low nibbles then high nibbles): expected {expected}, got {q}"


# Without the package these tests are not graded (decided before anything runs, so they count in no maximum): the
# blocks are still checked by hand above.
NO_GGUF = importlib.util.find_spec("gguf") is None
NO_GGUF_REASON = ("not graded on this machine: the gguf package is not installed (pip install gguf); GGUF blocks are "
                  "checked by hand only (test_gguf_*_by_hand)")  # fmt: skip


def gguf_test_matrix():
    g = torch.Generator().manual_seed(14)
    weight = torch.randn(24, 256, generator=g) * torch.logspace(-3, 1, 24)[:, None]
    weight[0, :32] = 0  # an all-zero block: d = 0, 1/d taken as 0
    weight[1, :32] = torch.tensor([127.0] + [k + 0.5 for k in range(-15, 16)]) / 16  # Q8_0 ties: d = 1/16
    weight[2, 32:64] = 7.0  # a constant block
    weight[3, 64:96] = -weight[3, 64:96].abs()  # all negative
    weight[4, :32] = torch.tensor([3.0, -3.0] * 16)  # Q4_0: two largest magnitudes of opposite signs, the first wins
    return weight


@pytest.mark.skipif(NO_GGUF, reason=NO_GGUF_REASON)
@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_gguf_blocks_are_byte_identical_to_the_gguf_package(quant, kind):
    from gguf import GGMLQuantizationType
    from gguf import quants as gguf_quants

    weight = gguf_test_matrix()
    expected = torch.from_numpy(gguf_quants.quantize(weight.numpy(), getattr(GGMLQuantizationType, kind)).copy())
    got = quant.export_gguf(weight, kind)
    assert got.dtype == torch.uint8 and got.shape == expected.shape, (
        f"{kind}: expected uint8 {list(expected.shape)}, got {got.dtype} {list(got.shape)}"
    )
    if not torch.equal(got, expected):
        size = {"Q8_0": 34, "Q4_0": 18}[kind]
        row, column = (got != expected).nonzero()[0].tolist()
        pytest.fail(f"{kind}: the bytes differ from the gguf package's first in row {row}, block {column // size}, "
                    f"byte {column % size} of {size} (bytes 0-1: the fp16 scale)", pytrace=False)  # fmt: skip


@pytest.mark.parametrize("bad", ["kind Q4_K", "K = 48 (not a multiple of 32)"])
def test_gguf_rejects_bad_input(quant, bad):
    weight = torch.randn(2, 48 if bad.startswith("K") else 64)
    expect_error(ValueError, lambda: quant.export_gguf(weight, "Q4_K" if bad.startswith("kind") else "Q8_0"),
                 f"export_gguf with {bad}")  # fmt: skip


# --- export: FP8 e4m3 -----------------------------------------------------------------------------------------------


def check_fp8(result, shape, what):
    values, scales = result
    assert values.dtype == torch.float8_e4m3fn and tuple(values.shape) == shape, (
        f"{what}: values must be torch.float8_e4m3fn {list(shape)}, got {values.dtype} {list(values.shape)}"
    )
    assert scales.dtype == torch.float32 and tuple(scales.shape) == (shape[0],), (
        f"{what}: scales must be float32 [N] = [{shape[0]}] (one per output channel), got {scales.dtype} "
        f"{list(scales.shape)}"
    )
    return values, scales


def test_fp8_codes_equal_torchs_conversion_with_one_scale_per_output_channel(quant):
    weight = torch.randn(16, 128, generator=torch.Generator().manual_seed(15)) * torch.logspace(-4, 1, 16)[:, None]
    weight[3] = 0  # a zero row
    values, scales = check_fp8(quant.quantize_fp8(weight), (16, 128), "quantize_fp8")
    expected_scales = weight.abs().amax(1).clamp_min(1e-12) / 448
    if torch.allclose(scales, torch.full_like(scales, float(weight.abs().max()) / 448)):
        pytest.fail("one scale for the whole tensor: per-tensor scale; FP8 here has one per output channel (row)",
                    pytrace=False)  # fmt: skip
    assert torch.allclose(scales, expected_scales, rtol=1e-6), "scales must be max|w| of each row / 448"
    expected = (weight / expected_scales[:, None]).to(torch.float8_e4m3fn)
    assert torch.equal(values.view(torch.uint8), expected.view(torch.uint8)), (
        "codes differ from torch's float8_e4m3fn conversion of w / scale"
    )


def test_fp8_rounds_every_e4m3_value_and_midpoint_as_torch_does(quant):
    codes = torch.arange(0, 127, dtype=torch.uint8)  # every finite non-negative e4m3fn value
    exact = codes.view(torch.float8_e4m3fn).float()
    midpoints = (exact[1:] + exact[:-1]) / 2  # ties: to the even code
    nearby = torch.cat([midpoints * (1 + 2**-20), midpoints * (1 - 2**-20)])
    row = torch.cat([exact, midpoints, nearby, torch.tensor([2.0**-12, 1e-30])])
    weight = torch.stack([row, -row])
    values, _ = check_fp8(quant.quantize_fp8(weight, torch.ones(2)), tuple(weight.shape), "quantize_fp8, scale 1")
    expected = weight.to(torch.float8_e4m3fn).view(torch.uint8)
    bad = (values.view(torch.uint8) != expected).nonzero()
    if len(bad):
        r, c = bad[0].tolist()
        got = int(values.view(torch.uint8)[r, c])
        pytest.fail(f"{weight[r, c].item():.9g} converts to byte {int(expected[r, c]):#04x} (torch's float8_e4m3fn: "
                    f"nearest, ties to even), got {got:#04x}", pytrace=False)  # fmt: skip


def test_fp8_saturates_instead_of_producing_nan(quant):
    weight = torch.tensor([[600.0, -1000.0, 449.0, 470.0, 1.0, -448.0, 3e38, 100.0]])
    values, scales = check_fp8(quant.quantize_fp8(weight, torch.ones(1)), (1, 8), "quantize_fp8 with scale 1")
    as_float = values.float()
    if bool(as_float.isnan().any()):
        pytest.fail(f"values beyond 448 became NaN ({as_float.tolist()}): e4m3fn has no infinity; saturate (clamp to "
                    "+-448 before converting)", pytrace=False)  # fmt: skip
    assert as_float.tolist() == [[448.0, -448.0, 448.0, 448.0, 1.0, -448.0, 448.0, 96.0]], (
        f"saturating conversion expected [448, -448, 448, 448, 1, -448, 448, 96], got {as_float.tolist()}"
    )
    expect_error(ValueError, lambda: quant.quantize_fp8(weight, torch.zeros(1)), "quantize_fp8 with scale 0")
    expect_error(ValueError, lambda: quant.quantize_fp8(weight, torch.ones(2)), "quantize_fp8 with 2 scales for 1 row")


# --- on a GPU: the exported course model runs on exercise 03's fused GEMV -------------------------------------------


def fp16_copy(llama: Llama, device) -> Llama:
    moved = copy.deepcopy(llama)
    for holder in (moved, *moved.layers):
        for name, value in vars(holder).items():
            if isinstance(value, torch.Tensor):
                setattr(holder, name, value.to(device=device, dtype=torch.float16))
    moved.device, moved.dtype = torch.device(device), torch.float16
    return moved


def greedy(llama, prompt, new_tokens, linear=None):
    """Greedy tokens and the top-two logit margin at each step (full recompute each step: no cache to get wrong)."""
    ids, margins = prompt, []
    for _ in range(new_tokens):
        logits = forward(llama, ids, linear)[0, -1]
        top = logits.topk(2).values
        margins.append(float(top[0] - top[1]))
        ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return ids[0, prompt.shape[1] :].tolist(), margins


@pytest.mark.gpu
@pytest.mark.points(2)
def test_awq_export_decodes_through_exercise_03s_gemv_like_its_fake_quantized_copy(quant, exercise_03_reference):
    gemv = exercise_03_reference.awq_gemv

    llama, codes = quantized_course(quant, "awq")
    fake = fp16_copy(llama, "cuda")  # the fake-quantized float copy, fp16
    packed = {key: tuple(t.cuda() for t in quant.export_awq(q)) for key, q in codes.items()}

    def int4_linear(layer, name, x):
        rows = x.reshape(-1, x.shape[-1])
        out = torch.cat([gemv(chunk.contiguous(), *packed[(layer, name)]) for chunk in rows.split(16)])
        return out.view(*x.shape[:-1], out.shape[-1])

    prompt = text_windows("evaluation", 24, 1).cuda()
    expected, margins = greedy(fake, prompt, 48)
    got, _ = greedy(fake, prompt, 48, int4_linear)
    if got == expected:
        return
    step = next(i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b)
    # fp16 sums in another order may pick the other of two tokens whose logits tie to within rounding.
    assert margins[step] < 0.06, (
        f"greedy tokens through exercise 03's awq_gemv differ from the fake-quantized fp16 model's from step {step} "
        f"(top-2 logit margin there {margins[step]:.3f}, not a tie): the export does not hold the weights the model "
        "uses"
    )
