# ruff: noqa: E501  (mutants are data: one replacement per line reads best)
"""Exercise 08 mutants: the reference quantizers and exporters with one mistake each, as students make them.

Every mutant runs only the tests that can see its mistake (-k): a run of the whole file quantizes the course model
three times, which no mutant needs. Exercise 08 uses no hypothesis: its plugin stays unloaded.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mutation import Mutant  # noqa: E402

F = "quantize.py"
GPTQ_ERROR = "            error = (w - (q - zero) * scale) / U[b0 + i, b0 + i]"
GPTQ_FACTOR = "    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)"
AWQ_DIFFERENCE = "        difference = W - _fake_quantize(W * scales, bits, group_size) / scales"
CALIBRATION_LOOP = """            inputs = decoder_layer(llama, layer, hidden)[1] if method != "rtn" else {}
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
                hidden = decoder_layer(llama, layer, hidden)[0]"""
RTN_GROUPS = """    groups = weight.detach().float().reshape(N, K // group_size, group_size)
    scale, zero = _group_params(groups, bits)
    codes = _codes(groups, scale.float()[..., None], zero[..., None], bits)
    return QuantizedTensor(codes.reshape(N, K).to(torch.uint8), scale, zero.to(torch.uint8), bits, group_size)"""
RTN_GROUPS_OF_ROWS = """    groups = weight.detach().float().reshape(N // group_size, group_size, K).transpose(1, 2)
    scale, zero = _group_params(groups, bits)
    codes = _codes(groups, scale.float()[..., None], zero[..., None], bits)
    return QuantizedTensor(codes.transpose(1, 2).reshape(N, K).to(torch.uint8), scale, zero.to(torch.uint8), bits, group_size)"""


def only(*names: str) -> tuple[str, ...]:
    """Run the named tests only."""
    return ("-k", " or ".join(names))


MUTANTS = [
    # --- round to nearest ------------------------------------------------------------------------------------------
    Mutant("RTN: zero point not clamped to 0 .. 2^bits - 1", F,
           "    zero = (-torch.round(low / scale.float())).clamp(0, top)  # a group of one sign puts z outside 0 .. top",
           "    zero = -torch.round(low / scale.float())", "zero point not clamped", only("rtn_clamps")),
    Mutant("RTN: codes not clamped after adding the zero point", F,
           "    return (torch.round(w / scale) + zero).clamp(0, 2**bits - 1)", "    return torch.round(w / scale) + zero",
           "codes not clamped", only("rtn_clamps")),
    Mutant("RTN: groups of G output channels instead of input channels", F, RTN_GROUPS, RTN_GROUPS_OF_ROWS,
           "wrong axis", only("rtn_groups")),
    Mutant("RTN: a group size that does not divide K accepted", F,
           "    if not isinstance(group_size, int) or group_size < 1 or weight.shape[1] % group_size != 0:",
           "    if not isinstance(group_size, int) or group_size < 1:", "does not divide", only("rtn_rejects")),
    # --- GPTQ ------------------------------------------------------------------------------------------------------
    Mutant("hessian: X^T X / n without the factor 2", F, "    return 2 * (flat.T @ flat) / flat.shape[0]",
           "    return (flat.T @ flat) / flat.shape[0]", "factor 2", only("hessian_is_twice")),
    Mutant("GPTQ: the rounding error is not propagated", F, GPTQ_ERROR, "            error = torch.zeros_like(w)",
           "no error propagation", only("gptq_equals")),
    Mutant("GPTQ: the error is not divided by U_ii", F, GPTQ_ERROR, "            error = w - (q - zero) * scale",
           "not divided by U_ii", only("gptq_equals")),
    Mutant("GPTQ: no damping", F, "    H.diagonal().add_(damp * H.diagonal().mean())", "    pass", "no damping",
           only("singular")),
    Mutant("GPTQ: the Cholesky factor of H instead of H^-1", F, GPTQ_FACTOR, "    U = torch.linalg.cholesky(H, upper=True)",
           "Cholesky factor of H instead", only("gptq_equals")),
    Mutant("GPTQ: the lower Cholesky factor of H^-1", F, GPTQ_FACTOR,
           "    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)))", "lower Cholesky factor",
           only("gptq_equals")),
    Mutant("GPTQ: H^-1 itself instead of its Cholesky factor", F, GPTQ_FACTOR,
           "    U = torch.cholesky_inverse(torch.linalg.cholesky(H))", "H^-1 itself", only("gptq_equals")),
    Mutant("GPTQ: act-order's permutation not undone", F,
           "        codes = codes[:, torch.argsort(order)]  # back to the original column order", "        pass",
           "permutation not undone", only("gptq_equals")),
    Mutant("GPTQ: the lazy batch update left out (later blocks never see a block's errors)", F,
           "        W[:, b1:] -= errors @ U[b0:b1, b1:]  # the lazy batch update: the whole block's errors at once",
           "        pass", "lazy batch", only("gptq_equals")),
    Mutant("GPTQ: a group that runs past its block misses the block's pending updates", F,
           "                    rest = W[:, b1 : b0 + i + G] - errors[:, :i] @ U[b0 : b0 + i, b1 : b0 + i + G]",
           "                    rest = W[:, b1 : b0 + i + G]", "lazy batch", only("gptq_equals")),
    Mutant("GPTQ: a group's range from the original weights, not the updated ones", F,
           "                current = block[:, i : i + G]", "                current = weight.detach().float()[:, column : column + G]",
           "original weights", only("gptq_equals")),
    # --- AWQ -------------------------------------------------------------------------------------------------------
    Mutant("AWQ scales: max |x| instead of mean |x|", F,
           '    return _scales_from_magnitude(_tokens("awq_scales", x).abs().mean(0), alpha)',
           '    return _scales_from_magnitude(_tokens("awq_scales", x).abs().amax(0), alpha)', "max |x|",
           only("awq_scales_are")),
    Mutant("AWQ scales: not normalized", F, "    return scales / (scales.max() * scales.min()).sqrt()",
           "    return scales", "not normalized", only("awq_scales_are")),
    Mutant("AWQ search: Q(W * s) compared without dividing s back out", F, AWQ_DIFFERENCE,
           "        difference = W - _fake_quantize(W * scales, bits, group_size)", "not divided by s",
           only("awq_search_measures")),
    Mutant("AWQ search: the error measured on the weights, not on the outputs", F,
           "        errors.append(float(((difference @ gram) * difference).sum()) / (flat.shape[0] * W.shape[0]))",
           "        errors.append(float((difference**2).mean()))", "on the weights, not on the outputs",
           only("awq_search_measures")),
    Mutant("AWQ fold: scales applied to qkv's weights but not folded into attention_norm", F,
           "        w.attention_norm.div_(scales)", "        pass", "not folded into the previous operator",
           only("folding_awq")),
    Mutant("AWQ fold: down's scales divided out of the gate rows instead of the up rows", F,
           "        w.gate_up[weight.shape[1] :].div_(scales[:, None])", "        w.gate_up[: weight.shape[1]].div_(scales[:, None])",
           "up rows", only("folding_awq")),
    Mutant("AWQ clip: the search never clips (the widest range always)", F,
           "        better = error < best_error  # the first of equal errors: the widest range", "        better = error < 0",
           "clamp ratio", only("awq_clip")),
    # --- the whole model -------------------------------------------------------------------------------------------
    Mutant("quantize_model: every layer calibrated on the float model's activations", F, CALIBRATION_LOOP,
           CALIBRATION_LOOP.replace("inputs = decoder_layer(llama, layer, hidden)[1] if", "float_next, inputs = decoder_layer(llama, layer, hidden) if").replace("else {}", "else (None, {})").replace("hidden = decoder_layer(llama, layer, hidden)[0]", "hidden = float_next"),
           "float model's activations", only("calibrates_each_layer")),
    Mutant("quantize_model: an empty calibration set accepted", F,
           '    if calibration.numel() == 0:\n        raise ValueError("quantize_model: the calibration set is empty")\n',
           "", "empty calibration", only("quantize_model_rejects")),
    Mutant("perplexity: logits not shifted (token t scored with row t)", F,
           "        logits = forward(llama, rows)[:, :-1]  # row t predicts token t + 1",
           "        logits = forward(llama, rows)[:, 1:]", "not shifted", only("perplexity_is_exp")),
    # --- formats ---------------------------------------------------------------------------------------------------
    Mutant("AWQ export: nibbles packed in natural order", F,
           "AWQ_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)", "AWQ_NIBBLE = (0, 1, 2, 3, 4, 5, 6, 7)", "natural order",
           only("awq_export_packs")),
    Mutant("AWQ export: codes packed without transposing", F,
           "    return _pack(quantized.codes.T), quantized.scales.T.contiguous(), _pack(quantized.zeros.T)",
           "    return _pack(quantized.codes), quantized.scales.T.contiguous(), _pack(quantized.zeros.T)",
           "not transposed", only("awq_export_packs")),
    Mutant("GGUF Q8_0: torch.round (half to even) instead of roundf", F,
           "        q = scaled.sign() * (whole + torch.floor(2 * (magnitude - whole)))  # half away from zero, as C's roundf",
           "        q = torch.round(scaled)", "half to even", only("q8_0_block_by_hand")),
    Mutant("GGUF Q4_0: nibbles of neighbouring weights in one byte", F,
           "        payload = q[..., :16] | (q[..., 16:] << 4)  # byte j: weight j in the low nibble, weight j + 16 high",
           "        payload = q[..., 0::2] | (q[..., 1::2] << 4)", "interleaved", only("q4_0_block_by_hand")),
    Mutant("GGUF Q4_0: the scale from max |x| without its sign", F,
           "        d = blocks.gather(-1, index) / -8  # signed: the largest magnitude maps to code 0, i.e. -8",
           "        d = blocks.abs().gather(-1, index) / -8", "without its sign", only("q4_0_block_by_hand")),
    Mutant("FP8: no saturation (values beyond 448 overflow)", F,
           "    x = (w / scales.float()[:, None]).clamp(-FP8_MAX, FP8_MAX)  # saturate: e4m3fn has no infinity",
           "    x = w / scales.float()[:, None]", "saturat", only("saturates")),
    Mutant("FP8: one scale for the whole tensor", F, "        scales = w.abs().amax(1).clamp_min(1e-12) / FP8_MAX",
           "        scales = (w.abs().amax().clamp_min(1e-12) / FP8_MAX).expand(w.shape[0])", "per-tensor",
           only("fp8_codes_equal")),
    Mutant("FP8: the mantissa truncated instead of rounded to nearest even", F,
           "    code = torch.round(magnitude / step) + torch.where(magnitude >= 2.0**-6, (exponent + 7) * 8 - 8, 0.0)",
           "    code = torch.floor(magnitude / step) + torch.where(magnitude >= 2.0**-6, (exponent + 7) * 8 - 8, 0.0)",
           "ties to even", only("fp8_rounds")),
]
