"""Exercise 09 reference solution: FP8 W8A8, both operands of the matmul in e4m3 with float32 scales.

A tensor is stored as e4m3 codes c and scales s, t ~ c * s: one scale for the whole tensor, or one per row (per
output channel of a weight [N, K], per token of activations [M, K]). The weight is quantized once, offline; the
activations at every call ("dynamic" scales), from their own max. The product of two row-scaled operands is
y[m, n] = s_x[m] * s_w[n] * sum_k c_x[m, k] c_w[n, k]: the scales factor out of the sum, so the tensor cores multiply
the raw codes (exact products, float32 accumulation) and the scales are applied to the output tile
(`torch._scaled_mm`, on GPUs with FP8 tensor cores: Ada and Hopper). Elsewhere the same arithmetic is emulated in
float32.

Quantizing the activations is part of every call, so it must cost one read of x and one write of the codes: in
torch it is four passes over float32 temporaries (|x| max, x / s, clamp, cast), which on an H100 took longer than
the FP8 matmul saved (a 2048-token prefill through Llama-3-8B's down projection ran at 0.6x of bf16). On CUDA one
Triton program per token finds the row's max, then scales, saturates and casts it: the row's second read comes
from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn value
SCALE_FLOOR = 1e-12  # a row of zeros still gets a positive scale
FP8 = torch.float8_e4m3fn


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__


def quantize_e4m3(t: torch.Tensor, per_row: bool = True, scale: torch.Tensor | None = None):
    """t [R, C] float -> (float8_e4m3fn [R, C], float32 scales [R, 1] (per row) or [1, 1] (per tensor))."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.dtype.is_floating_point or t.dtype == FP8:
        raise TypeError(f"quantize_e4m3: expected a 2-d floating-point tensor [R, C], got {_describe(t)}")
    rows = t.shape[0] if per_row else 1
    if scale is None:
        # One pass over t (no |t| temporary): the activations are quantized inside every timed prefill call.
        amax = torch.linalg.vector_norm(t, ord=float("inf"), dim=1 if per_row else None, keepdim=per_row)
        scale = amax.float().reshape(rows, 1).clamp_min(SCALE_FLOOR) / E4M3_MAX
    elif (not isinstance(scale, torch.Tensor) or tuple(scale.shape) != (rows, 1) or not scale.dtype.is_floating_point
          or not bool((scale > 0).all()) or not bool(torch.isfinite(scale).all())):  # fmt: skip
        raise ValueError(f"quantize_e4m3: a given scale must be positive and finite, shape [{rows}, 1], got "
                         f"{_describe(scale)}")  # fmt: skip
    scale = scale.float()
    # Saturate: a static (given) scale meets values beyond its range, and e4m3fn has no infinity to round them to.
    codes = (t / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(FP8)  # t / scale is float32: t's dtype promotes
    return codes, scale


@triton.jit
def _quantize_rows_kernel(x_ptr, codes_ptr, scale_ptr, K, stride_x, stride_c, FLOOR: tl.constexpr,
                          MAX: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Program row: scale[row] = max(|x[row]|, FLOOR) / MAX, codes[row] = e4m3(clamp(x[row] / scale, +-MAX)), with
    the same float32 arithmetic (IEEE division, round to nearest even) as quantize_e4m3."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)))
    scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), FLOOR), MAX)
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -MAX), MAX)
        tl.store(codes_ptr + row * stride_c + offs, q.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=offs < K)


def _quantize_rows_cuda(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_e4m3(x, per_row=True) for a CUDA x [M, K] whose rows are contiguous, in one pass."""
    M, K = x.shape
    codes = torch.empty((M, K), dtype=FP8, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    block = min(4096, triton.next_power_of_2(K))
    _quantize_rows_kernel[(M,)](x, codes, scale, K, x.stride(0), codes.stride(0), FLOOR=SCALE_FLOOR, MAX=E4M3_MAX,
                                BLOCK=block, num_warps=8 if block >= 2048 else 4)  # fmt: skip
    return codes, scale


def dequantize_e4m3(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 [R, C]: the values that codes [R, C] and scales [R, 1] or [1, 1] stand for."""
    return codes.float() * scale.float()


def scaled_mm_available(device) -> bool:
    """FP8 tensor cores: CUDA compute capability 8.9 (Ada) or 9.0 (Hopper) and later."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, per_token: bool = True
) -> torch.Tensor:
    """y = x @ W^T in W8A8: x [M, K] (bf16, fp16 or fp32) quantized here, weight e4m3 [N, K] with its scales
    [N, 1] or [1, 1]. Returns [M, N] in x's dtype."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.dtype.is_floating_point or x.dtype == FP8:
        raise TypeError(f"fp8_linear: x must be a 2-d floating-point tensor [M, K], got {_describe(x)}")
    if not isinstance(weight, torch.Tensor) or weight.dtype != FP8 or weight.dim() != 2:
        raise TypeError(f"fp8_linear: weight must be float8_e4m3fn [N, K], got {_describe(weight)}")
    N, K = weight.shape
    if x.shape[1] != K:
        raise ValueError(f"fp8_linear: x has {x.shape[1]} input channels, the weight {K}")
    if not isinstance(weight_scale, torch.Tensor) or tuple(weight_scale.shape) not in {(N, 1), (1, 1)}:
        raise ValueError(f"fp8_linear: weight_scale must be [{N}, 1] (per channel) or [1, 1] (per tensor), got "
                         f"{_describe(weight_scale)}")  # fmt: skip
    if x.device != weight.device or weight_scale.device != weight.device:
        raise ValueError(f"fp8_linear: x, weight and weight_scale must share a device, got {x.device}, "
                         f"{weight.device}, {weight_scale.device}")  # fmt: skip
    tensor_cores = scaled_mm_available(x.device) and K % 16 == 0 and N % 16 == 0
    if tensor_cores and per_token and x.stride(1) == 1:
        x_codes, x_scale = _quantize_rows_cuda(x)
    else:
        x_codes, x_scale = quantize_e4m3(x, per_row=per_token)
    w_scale = weight_scale.float()
    if tensor_cores:
        rowwise = per_token or w_scale.shape[0] != 1
        if rowwise:  # row-wise scaling takes both scales row-wise, and writes bf16
            x_scale, w_scale = x_scale.expand(x.shape[0], 1).contiguous(), w_scale.expand(N, 1).contiguous()
        out_dtype = torch.bfloat16 if rowwise else x.dtype
        y = torch._scaled_mm(x_codes, weight.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=out_dtype)
        return y.to(x.dtype)
    # Emulation: the raw codes multiplied exactly (an e4m3 product fits float32), summed in float32, then scaled.
    return ((x_codes.float() @ weight.float().t()) * x_scale * w_scale.t()).to(x.dtype)
