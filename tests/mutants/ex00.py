# ruff: noqa: E501  (mutants are data: one replacement per line reads best)
"""Exercise 00 mutants: the reference roofline formulas with one mistake each, as students make them."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mutation import Mutant  # noqa: E402

F = "roofline.py"
KV_PER_TOKEN = "    return 2 * shape.layers * shape.kv_heads * shape.head_dim * element"
MATMUL_FLOPS = "    matmul_flops = 2 * tokens * L * shape.projection_params_per_layer + 2 * batch * V * d"
ATTENTION_FLOPS = "    attention_flops = 4 * L * H * D * batch * attended"
ATTENDED = "    attended = new * cached + new * (new + 1) // 2"
STREAMED = "    streamed_weights = weights - (0 if shape.tied else V * d * _high_bytes(weight_dtype))"
CROSSOVER = "    return max(1, math.ceil(fixed * matrix_rate / margin))"

MUTANTS = [
    # The named mistakes.
    Mutant("KV cache sized by the query heads", F, KV_PER_TOKEN,
           "    return 2 * shape.layers * shape.heads * shape.head_dim * element", "query heads"),
    Mutant("KV cache counts K only (forgot V)", F, KV_PER_TOKEN,
           "    return shape.layers * shape.kv_heads * shape.head_dim * element", "only K or only V"),
    Mutant("FLOPs counted as one per multiply-add", F,
           "        flops=matmul_flops + attention_flops,", "        flops=(matmul_flops + attention_flops) // 2,",
           "one per multiply-add"),
    Mutant("weights counted per token at decode", F,
           "        weight_bytes=streamed_weights,", "        weight_bytes=streamed_weights * tokens,", "counted per token"),
    Mutant("int4 bytes without the group scales and zeros", F,
           "    total = Fraction(params, 2) + shape.layers * groups * INT4_GROUP_BYTES",
           "    total = Fraction(params, 2)", "without the group scales"),
    # More mistakes of the same kind.
    Mutant("attention FLOPs per kv head", F, ATTENTION_FLOPS,
           "    attention_flops = 4 * L * Hkv * D * batch * attended", "per kv head"),
    Mutant("prefill attention counted over the full T x T square", F, ATTENDED,
           "    attended = new * cached + new * new", "it is causal"),
    Mutant("causal sum with float division", F, ATTENDED,
           "    attended = new * cached + new * (new + 1) / 2", "exact int"),
    Mutant("LM head on every new token", F, MATMUL_FLOPS,
           "    matmul_flops = 2 * tokens * L * shape.projection_params_per_layer + 2 * tokens * V * d",
           "last token only"),
    Mutant("embedding table counted as streamed", F, STREAMED, "    streamed_weights = weights",
           "looks up one row"),
    Mutant("tied LM head counted twice", F, "        tables = 1 if self.tied else 2", "        tables = 2",
           "counted twice"),
    Mutant("fp8 without its scales", F,
           "            scales = shape.layers * sum(n for _, n in shape.projection_matrices) * FP8_SCALE_BYTES",
           "            scales = 0", "fp8 scales were left out"),
    Mutant("roofline adds memory and compute time", F,
           "    return max(cost.bytes / bandwidth, cost.flops / matrix_rate)",
           "    return cost.bytes / bandwidth + cost.flops / matrix_rate", "were added"),
    Mutant("crossover rounded down", F, CROSSOVER,
           "    return max(1, math.floor(fixed * matrix_rate / margin))", "smallest"),
    Mutant("crossover ignores the per-sequence bytes", F,
           "    margin = f1 * bandwidth - b1 * matrix_rate", "    margin = f1 * bandwidth", "None"),
    Mutant("max batch negative when the weights do not fit", F,
           "    return max(0, (memory_bytes - weights) // per_sequence)",
           "    return (memory_bytes - weights) // per_sequence", "do not fit"),
    Mutant("cost per million with the hourly price per second", F,
           "    return gpu_hour_price / 3600 / tokens_per_second * 1e6",
           "    return gpu_hour_price / tokens_per_second * 1e6", "3600"),
    Mutant("dtype names not validated", F, "    if value not in allowed:",
           "    if value not in allowed and value in ('int4',):", "unknown"),
]
