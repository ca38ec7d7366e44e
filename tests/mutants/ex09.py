# ruff: noqa: E501  (mutants are data: one replacement per line reads best)
"""Exercise 09 mutants: the reference allocation, measurement and FP8 product with one mistake each, as students make
them.

Every mutant runs only the tests that can see its mistake (-k): the course-model perplexity test quantizes the model
three times, which only the measurement's mutants need. Exercise 09 uses no hypothesis: its plugin stays unloaded.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mutation import Mutant  # noqa: E402

A = "bit_allocation.py"
F = "fp8.py"
ALLOCATION = ("-k", "allocation")
MIXED_LOOP = """            inputs = decoder_layer(llama, layer, hidden)[1]  # this layer still in float, on the quantized prefix
            for name in LINEARS:
                weight = getattr(w, name)
                choice = mix[(layer, name)]
                fake = quantize(weight.detach().float().clone(), hessian(inputs[name]), choice.bits, choice.group_size)
                weight.copy_(_check_quantized(fake, weight, "quantize_mixed"))
            hidden = decoder_layer(llama, layer, hidden)[0]  # what the quantized layer hands the next one"""
FRONTIER_KEEP = "        kept = order[sorted_error < best_before]"
GREEDY_BODY = '''    # Room left for the cheapest choice of every later layer: a partial mix that leaves too little is no mix.'''


def greedy(by_error_alone: bool) -> str:
    """The frontier replaced by upgrades from the cheapest mix: by error saved per bit, or by error saved alone."""
    gain = "saved" if by_error_alone else "saved / (c.storage_bits - mix[k].storage_bits)"
    return f'''    mix = {{k: min(measurements[k].choices, key=lambda c: c.storage_bits) for k in keys}}
    while True:
        spent = sum(c.storage_bits for c in mix.values())
        best = None
        for k in keys:
            for c in measurements[k].choices:
                saved = mix[k].error - c.error
                if c.storage_bits > mix[k].storage_bits and saved > 0 and spent - mix[k].storage_bits + c.storage_bits <= budget:
                    if best is None or {gain} > best[0]:
                        best = ({gain}, k, c)
        if best is None:
            return mix
        mix[best[1]] = best[2]
    # Room left for the cheapest choice of every later layer: a partial mix that leaves too little is no mix.'''


