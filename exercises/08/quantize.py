"""Exercise 08: post-training quantization of the course model (RTN, AWQ, GPTQ) and the formats engines load.

Exercise 03 served an int4 model; this one makes it. A weight matrix W [N, K] (nn.Linear's layout: N outputs,
K inputs, y = x @ W.T) becomes small integers in groups of G consecutive *input* channels of a row, with exercise 03's
convention: w = (q - z) * s, q and z in 0 .. 2^bits - 1, one fp16 scale s and one zero point z per row and group.

  * RTN (round to nearest) rounds every group on its own min .. max range. Cheap; the baseline.
  * AWQ: a few input channels carry large activations, and their weights' rounding errors are multiplied by them.
    Multiplying input channel k of W by s_k = mean|x_k|^alpha before rounding (and dividing x_k by s_k, which is
    free: fold 1/s into the operator that produces x) gives those channels finer steps. alpha comes from a grid
    search on the layer's output error; a clipping search then narrows each group's range.
  * GPTQ quantizes one input column at a time and moves its rounding error onto the columns not yet quantized,
    weighted by the inverse Hessian of the layer's output error, H = 2 X^T X / n: the columns that follow absorb
    the error in the directions the calibration activations X do not look at.

Then `quantize_model` quantizes the course model layer by layer, `perplexity` measures what it cost, and three
exporters write the formats engines read: AutoAWQ's int4 layout (exercise 03's kernels run it), GGUF's Q8_0 and Q4_0
blocks (llama.cpp), and FP8 e4m3 with one scale per output channel.

The model is `fixtures.llama.Llama` (the course model: `fixtures.quantization.course_llama()`); a decoder layer's
linear layers are named "qkv", "out", "gate_up", "down" (fixtures/quantization.py says what each reads), and
`fixtures.quantization.decoder_layer` runs one layer and returns the input of each. Run `pytest exercises/08`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: F401

from fixtures.quantization import LINEARS, decoder_layer, forward  # noqa: F401


@dataclass
class QuantizedTensor:
    """A [N, K] weight matrix as integer codes: w[n, k] = (codes[n, k] - zeros[n, g]) * scales[n, g], g = k // G.

    Given: it is the convention every function below shares (exercise 03's, before packing).
    """

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


# --- round to nearest ----------------------------------------------------------------------------------------------


def quantize_rtn(weight: torch.Tensor, bits: int = 4, group_size: int = 128) -> QuantizedTensor:
    """Asymmetric round-to-nearest quantization of weight [N, K] (any float dtype), groups of G input channels.

    For each row and group, with top = 2^bits - 1 and all arithmetic in float32:
        s = fp16((max - min).clamp(min=1e-5) / top)      rounded to fp16 first: z and q use the stored scale
        z = clamp(-round(min / s), 0, top)
        q = clamp(round(w / s) + z, 0, top)
    round() is torch.round (half to even). A group all of one sign puts -round(min / s) outside 0 .. top: z must
    be clamped, and then so must q. Returns codes and zeros as uint8, scales as float16 [N, K // G].
    ValueError if bits is not 4 or 8 or G does not divide K; TypeError if weight is not a 2-d float tensor.
    """
    # TODO: validate; view the weight as [N, K // G, G] (groups along the input channels, the last axis), take the
    #  min and max of each group, then follow the three lines above.
    raise NotImplementedError("quantize_rtn: per row and group of G input channels, s from max - min, then z, q")


# --- GPTQ ----------------------------------------------------------------------------------------------------------


def hessian(x: torch.Tensor) -> torch.Tensor:
    """The GPTQ Hessian of a linear layer's inputs x [..., K]: float32 [K, K] = 2 X^T X / n, X = x as [n, K].

    (The Hessian of the mean squared output error with respect to each row of W.) ValueError if x holds no token.
    """
    # TODO: flatten every leading dimension into tokens; accumulate in float32.
    raise NotImplementedError("hessian: 2 X^T X / n over the n tokens of x")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> QuantizedTensor:
    """GPTQ of weight [N, K] given the layer Hessian [K, K]; the same codes convention as quantize_rtn.

    1. Copy W and H to float32. Input channels no calibration token used (H_kk = 0): set H_kk = 1 and W[:, k] = 0.
    2. act_order: first compute every group's scale and zero point from the weights as they are now (each group
       keeps them: groups stay G consecutive original columns), then visit the columns by decreasing H_kk (a stable
       sort): permute the columns of W and the rows and columns of H.
    3. Damping: H += damp * mean(diag(H)) * I (a singular H, from fewer tokens than channels, has no inverse).
    4. U = the upper Cholesky factor of H^-1 (H^-1 = U^T U).
    5. Visit the columns in order, i = 0 .. K-1. Without act_order, when column i starts a group, compute the group's
       s and z (quantize_rtn's formulas) from its G columns' values *now*, after the error the earlier columns
       passed on. Quantize column w = W[:, i] with its group's s and z, then pass its error on:
           e = (w - (q - z) * s) / U[i, i]          W[:, j] -= e * U[i, j] for every j > i
    6. Lazy batches: do step 5 inside blocks of `block_size` columns, updating only the block's columns column by
       column, and apply the block's errors to all later columns in one product at the end of the block (E [N, B]
       @ U[block, later]). Same result as step 5 up to float rounding, whatever the block size; a group that
       starts inside a block may run past it: its later columns need the block's pending updates too.
    7. Return the codes in the original column order (undo act_order's permutation).
    ValueError for bad bits / group size / block size / damp <= 0, or a hessian that is not [K, K].
    """
    # TODO: follow the steps. torch.linalg.cholesky, torch.cholesky_inverse and torch.argsort(stable=True) help.
    #  Check yourself against quantize_rtn: with H = identity no error moves, so the codes must be RTN's exactly.
    raise NotImplementedError("gptq_quantize: Cholesky of H^-1, then quantize column by column, passing errors on")


# --- AWQ -----------------------------------------------------------------------------------------------------------


def awq_scales(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel AWQ scales from activations x [..., K]: float32 [K].

    s = (mean over tokens of |x_k|)^alpha, at least 1e-4, then divided by sqrt(max(s) * min(s)) so that the scales
    sit around 1 (the largest and smallest are reciprocals). alpha = 0 gives all ones.
    """
    # TODO: x.abs() averaged over every token (all leading dimensions), to the power alpha, clamped, normalized.
    raise NotImplementedError("awq_scales: mean|x|^alpha per input channel, normalized by sqrt(max * min)")


def awq_search(
    weight: torch.Tensor, x: torch.Tensor, bits: int = 4, group_size: int = 128, grid: int = 20
) -> tuple[torch.Tensor, float, list[float]]:
    """Search alpha over 0, 1/grid, ..., (grid - 1)/grid for the weight [N, K] and its inputs x [..., K].

    For each alpha: s = awq_scales(x, alpha); the layer computes x @ W.T, the quantized layer (x / s) @ Q(W * s).T
    with Q(.) = quantize_rtn(., bits, group_size).dequantize(); its error is the mean over tokens and output
    channels of the squared difference of the two outputs. Returns (awq_scales(x, best alpha), best alpha, the
    `grid` errors in alpha order); the best alpha has the smallest error (the first one, on a tie). alpha = 0 is
    plain RTN, so the search can only do better.
    """
    # TODO: for speed, note that ||X D^T||^2 = sum over rows of D (X^T X) D^T with D = W - Q(W * s) / s: compute
    #  X^T X once, and each alpha costs N K^2 instead of n N K.
    raise NotImplementedError("awq_search: for each alpha, the output error of (x / s) @ Q(W * s).T against x @ W.T")


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

    Use the tokens x[::step] of x as [n, K], step = max(1, n // tokens). For a group of row n with m = max |w| over
    the group, try the ranges [-r m, r m] for r = 1 - i / grid, i = 0, 1, ... while i < max_shrink * grid. The error
    of a range: clamp the group's weights c = clamp(w, -r m, r m), quantize the row (quantize_rtn, bits, group_size),
    and take the mean over the tokens of the squared change of the group's share of the output,
    (sum over the group's channels k of x_k * (Q(c)_k - w_k))^2. Keep, per row and group, the range with the least
    error (the widest on a tie). Returns the clamped weight, float32 [N, K] (not yet quantized).
    """
    # TODO: view W as [N, K/G, G] and the tokens as [K/G, G, n]; one einsum gives every group's share of every
    #  output for every token. Loop over the ratios only.
    raise NotImplementedError("awq_clip: per row and group, the clamp ratio whose quantized output error is least")


def fold_awq_scales(llama, layer: int, linear: str, scales: torch.Tensor) -> None:
    """Multiply the input columns of `linear` ("qkv", "gate_up" or "down") of `layer` by scales [K], in place, and
    divide the same scales out of the operator that produces that input, so the float model computes exactly what
    it did (up to float rounding):
        qkv      reads RMSNorm(h) * attention_norm   divide attention_norm by s
        gate_up  reads RMSNorm(h) * mlp_norm         divide mlp_norm by s
        down     reads silu(gate) * up               divide up's rows (the second half of gate_up's rows) by s
    "out" reads the attention output, which has no per-channel operator to fold into here (grouped-query attention
    shares each value head between several query heads): ValueError. ValueError also for scales that are not
    positive or not [K].
    """
    # TODO: llama.layers[layer] is a fixtures.llama.LayerWeights: modify its tensors in place (mul_, div_).
    raise NotImplementedError("fold_awq_scales: W[:, k] *= s_k and the operator before it divided by s_k")


# --- the whole model -----------------------------------------------------------------------------------------------


def quantize_model(
    llama, calibration: torch.Tensor, method: str, bits: int = 4, group_size: int = 128
) -> dict[tuple[int, str], QuantizedTensor]:
    """Quantize the four linear layers of every decoder layer of `llama` in place, layer by layer.

    calibration: int64 token ids [B, T]. method: "rtn", "awq" or "gptq". Each weight is replaced by its
    dequantized codes (the fake-quantized model); returns {(layer, name): QuantizedTensor} for every layer and
    every name in LINEARS. Embeddings, norms (except what AWQ folds) and the LM head stay in float.

    Layer by layer: hidden = llama.embed(calibration); for each layer, decoder_layer(llama, layer, hidden) gives
    the inputs of its four linears (the layer still in float); quantize the layer; then run the *quantized* layer
    on hidden to get the next layer's input, so that every layer is calibrated on what the already-quantized
    layers before it produce (RTN needs no calibration).
      * gptq: gptq_quantize(W, hessian(inputs[name]), bits, group_size, act_order=True) for each of the four.
      * awq: awq_search for qkv, gate_up and down, then fold_awq_scales for each; run decoder_layer again for the
        inputs as they are now (x / s); awq_clip every one of the four on those inputs; then quantize_rtn.
      * rtn: quantize_rtn.
    Call this module's functions by their names (gptq_quantize, ...): the tests watch what they receive.
    ValueError (before changing anything) for an unknown method, bits not 4 or 8, a group size that does not
    divide some linear's input channels, or an empty calibration set.
    """
    # TODO: validate everything first; then the loop above, under torch.no_grad().
    raise NotImplementedError("quantize_model: layer by layer, each calibrated on the quantized layers' outputs")


def perplexity(llama, ids: torch.Tensor, batch_size: int = 8) -> float:
    """Perplexity of `llama` on ids [B, T]: exp of the mean negative log-likelihood (natural log) of every token
    after the first of its row, each predicted from the tokens before it. fixtures.quantization.forward(llama,
    rows) gives the logits; row t of the logits predicts token t + 1. Process `batch_size` rows at a time.
    ValueError for fewer than two tokens per row or no rows.
    """
    # TODO: sum the negative log-likelihoods over all rows (F.cross_entropy with reduction="sum"), then divide by
    #  the number of predicted tokens: one mean over all tokens, not a mean of per-row perplexities.
    raise NotImplementedError("perplexity: exp(mean over all predicted tokens of -log p(token | prefix))")


# --- formats -------------------------------------------------------------------------------------------------------


def export_awq(quantized: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit codes -> AutoAWQ's GEMM layout, the tensors exercise 03's kernels read: (qweight, scales, qzeros).

    The layout is transposed from ours: qweight int32 [K, N/8] packs q.T, qzeros int32 [K/G, N/8] packs zeros.T,
    scales float16 [K/G, N] is scales.T. Nibble i (bits 4i .. 4i+3) of a word holds column 8c + [0, 2, 4, 6, 1, 3, 5,
    7][i] of its eight columns; words use all 32 bits (nibble 7 reaches the sign bit). ValueError for bits != 4 or N
    not a multiple of 8.
    """
    # TODO: transpose, then pack eight columns per int32 as exercise 03 describes (build words in int64 and wrap
    #  them into the int32 range).
    raise NotImplementedError("export_awq: transpose, then pack column [0,2,4,6,1,3,5,7][i] into nibble i")


def export_gguf(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """weight [N, K] -> uint8 [N, (K / 32) * block bytes]: each row as GGUF blocks of 32 weights (llama.cpp's format).

    Every block starts with its scale d as float16 (2 bytes, little-endian), computed in float32:
      Q8_0 (34 bytes): d = max|x| / 127, then 32 int8 q = roundf(x * (1/d)), round half away from zero (C's roundf,
           not torch.round); 1/d is taken as 0 when d = 0.
      Q4_0 (18 bytes): m = the block's value of largest magnitude, with its sign (the first one, on a tie);
           d = m / -8; q = min(15, trunc(x * (1/d) + 8.5)) in 0 .. 15, so that x = (q - 8) * d; then 16 bytes, byte j
           holding q[j] in its low nibble and q[j + 16] in its high nibble.
    ValueError for another kind or K not a multiple of 32.
    """
    # TODO: view as [N, K/32, 32]; compute d and q per block; d.half().view(torch.uint8) gives its two bytes.
    raise NotImplementedError("export_gguf: per 32-weight block, an fp16 scale then the codes (Q8_0 or Q4_0)")


def quantize_fp8(weight: torch.Tensor, scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (torch.float8_e4m3fn [N, K], float32 scales [N]), w ~ fp8 * scale of its output channel.

    scales defaults to max|w| of each row / 448 (448 is e4m3fn's largest finite value; at least 1e-12 / 448 for a
    zero row); given scales must be positive [N]. The codes are w / scale rounded to the nearest e4m3fn value
    (ties to even), *saturating*: anything beyond +-448 becomes +-448. e4m3fn has no infinity, and a conversion
    that overflows gives NaN in some torch versions, so clamp first.
    """
    # TODO: divide each row by its scale, clamp to [-448, 448], convert. Building the bits yourself (sign, 4 exponent
    #  bits with bias 7, 3 mantissa bits, subnormals m * 2^-9) is a good exercise; torch's conversion is allowed.
    raise NotImplementedError("quantize_fp8: w / scale per row, clamped to +-448, rounded to e4m3fn")
