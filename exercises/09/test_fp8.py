"""Exercise 09 specification, FP8 W8A8: e4m3 codes with float32 scales, and the matmul of two FP8 operands.

The quantizer is checked against torch's float8_e4m3fn conversion (an independent implementation of the rounding)
after the test's own scaling; the product against the scaled product of the codes, computed here in float64; the
error against the float product on the course model's own activations. On a GPU with FP8 tensor cores (Ada, Hopper)
the product must agree with the emulation and beat bf16's `x @ W.T` on prefill shapes of Llama-3-8B's layers.
"""

from __future__ import annotations

import functools

import pytest
import torch

from fixtures.checks import expect_error
from fixtures.quantization import LINEARS, course_llama, decoder_layer, text_windows

E4M3_MAX = 448.0
FP8 = torch.float8_e4m3fn


@pytest.fixture
def fp8(impl):
    return impl("fp8")


def rows_of_many_magnitudes(rows=24, columns=64, seed=0) -> torch.Tensor:
    """Rows whose magnitudes span six decades, one row with a single outlier, one row of zeros."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, columns, generator=generator) * torch.logspace(-3, 3, rows)[:, None]
    t[3, 5] = 900.0  # an outlier sets its row's scale
    t[7] = 0.0
    return t


def reference_e4m3(t: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    amax = t.abs().amax(1, keepdim=True) if per_row else t.abs().amax().reshape(1, 1)
    scale = amax.float().clamp_min(1e-12) / E4M3_MAX
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8), scale


def check_codes(result, shape, scale_shape, what):
    assert isinstance(result, tuple) and len(result) == 2, f"{what}: return (codes, scales), got {type(result)}"
    codes, scales = result
    assert isinstance(codes, torch.Tensor) and codes.dtype == FP8 and tuple(codes.shape) == shape, (
        f"{what}: codes must be float8_e4m3fn {list(shape)}, got {getattr(codes, 'dtype', codes)} "
        f"{list(getattr(codes, 'shape', []))}"
    )
    assert isinstance(scales, torch.Tensor) and scales.dtype == torch.float32, (
        f"{what}: scales must be float32, got {getattr(scales, 'dtype', type(scales).__name__)}"
    )
    if tuple(scales.shape) != scale_shape:
        hint = ""
        if tuple(scales.shape) == (1, shape[1]):
            hint = ": one scale per column, but a row (an output channel, a token) is what shares a scale"
        elif scale_shape != (1, 1) and scales.numel() == 1:
            hint = ": one scale per tensor where one per row was asked for"
        pytest.fail(f"{what}: scales must be {list(scale_shape)}, got {list(scales.shape)}{hint}", pytrace=False)
    return codes, scales


# --- quantizing: scales, rounding, saturation -----------------------------------------------------------------------


def test_each_row_is_scaled_by_its_own_max_over_448(fp8):
    t = rows_of_many_magnitudes()
    codes, scales = check_codes(fp8.quantize_e4m3(t, per_row=True), tuple(t.shape), (t.shape[0], 1), "per row")
    expected_codes, expected_scales = reference_e4m3(t, per_row=True)
    if torch.allclose(scales, expected_scales * E4M3_MAX, rtol=1e-6):
        pytest.fail("scales are max|row|, not max|row| / 448: the codes use only -1 .. 1 of e4m3's range, where its "
                    "steps are subnormal and coarse; the row's largest value must map to +-448", pytrace=False)
    assert torch.allclose(scales, expected_scales, rtol=1e-6, atol=0), (
        f"scales must be max|row| / 448 per row (at least 1e-12 / 448 for a row of zeros): expected "
        f"{expected_scales[:4, 0].tolist()}..., got {scales[:4, 0].tolist()}..."
    )
    largest = codes.float().abs().amax(1)
    assert bool((largest[torch.arange(len(t)) != 7] == E4M3_MAX).all()), (
        f"each row's largest magnitude must become 448 exactly, got row maxima {largest.tolist()}"
    )
    mismatch = codes.view(torch.uint8) != expected_codes.view(torch.uint8)
    assert not bool(mismatch.any()), (
        f"codes must be t / scale rounded to the nearest e4m3fn value (torch's conversion, ties to even): "
        f"{int(mismatch.sum())} of {mismatch.numel()} differ, first at {mismatch.nonzero()[0].tolist()}"
    )


def test_one_scale_for_the_whole_tensor(fp8):
    t = rows_of_many_magnitudes(seed=1)
    codes, scales = check_codes(fp8.quantize_e4m3(t, per_row=False), tuple(t.shape), (1, 1), "per tensor")
    expected_codes, expected_scales = reference_e4m3(t, per_row=False)
    assert torch.allclose(scales, expected_scales, rtol=1e-6), (
        f"the per-tensor scale must be max|t| / 448 = {expected_scales.item():.6g}, got {scales.flatten().tolist()}"
    )
    assert torch.equal(codes.view(torch.uint8), expected_codes.view(torch.uint8)), (
        "per-tensor codes differ from t / scale rounded to e4m3fn (small rows underflow to zero: that is expected)"
    )


def test_a_given_scale_saturates_instead_of_producing_nan(fp8):
    """A static scale (calibrated once for activations) meets values beyond its range: they must clamp to +-448."""
    t = torch.tensor([[600.0, -1000.0, 449.0, 470.0, 1.0, -448.0, 3e38, 100.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0,
                                                                              7.0, 8.0]])  # fmt: skip
    scale = torch.tensor([[1.0], [0.001]])
    codes, scales = check_codes(fp8.quantize_e4m3(t, per_row=True, scale=scale), (2, 8), (2, 1), "given scales")
    values = codes.float()
    if bool(values.isnan().any()):
        pytest.fail(f"values beyond 448 became NaN ({values.tolist()}): no saturation. e4m3fn has no infinity; "
                    "clamp to +-448 before converting", pytrace=False)  # fmt: skip
    assert values.tolist() == [[448.0, -448.0, 448.0, 448.0, 1.0, -448.0, 448.0, 96.0], [448.0] * 8], (
        f"saturating conversion expected [[448, -448, 448, 448, 1, -448, 448, 96], [448] * 8], got {values.tolist()}"
    )
    assert torch.equal(scales, scale), "a given scale must come back as it was given"


BAD_QUANTIZE = {
    "a 1-d tensor": lambda q: q.quantize_e4m3(torch.ones(8)),
    "an integer tensor": lambda q: q.quantize_e4m3(torch.ones(2, 8, dtype=torch.int32)),
    "a zero scale": lambda q: q.quantize_e4m3(torch.ones(2, 8), True, torch.zeros(2, 1)),
    "a scale of the wrong shape": lambda q: q.quantize_e4m3(torch.ones(2, 8), True, torch.ones(8, 1)),
}


@pytest.mark.parametrize("bad", BAD_QUANTIZE)
def test_quantize_rejects_bad_input(fp8, bad):
    expect_error((TypeError, ValueError), lambda: BAD_QUANTIZE[bad](fp8), f"quantize_e4m3 with {bad}")


# --- the W8A8 product -----------------------------------------------------------------------------------------------


def w8a8_reference(x, weight_codes, weight_scale, per_token: bool, variant: str | None = None) -> torch.Tensor:
    """float64 [M, N]: the activations quantized as asked, times the weight's codes, both scales applied."""
    if variant == "activations not quantized":
        return x.double() @ (weight_codes.double() * weight_scale.double()).T
    per_row = per_token if variant != "activation scale per tensor" else False
    x_codes, x_scale = reference_e4m3(x, per_row)
    if variant == "activation scale per column":
        x_scale = x.abs().amax(0, keepdim=True).float().clamp_min(1e-12) / E4M3_MAX
        x_codes = (x.float() / x_scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
        return (x_codes.double() * x_scale.double()) @ (weight_codes.double() * weight_scale.double()).T
    product = x_codes.double() @ weight_codes.double().T
    if variant == "weight scale not applied":
        return product * x_scale.double()
    if variant == "activation scale not applied":
        return product * weight_scale.double().T
    return product * x_scale.double() * weight_scale.double().T


PRODUCT_MISTAKES = ("activations not quantized", "activation scale per tensor", "activation scale per column",
                    "weight scale not applied", "activation scale not applied")  # fmt: skip


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-300))


