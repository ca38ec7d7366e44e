"""Exercise 09: FP8 W8A8, both operands of the matmul in e4m3, for the compute wall.

Int4 weight-only schemes (exercises 03 and 08) shrink the bytes a decode step reads; they do nothing for prefill,
where thousands of tokens share each weight and the tensor cores' rate is the limit. FP8 attacks that limit: on
Hopper an e4m3 x e4m3 matmul runs at twice bf16's rate. Both operands must be FP8, so the activations are quantized
too, at every call, from their own range ("dynamic" scales).

A tensor t [R, C] is stored as e4m3fn codes c and float32 scales s, t ~ c * s: one scale per tensor, or one per row
(a weight [N, K]'s rows are its output channels; activations [M, K]'s rows are tokens). e4m3fn: 4 exponent bits, 3
mantissa bits, largest finite value 448, no infinity. With s = max|row| / 448 each row uses the whole range.

Row scales factor out of the product: y[m, n] = s_x[m] s_w[n] sum_k c_x[m, k] c_w[n, k]. The tensor cores multiply
the raw codes (exact products, float32 sums) and the scales are applied to the output: `torch._scaled_mm(a, b,
scale_a, scale_b, out_dtype)` on GPUs with FP8 tensor cores (compute capability 8.9, Ada, or 9.0, Hopper); elsewhere
emulate the same arithmetic in float32. Run `pytest exercises/09`.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn value
FP8 = torch.float8_e4m3fn


def quantize_e4m3(t: torch.Tensor, per_row: bool = True, scale: torch.Tensor | None = None):
    """t [R, C] (any float dtype) -> (codes float8_e4m3fn [R, C], scales float32 [R, 1] per row or [1, 1] per tensor).

    scale defaults to max|t| over each row (per_row) or over the whole tensor, divided by 448 and at least
    1e-12 / 448 (a row of zeros). A given scale (a static one, calibrated offline) must be positive and finite, of
    the same shape; values beyond its range must *saturate*: codes = clamp(t / scale, -448, 448), rounded to the
    nearest e4m3fn value (torch's .to(torch.float8_e4m3fn) rounds to nearest, ties to even; it is allowed here).
    Without the clamp, an overflowing value becomes NaN. TypeError for a tensor that is not 2-d floating point,
    ValueError for a bad given scale.
    """
    # TODO: amax per row (keepdim) or of the whole tensor, in float32; divide, clamp, convert.
    raise NotImplementedError("quantize_e4m3: scale = max|row| / 448, codes = clamp(t / scale, +-448) as e4m3fn")


def dequantize_e4m3(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 [R, C]: the values codes [R, C] with scales [R, 1] or [1, 1] stand for, codes * scale."""
    # TODO: one line.
    raise NotImplementedError("dequantize_e4m3: codes.float() * scale")


def scaled_mm_available(device) -> bool:
    """Whether `device` has FP8 tensor cores: a CUDA device of compute capability (8, 9) or later."""
    # TODO: torch.cuda.get_device_capability(device) on a CUDA device; False on any other device.
    raise NotImplementedError("scaled_mm_available: CUDA and compute capability >= (8, 9)")


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, per_token: bool = True
) -> torch.Tensor:
    """y = x @ W^T in W8A8. x [M, K] bf16, fp16 or float32, quantized here (per token, or per tensor if not
    per_token); weight float8_e4m3fn [N, K] quantized offline, with weight_scale float32 [N, 1] (per output channel)
    or [1, 1] (per tensor). Returns [M, N] in x's dtype.

    On a device with FP8 tensor cores (and K, N multiples of 16): torch._scaled_mm(x_codes, weight.t(),
    scale_a=x_scale, scale_b=w_scale.t(), out_dtype=...). It wants the second operand column-major, which weight.t()
    of a row-major [N, K] is; row-wise scaling wants both scales row-wise (expand a [1, 1] scale to [M, 1] or
    [N, 1]) and out_dtype=torch.bfloat16. Elsewhere: (x_codes.float() @ weight.float().t()) * x_scale *
    weight_scale.t(), then to x's dtype: the same arithmetic, emulated.
    TypeError for an x that is not 2-d floating point or a weight that is not 2-d float8_e4m3fn; ValueError for K
    that differs, a weight_scale of another shape, or tensors on different devices.
    """
    # TODO: validate; quantize x with quantize_e4m3; then _scaled_mm or the emulation.
    raise NotImplementedError("fp8_linear: quantize x per token, multiply the codes, apply both scales to the output")
