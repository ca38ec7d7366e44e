"""Exercise 08 reference solution: post-training quantization (RTN, AWQ, GPTQ), perplexity, and export formats.

Weights are [N, K] = [out, in] (nn.Linear's layout, y = x @ W.T); groups are G consecutive input channels of a row.
The integer convention is exercise 03's: w = (q - z) * s with q, z in 0 .. 2^bits - 1, scales stored in fp16.

* RTN rounds each group on its own range.
* AWQ multiplies input channel k by s_k = mean|x_k|^alpha before rounding, so the channels that large activations
  read keep more precision, and divides s back out of the operator that produces x (free at inference). alpha comes
  from a grid search on the layer's output error; the error is computed from the Gram matrix X^T X, so each alpha
  costs N K^2 instead of n N K.
* GPTQ quantizes one input column at a time and spreads its rounding error over the columns not yet quantized,
  weighted by the inverse Hessian of the layer's squared output error, H = 2 X^T X / n. The upper Cholesky factor U
  of H^-1 holds every update's coefficients (row i of U, divided by U_ii). Columns are handled in blocks: inside a
  block the update is applied column by column; the block's errors reach the later columns in one matrix product.
  With act-order, columns go by decreasing diag(H) and each group keeps the scale and zero point computed from its
  original weights ("static groups"), so groups stay contiguous in the original column order, as exporters need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fixtures.quantization import LINEARS, decoder_layer, forward

BITS = (4, 8)
METHODS = ("rtn", "awq", "gptq")
FP8_MAX = 448.0  # the largest finite float8 e4m3fn value: 1.75 * 2^8
SCALE_FLOOR = 1e-5  # the smallest group range, so that a constant group does not divide by zero


@dataclass
class QuantizedTensor:
    """A [N, K] weight matrix as integer codes: w[n, k] = (codes[n, k] - zeros[n, g]) * scales[n, g], g = k // G."""

    codes: torch.Tensor  # uint8 [N, K], values 0 .. 2^bits - 1
    scales: torch.Tensor  # float16 [N, K // G]
    zeros: torch.Tensor  # uint8 [N, K // G], values 0 .. 2^bits - 1
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]: the fake-quantized weights, exactly (a small integer times an fp16 scale is exact)."""
        scales = self.scales.float().repeat_interleave(self.group_size, dim=1)
        zeros = self.zeros.float().repeat_interleave(self.group_size, dim=1)
        return (self.codes.float() - zeros) * scales


# ----------------------------------------------------------------------------------------------------------------
# Round to nearest
# ----------------------------------------------------------------------------------------------------------------


def _check_weight(name: str, weight: torch.Tensor, bits: int, group_size: int) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise TypeError(f"{name}: weight must be a 2-d floating-point tensor [N, K], got {_describe(weight)}")
    if bits not in BITS:
        raise ValueError(f"{name}: bits must be 4 or 8, got {bits!r}")
    if not isinstance(group_size, int) or group_size < 1 or weight.shape[1] % group_size != 0:
        raise ValueError(f"{name}: group size {group_size!r} does not divide the {weight.shape[1]} input channels")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__


def _group_params(groups: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """groups [..., G] float32 -> (scale fp16 [...], zero float32 [...]) of the asymmetric min/max quantizer."""
    top = 2**bits - 1
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low).clamp_min(SCALE_FLOOR) / top).half()
    zero = (-torch.round(low / scale.float())).clamp(0, top)  # a group of one sign puts z outside 0 .. top
    return scale, zero


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return (torch.round(w / scale) + zero).clamp(0, 2**bits - 1)


def _fake_quantize(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """quantize_rtn(weight).dequantize() without building the codes: float32 [N, K] (the searches' inner loop)."""
    N, K = weight.shape
    groups = weight.reshape(N, K // group_size, group_size)
    scale, zero = _group_params(groups, bits)
    scale, zero = scale.float()[..., None], zero[..., None]
    return ((_codes(groups, scale, zero, bits) - zero) * scale).reshape(N, K)


def quantize_rtn(weight: torch.Tensor, bits: int = 4, group_size: int = 128) -> QuantizedTensor:
    """Round-to-nearest asymmetric group quantization of weight [N, K]."""
    _check_weight("quantize_rtn", weight, bits, group_size)
    N, K = weight.shape
    groups = weight.detach().float().reshape(N, K // group_size, group_size)
    scale, zero = _group_params(groups, bits)
    codes = _codes(groups, scale.float()[..., None], zero[..., None], bits)
    return QuantizedTensor(codes.reshape(N, K).to(torch.uint8), scale, zero.to(torch.uint8), bits, group_size)


# ----------------------------------------------------------------------------------------------------------------
# GPTQ
# ----------------------------------------------------------------------------------------------------------------


def _tokens(name: str, x: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """x [..., K] -> float32 [n, K], checked: at least one token, the expected channel count."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.dtype.is_floating_point:
        raise TypeError(f"{name}: activations must be a floating-point tensor [..., K], got {_describe(x)}")
    if channels is not None and x.shape[-1] != channels:
        raise ValueError(f"{name}: activations have {x.shape[-1]} channels, the weight {channels} input channels")
    flat = x.detach().reshape(-1, x.shape[-1]).float()
    if flat.shape[0] == 0:
        raise ValueError(f"{name}: the calibration set is empty (no tokens)")
    return flat


def hessian(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> float32 [K, K] = 2 X^T X / n over the n = prod(x.shape[:-1]) tokens."""
    flat = _tokens("hessian", x)
    return 2 * (flat.T @ flat) / flat.shape[0]


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> QuantizedTensor:
    """GPTQ of weight [N, K] against the layer Hessian [K, K]."""
    _check_weight("gptq_quantize", weight, bits, group_size)
    N, K = weight.shape
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (K, K):
        raise ValueError(f"gptq_quantize: hessian must be [{K}, {K}], got {_describe(hessian)}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"gptq_quantize: block_size must be a positive int, got {block_size!r}")
    if not (isinstance(damp, (int, float)) and damp > 0):
        raise ValueError(f"gptq_quantize: damp must be a positive fraction of the mean diagonal, got {damp!r}")
    G = group_size
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = H.diagonal() == 0  # an input channel no calibration token used: nothing to fit, drop its weights
    H[dead, dead] = 1
    W[:, dead] = 0
    scales = torch.empty(N, K // G, dtype=torch.float16)
    zeros = torch.empty(N, K // G)
    order = torch.arange(K)
    if act_order:
        # Static groups: every group's parameters from its original weights, before any error reaches them.
        scales[:], zeros[:] = _group_params(W.reshape(N, K // G, G), bits)
        order = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[:, order], H[order][:, order]
    H.diagonal().add_(damp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.empty(N, K)
    columns = order.tolist()  # the original column at each position
    for b0 in range(0, K, block_size):
        b1 = min(b0 + block_size, K)
        block = W[:, b0:b1].clone()
        errors = torch.zeros(N, b1 - b0)
        for i in range(b1 - b0):
            column = columns[b0 + i]
            g = column // G
            if not act_order and column % G == 0:  # a group starts: its range from the columns as they are now
                current = block[:, i : i + G]
                if b0 + i + G > b1:  # the group runs past the block: add the block's pending updates to the rest
                    rest = W[:, b1 : b0 + i + G] - errors[:, :i] @ U[b0 : b0 + i, b1 : b0 + i + G]
                    current = torch.cat([current, rest], dim=1)
                scales[:, g], zeros[:, g] = _group_params(current, bits)
            scale, zero = scales[:, g].float(), zeros[:, g]
            w = block[:, i]
            q = _codes(w, scale, zero, bits)
            codes[:, b0 + i] = q
            error = (w - (q - zero) * scale) / U[b0 + i, b0 + i]
            block[:, i:] -= error[:, None] * U[b0 + i, b0 + i : b1][None, :]
            errors[:, i] = error
        W[:, b1:] -= errors @ U[b0:b1, b1:]  # the lazy batch update: the whole block's errors at once
    if act_order:
        codes = codes[:, torch.argsort(order)]  # back to the original column order
    return QuantizedTensor(codes.to(torch.uint8), scales, zeros.to(torch.uint8), bits, G)


# ----------------------------------------------------------------------------------------------------------------
# AWQ
# ----------------------------------------------------------------------------------------------------------------


def awq_scales(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """x [..., K] -> float32 [K]: mean|x|^alpha per input channel (at least 1e-4), over sqrt(max * min)."""
    return _scales_from_magnitude(_tokens("awq_scales", x).abs().mean(0), alpha)


def _scales_from_magnitude(magnitude: torch.Tensor, alpha: float) -> torch.Tensor:
    scales = magnitude.pow(alpha).clamp_min(1e-4)
    return scales / (scales.max() * scales.min()).sqrt()


def awq_search(
    weight: torch.Tensor, x: torch.Tensor, bits: int = 4, group_size: int = 128, grid: int = 20
) -> tuple[torch.Tensor, float, list[float]]:
    """Grid search of alpha in 0, 1/grid, ..., (grid-1)/grid -> (scales [K], best alpha, output error per alpha)."""
    _check_weight("awq_search", weight, bits, group_size)
    if not isinstance(grid, int) or grid < 1:
        raise ValueError(f"awq_search: grid must be a positive int, got {grid!r}")
    flat = _tokens("awq_search", x, weight.shape[1])
    W = weight.detach().float()
    gram = flat.T @ flat  # sum over tokens of x x^T: ||X D^T||^2 = sum of the rows of D gram D^T
    magnitude = flat.abs().mean(0)
    errors = []
    for step in range(grid):
        scales = _scales_from_magnitude(magnitude, step / grid)
        difference = W - _fake_quantize(W * scales, bits, group_size) / scales
        errors.append(float(((difference @ gram) * difference).sum()) / (flat.shape[0] * W.shape[0]))
    best = min(range(grid), key=errors.__getitem__)  # the first of equal errors: the smallest alpha
    return _scales_from_magnitude(magnitude, best / grid), best / grid, errors


def awq_clip(
    weight: torch.Tensor,
    x: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    grid: int = 20,
    max_shrink: float = 0.5,
    tokens: int = 512,
) -> torch.Tensor:
    """AWQ's clipping search: weight [N, K] clamped, per row and group, to the range that best keeps the output.

    Candidates for a group of row n: [-r m, r m], m = max|w| over the group, r = 1 - i/grid for i = 0, 1, ... while
    i < max_shrink * grid. The error of a candidate is the mean over the calibration tokens (every step-th token,
    step = max(1, n // tokens)) of the squared change of the group's share of the output, sum_k x_k (Q(c)_k - w_k).
    """
    _check_weight("awq_clip", weight, bits, group_size)
    if not isinstance(grid, int) or grid < 1 or not 0 <= max_shrink < 1:
        raise ValueError(f"awq_clip: grid must be a positive int and max_shrink in [0, 1), got {grid!r}, "
                         f"{max_shrink!r}")  # fmt: skip
    flat = _tokens("awq_clip", x, weight.shape[1])
    flat = flat[:: max(1, flat.shape[0] // tokens)]
    N, K = weight.shape
    G = group_size
    W = weight.detach().float().reshape(N, K // G, G)
    X = flat.T.reshape(K // G, G, -1)  # [groups, G, tokens]
    reference = torch.einsum("ngk,gkt->ngt", W, X)
    top = W.abs().amax(-1, keepdim=True)
    best_error = torch.full((N, K // G, 1), math.inf)
    best_ratio = torch.ones(N, K // G, 1)
    for step in range(math.ceil(max_shrink * grid)):
        ratio = 1 - step / grid
        candidate = W.clamp(-top * ratio, top * ratio)
        quantized = _fake_quantize(candidate.reshape(N, K), bits, G).reshape(N, K // G, G)
        error = (torch.einsum("ngk,gkt->ngt", quantized, X) - reference).pow(2).mean(-1, keepdim=True)
        better = error < best_error  # the first of equal errors: the widest range
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better, ratio, best_ratio)
    return W.clamp(-top * best_ratio, top * best_ratio).reshape(N, K)


def fold_awq_scales(llama, layer: int, linear: str, scales: torch.Tensor) -> None:
    """Multiply the input columns of `linear` by scales [K] and divide them out of the operator before it."""
    if linear not in ("qkv", "gate_up", "down"):
        raise ValueError(
            f"fold_awq_scales: {linear!r} has no per-channel operator before it to fold scales into "
            "(qkv, gate_up and down have: the two RMSNorm weights and the up projection)"
        )
    w = llama.layers[layer]
    weight = getattr(w, linear)
    if not isinstance(scales, torch.Tensor) or tuple(scales.shape) != (weight.shape[1],):
        raise ValueError(f"fold_awq_scales: scales must be [{weight.shape[1]}], got {_describe(scales)}")
    if not bool((scales > 0).all()):
        raise ValueError("fold_awq_scales: scales must be positive (and finite)")
    scales = scales.to(weight.dtype)
    weight.mul_(scales)
    if linear == "qkv":
        w.attention_norm.div_(scales)
    elif linear == "gate_up":
        w.mlp_norm.div_(scales)
    else:  # down reads silu(gate) * up: dividing up's rows by s divides down's input by s
        w.gate_up[weight.shape[1] :].div_(scales[:, None])


# ----------------------------------------------------------------------------------------------------------------
# The whole model
# ----------------------------------------------------------------------------------------------------------------


def quantize_model(
    llama, calibration: torch.Tensor, method: str, bits: int = 4, group_size: int = 128
) -> dict[tuple[int, str], QuantizedTensor]:
    """Quantize every linear layer of every decoder layer in place; return the codes by (layer, name)."""
    if method not in METHODS:
        raise ValueError(f"quantize_model: method must be one of {METHODS}, got {method!r}")
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.dtype != torch.long:
        raise TypeError(f"quantize_model: calibration must be int64 token ids [B, T], got {_describe(calibration)}")
    if calibration.numel() == 0:
        raise ValueError("quantize_model: the calibration set is empty")
    if bits not in BITS:
        raise ValueError(f"quantize_model: bits must be 4 or 8, got {bits!r}")
    for w in llama.layers:
        for name in LINEARS:
            channels = getattr(w, name).shape[1]
            if not isinstance(group_size, int) or group_size < 1 or channels % group_size:
                raise ValueError(f"quantize_model: group size {group_size!r} does not divide {name}'s {channels} "
                                 "input channels")  # fmt: skip
    quantized = {}
    hidden = llama.embed(calibration) if method != "rtn" else None
    with torch.no_grad():
        for layer, w in enumerate(llama.layers):
            inputs = decoder_layer(llama, layer, hidden)[1] if method != "rtn" else {}
            if method == "awq":  # every search on the layer's float inputs, then every fold, then clipping
                found = {name: awq_search(getattr(w, name), inputs[name], bits, group_size)[0]
                         for name in ("qkv", "gate_up", "down")}  # fmt: skip
                for name, scales in found.items():
                    fold_awq_scales(llama, layer, name, scales)
                inputs = decoder_layer(llama, layer, hidden)[1]  # the same outputs; the inputs are now x / s
                for name in LINEARS:
                    getattr(w, name).copy_(awq_clip(getattr(w, name), inputs[name], bits, group_size))
            for name in LINEARS:
                weight = getattr(w, name)
                if method == "gptq":
                    result = gptq_quantize(weight, hessian(inputs[name]), bits, group_size, act_order=True)
                else:
                    result = quantize_rtn(weight, bits, group_size)
                weight.copy_(result.dequantize())
                quantized[(layer, name)] = result
            if method != "rtn":  # the next layer calibrates on what this quantized layer produces
                hidden = decoder_layer(llama, layer, hidden)[0]
    return quantized


@torch.no_grad()
def perplexity(llama, ids: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean negative log-likelihood) of every token of ids [B, T] after the first of its row."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
        raise TypeError(f"perplexity: ids must be int64 token ids [B, T], got {_describe(ids)}")
    if ids.shape[0] == 0 or ids.shape[1] < 2:
        raise ValueError(f"perplexity: need at least one row of two tokens, got shape {list(ids.shape)}")
    total = 0.0
    for rows in ids.split(batch_size):
        logits = forward(llama, rows)[:, :-1]  # row t predicts token t + 1
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="sum"))
    return math.exp(total / (ids.shape[0] * (ids.shape[1] - 1)))


# ----------------------------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------------------------

AWQ_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)  # column j of eight lives in nibble AWQ_NIBBLE[j] (exercise 03)


def export_awq(quantized: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit codes [N, K] -> AutoAWQ GEMM tensors (qweight int32 [K, N/8], scales fp16 [K/G, N], qzeros int32)."""
    if not isinstance(quantized, QuantizedTensor) or quantized.bits != 4:
        raise ValueError("export_awq: the AWQ layout holds 4-bit codes only")
    N, K = quantized.codes.shape
    if N % 8:
        raise ValueError(f"export_awq: the output channels ({N}) must be a multiple of 8")
    return _pack(quantized.codes.T), quantized.scales.T.contiguous(), _pack(quantized.zeros.T)


def _pack(values: torch.Tensor) -> torch.Tensor:
    v = values.to(torch.int64).reshape(values.shape[0], -1, 8)
    words = (v << (4 * torch.tensor(AWQ_NIBBLE))).sum(-1)  # disjoint nibbles: the sum is an OR
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


GGUF_BLOCK = 32


def export_gguf(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """weight [N, K] -> uint8 [N, K/32 * block bytes]: each row's GGUF blocks of 32 weights, Q8_0 or Q4_0."""
    if kind not in ("Q8_0", "Q4_0"):
        raise ValueError(f"export_gguf: kind must be 'Q8_0' or 'Q4_0', got {kind!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise TypeError(f"export_gguf: weight must be a 2-d floating-point tensor, got {_describe(weight)}")
    N, K = weight.shape
    if K % GGUF_BLOCK:
        raise ValueError(f"export_gguf: the row length {K} must be a multiple of the block size 32")
    blocks = weight.detach().float().reshape(N, K // GGUF_BLOCK, GGUF_BLOCK)
    if kind == "Q8_0":
        d = blocks.abs().amax(-1, keepdim=True) / 127
        inverse = torch.where(d == 0, 0.0, 1 / d)
        scaled = blocks * inverse
        magnitude = scaled.abs()
        whole = torch.floor(magnitude)
        q = scaled.sign() * (whole + torch.floor(2 * (magnitude - whole)))  # half away from zero, as C's roundf
        payload = q.to(torch.int8).view(torch.uint8)
    else:
        index = blocks.abs().argmax(-1, keepdim=True)  # the first of equal magnitudes
        d = blocks.gather(-1, index) / -8  # signed: the largest magnitude maps to code 0, i.e. -8
        inverse = torch.where(d == 0, 0.0, 1 / d)
        q = torch.trunc(blocks * inverse + 8.5).clamp(0, 15).to(torch.uint8)
        payload = q[..., :16] | (q[..., 16:] << 4)  # byte j: weight j in the low nibble, weight j + 16 high
    scale = d.half().view(torch.uint8).reshape(N, K // GGUF_BLOCK, 2)  # fp16, little-endian
    return torch.cat([scale, payload], dim=-1).reshape(N, -1)


def quantize_fp8(weight: torch.Tensor, scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (float8_e4m3fn [N, K], float32 scales [N]): w ~ fp8 * scale per output channel."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise TypeError(f"quantize_fp8: weight must be a 2-d floating-point tensor, got {_describe(weight)}")
    w = weight.detach().float()
    if scales is None:
        scales = w.abs().amax(1).clamp_min(1e-12) / FP8_MAX
    elif not isinstance(scales, torch.Tensor) or tuple(scales.shape) != (w.shape[0],) or not bool((scales > 0).all()):
        raise ValueError(f"quantize_fp8: scales must be positive, one per output channel [{w.shape[0]}]")
    x = (w / scales.float()[:, None]).clamp(-FP8_MAX, FP8_MAX)  # saturate: e4m3fn has no infinity
    return _e4m3_bits(x).view(torch.float8_e4m3fn), scales.float()


def _e4m3_bits(x: torch.Tensor) -> torch.Tensor:
    """Finite float32 x with |x| <= 448 -> uint8 e4m3fn codes, rounded to nearest even.

    e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent field 0 holds the subnormals m * 2^-9.
    A magnitude with exponent e >= -6 is 2^e * (1 + m/8): its code is (e + 7) * 8 + m. A mantissa that rounds up to
    8 carries into the exponent by itself, because the code is a plain sum.
    """
    magnitude = x.abs()
    exponent = torch.floor(torch.log2(magnitude.clamp_min(2.0**-6)))
    exponent = exponent - (torch.exp2(exponent) > magnitude).float() + (torch.exp2(exponent + 1) <= magnitude).float()
    exponent = exponent.clamp_min(-6)  # below 2^-6: subnormal steps of 2^-9
    step = torch.exp2(exponent - 3)
    code = torch.round(magnitude / step) + torch.where(magnitude >= 2.0**-6, (exponent + 7) * 8 - 8, 0.0)
    return (code.to(torch.uint8) | torch.where(torch.signbit(x), 128, 0).to(torch.uint8)).to(torch.uint8)