@pytest.mark.parametrize("per_token", [True, False], ids=["per-token", "per-tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fp8_linear_is_the_scaled_product_of_the_codes(fp8, per_token, dtype):
    generator = torch.Generator().manual_seed(3)
    x = (torch.randn(40, 96, generator=generator) * torch.logspace(-2, 2, 40)[:, None]).to(dtype)
    weight = torch.randn(48, 96, generator=generator) * torch.logspace(-1, 1, 48)[:, None]
    weight_codes, weight_scale = reference_e4m3(weight, per_row=True)
    got = fp8.fp8_linear(x, weight_codes, weight_scale, per_token=per_token)
    assert isinstance(got, torch.Tensor) and tuple(got.shape) == (40, 48) and got.dtype == dtype, (
        f"fp8_linear returns [M, N] = [40, 48] in x's dtype {dtype}, got {getattr(got, 'dtype', type(got))} "
        f"{list(getattr(got, 'shape', []))}"
    )
    expected = w8a8_reference(x, weight_codes, weight_scale, per_token)
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3  # float32 sums; bf16 rounds the output once
    # Per row: rows of small activations must be as right as rows of large ones (a per-token scale's point).
    worst = max(relative_error(got[m], expected[m]) for m in range(len(x)))
    if worst <= tolerance:
        return
    named = [v for v in PRODUCT_MISTAKES if max(relative_error(got[m], w8a8_reference(x, weight_codes, weight_scale,
             per_token, v)[m]) for m in range(len(x))) <= tolerance]  # fmt: skip
    pytest.fail(f"fp8_linear ({'per-token' if per_token else 'per-tensor'} activations, {dtype}): worst row's "
                f"relative error {worst:.2e} against the scaled product of the codes (needs <= {tolerance:g})"
                + (f": exactly what {named[0]} gives" if named else ""), pytrace=False)  # fmt: skip


def test_fp8_linear_takes_a_per_tensor_weight_scale(fp8):
    generator = torch.Generator().manual_seed(4)
    x, weight = torch.randn(16, 64, generator=generator), torch.randn(32, 64, generator=generator)
    weight_codes, weight_scale = reference_e4m3(weight, per_row=False)
    got = fp8.fp8_linear(x, weight_codes, weight_scale, per_token=True)
    expected = w8a8_reference(x, weight_codes, weight_scale, True)
    assert relative_error(got, expected) <= 1e-5, (
        f"with one weight scale [1, 1], relative error {relative_error(got, expected):.2e} against the scaled product"
    )


BAD_LINEAR = {
    "K mismatch": lambda q, x, c, s: q.fp8_linear(x[:, :32], c, s),
    "a weight that is not float8_e4m3fn": lambda q, x, c, s: q.fp8_linear(x, c.float(), s),
    "weight scales of the wrong shape": lambda q, x, c, s: q.fp8_linear(x, c, s[:5]),
    "a 3-d x": lambda q, x, c, s: q.fp8_linear(x[None], c, s),
}


@pytest.mark.parametrize("bad", BAD_LINEAR)
def test_fp8_linear_rejects_bad_input(fp8, bad):
    x, weight = torch.randn(4, 64), torch.randn(16, 64)
    codes, scale = reference_e4m3(weight, per_row=True)
    expect_error((TypeError, ValueError), lambda: BAD_LINEAR[bad](fp8, x, codes, scale), f"fp8_linear with {bad}")


# --- on the course model's activations ------------------------------------------------------------------------------


@functools.cache
def course_inputs():
    """The inputs of layers 0 and 3's linears, from the float course model on 2 x 256 calibration tokens."""
    llama = course_llama(layers=4)
    hidden = llama.embed(text_windows("calibration", 256, 2))
    inputs = {}
    with torch.no_grad():
        for layer in range(4):
            hidden, found = decoder_layer(llama, layer, hidden)
            if layer in (0, 3):
                inputs[layer] = found
    return llama, inputs


# The reference's worst relative output error on layers 0 and 3 (float32 sums on a CPU): 0.031 with per-token and
# per-channel scales, 0.032 per tensor (this small model has no outlier channels for per-row scales to isolate);
# bf16 operands (8 significant bits against e4m3's 4): 0.002.
W8A8_BOUND = 0.05


@pytest.mark.points(2)
def test_w8a8_output_error_on_the_course_model(fp8):
    llama, inputs = course_inputs()
    lines, worst = [], {}
    for layer in (0, 3):
        for name in LINEARS:
            weight = getattr(llama.layers[layer], name)
            x = inputs[layer][name].reshape(-1, weight.shape[1])
            expected = x.double() @ weight.double().T
            errors = {}
            for per_row in (True, False):
                codes, scale = reference_e4m3(weight, per_row)
                errors[per_row] = relative_error(fp8.fp8_linear(x, codes, scale, per_token=per_row), expected)
            lines.append(f"layer {layer} {name}: {errors[True]:.3f} per token/channel, {errors[False]:.3f} per tensor")
            worst = {k: max(worst.get(k, 0.0), v) for k, v in errors.items()}
    assert worst[True] <= W8A8_BOUND, (
        f"W8A8 relative output error on the course model's activations must stay under {W8A8_BOUND} (e4m3's "
        "relative step is 2^-3; the reference reaches 0.031): " + "; ".join(lines)
    )


# --- on a GPU: the tensor cores -------------------------------------------------------------------------------------


def fp8_tensor_cores() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


NO_FP8_REASON = "not graded on this hardware: FP8 tensor cores need compute capability 8.9 (Ada) or 9.0 (Hopper)"
needs_fp8 = pytest.mark.skipif(torch.cuda.is_available() and not fp8_tensor_cores(), reason=NO_FP8_REASON)


@pytest.mark.gpu
@needs_fp8
def test_fp8_linear_on_the_tensor_cores_agrees_with_the_scaled_product(fp8):
    generator = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(256, 512, device="cuda", generator=generator).bfloat16()
    weight = torch.randn(384, 512, device="cuda", generator=generator) * 0.02
    codes, scale = reference_e4m3(weight, per_row=True)
    for per_token in (True, False):
        got = fp8.fp8_linear(x, codes, scale, per_token=per_token)
        assert got.device.type == "cuda" and got.dtype == torch.bfloat16, "fp8_linear on CUDA returns bf16 on CUDA"
        error = relative_error(got, w8a8_reference(x, codes, scale, per_token))
        assert error <= 8e-3, f"on the tensor cores: relative error {error:.2e} against the scaled product of the codes"


# (N, K) of Llama-3-8B's linears: qkv (32 + 2 x 8 heads of 128), o, gate and up stacked, down.
LLAMA3_8B_LAYERS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
PREFILL_TOKENS = 2048


@pytest.mark.speed
@needs_fp8
@pytest.mark.points(2)
@pytest.mark.parametrize("layer", LLAMA3_8B_LAYERS)
def test_prefill_speedup_over_bf16(fp8, speed, layer):
    """A prefill of 2048 tokens through one Llama-3-8B linear: W8A8 (activations quantized per token inside the
    call, weight per channel) against bf16 x @ W.T on the same inputs."""
    N, K = LLAMA3_8B_LAYERS[layer]
    weight = torch.randn(N, K, device="cuda") * 0.02
    weight_bf16 = weight.bfloat16()
    codes, scale = reference_e4m3(weight, per_row=True)

    def setup():
        return (torch.randn(PREFILL_TOKENS, K, device="cuda").bfloat16(), codes, scale), {}

    def check(out, x, *args, **kwargs):
        assert out.dtype == torch.bfloat16 and tuple(out.shape) == (PREFILL_TOKENS, N), "[M, N] bf16 expected"
        error = relative_error(out.float(), (x.float() @ weight.T))
        assert error <= W8A8_BOUND, f"timed W8A8 output: relative error {error:.3f} against the float product"

    def bf16_matmul(x, *_):
        return x @ weight_bf16.T

    baseline = speed.time(bf16_matmul, setup, rounds=10, warmup=3, check=check)
    timing = speed.bench(fp8.fp8_linear, setup, rounds=20, warmup=3, check=check)
    flops = 2 * PREFILL_TOKENS * N * K
    detail = (f"W8A8 {timing.median * 1e6:.0f} us ({flops / timing.median / 1e12:.0f} TFLOP/s), bf16 "
              f"{baseline.median * 1e6:.0f} us ({flops / baseline.median / 1e12:.0f} TFLOP/s)")  # fmt: skip
    speed.judge(f"fp8_prefill_speedup_{layer}", baseline.median / timing.median, detail=detail)