MUTANTS = [
    # --- what a choice costs --------------------------------------------------------------------------------------
    Mutant("storage counts the codes only", A,
           "    return N * K * bits + N * (K // group_size) * (SCALE_BITS + bits)",
           "    return N * K * bits",
           "scales and zero points forgotten", ("-k", "storage")),
    Mutant("zero points stored as fp16", A,
           "    return N * K * bits + N * (K // group_size) * (SCALE_BITS + bits)",
           "    return N * K * bits + N * (K // group_size) * (SCALE_BITS + 16)",
           "zero points counted as 16-bit", ("-k", "storage")),
    Mutant("one scale per row", A,
           "    return N * K * bits + N * (K // group_size) * (SCALE_BITS + bits)",
           "    return N * K * bits + N * (SCALE_BITS + bits)",
           "one scale per row instead of one per group", ("-k", "storage")),
    Mutant("the error of the weights, not of the output", A,
           "    return float(((D @ H) * D).sum() / ((W @ H) * W).sum().clamp_min(1e-300))",
           "    return float((D * D).sum() / (W * W).sum())",
           "the weights' error instead of the output's", ("-k", "output_error or measure")),
    Mutant("an absolute output error", A,
           "    return float(((D @ H) * D).sum() / ((W @ H) * W).sum().clamp_min(1e-300))",
           "    return float(((D @ H) * D).sum() / 2)",
           "an absolute error, not relative", ("-k", "output_error or measure")),
    # --- the allocation -------------------------------------------------------------------------------------------
    Mutant("greedy by error saved per bit", A, GREEDY_BODY, greedy(False),
           "greedy by error saved per bit", ALLOCATION),
    Mutant("greedy by error alone", A, GREEDY_BODY, greedy(True),
           "greedy by error alone", ALLOCATION),
    Mutant("the budget averaged over layers", A,
           "        add_cost = torch.tensor([c.storage_bits for c in choices], dtype=torch.int64)",
           "        add_cost = torch.tensor([round(c.storage_bits * total / (measurements[key].numel * len(keys))) for c in choices], dtype=torch.int64)",
           "budget averaged over layers instead of weights", ALLOCATION),
    Mutant("only the best partial mix kept per layer", A,
           FRONTIER_KEEP,
           "        kept = order[sorted_error.argmin()].reshape(1)",
           "not the optimum", ALLOCATION),
    Mutant("a target met exactly refused", A,
           "        fits = (all_cost + room <= budget).nonzero().flatten()",
           "        fits = (all_cost + room < budget).nonzero().flatten()",
           "not the optimum", ALLOCATION),
    Mutant("measure on the quantized prefix (writes the last option back)", A,
           "                table[(layer, name)] = Measurement(weight.numel(), tuple(choices))",
           "                table[(layer, name)] = Measurement(weight.numel(), tuple(choices))\n"
           "                getattr(w, name).copy_(fake)",
           "measuring must leave the model as it was", ("-k", "measure")),
    Mutant("quantize_mixed on the float model's activations", A,
           MIXED_LOOP,
           MIXED_LOOP.replace("            inputs = decoder_layer(llama, layer, hidden)[1]", "            hidden, inputs = decoder_layer(llama, layer, hidden)")
           .replace("            hidden = decoder_layer(llama, layer, hidden)[0]  # what the quantized layer hands the next one", ""),
           "calibrated on the float model's activations", ("-k", "quantize_mixed")),
    Mutant("quantize_mixed ignores the mix's group size", A,
           "                fake = quantize(weight.detach().float().clone(), hessian(inputs[name]), choice.bits, choice.group_size)",
           "                fake = quantize(weight.detach().float().clone(), hessian(inputs[name]), choice.bits, 128)",
           "with its choice", ("-k", "quantize_mixed")),
    Mutant("the Hessian without the factor 2", A,
           "    return 2 * (flat.T @ flat) / flat.shape[0]",
           "    return (flat.T @ flat) / flat.shape[0]",
           "is not 2 X^T X / n", ("-k", "measure or quantize_mixed")),
    # --- FP8 ------------------------------------------------------------------------------------------------------
    Mutant("scale = max|row|, not max|row| / 448", F,
           "        scale = amax.float().reshape(rows, 1).clamp_min(SCALE_FLOOR) / E4M3_MAX",
           "        scale = amax.float().reshape(rows, 1).clamp_min(SCALE_FLOOR)",
           "not max|row| / 448", ("-k", "scaled_by")),
    Mutant("per-row scales over the columns", F,
           "        amax = torch.linalg.vector_norm(t, ord=float(\"inf\"), dim=1 if per_row else None, keepdim=per_row)\n"
           "        scale = amax.float().reshape(rows, 1).clamp_min(SCALE_FLOOR) / E4M3_MAX",
           "        amax = t.abs().amax(dim=0, keepdim=True) if per_row else t.abs().amax().reshape(1, 1)\n"
           "        scale = amax.float().clamp_min(SCALE_FLOOR) / E4M3_MAX",
           "one scale per column", ("-k", "scaled_by or fp8_linear")),
    Mutant("activations quantized per tensor whatever per_token says", F,
           "    x_codes, x_scale = quantize_e4m3(x, per_row=per_token)",
           "    x_codes, x_scale = quantize_e4m3(x, per_row=False)",
           "activation scale per tensor", ("-k", "scaled_product")),
    Mutant("the weight scale left out", F,
           "    return ((x_codes.float() @ weight.float().t()) * x_scale * w_scale.t()).to(x.dtype)",
           "    return ((x_codes.float() @ weight.float().t()) * x_scale).to(x.dtype)",
           "weight scale not applied", ("-k", "scaled_product")),
    Mutant("the activations left in float", F,
           "    return ((x_codes.float() @ weight.float().t()) * x_scale * w_scale.t()).to(x.dtype)",
           "    return (x.float() @ (weight.float() * w_scale).t()).to(x.dtype)",
           "activations not quantized", ("-k", "scaled_product")),
]
