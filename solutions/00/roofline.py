"""Exercise 00 reference solution: FLOPs, bytes and the roofline of a Llama-style decoder step.

Every count is an exact Python int: a 70B model's prefill at a long context needs more than 2**63 FLOPs, and a
float has only 53 bits of mantissa. Times and rates are floats. The crossover batch is solved exactly (rationals),
not searched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}
WEIGHT_DTYPES = ("fp32", "fp16", "bf16", "fp8", "int4")
KV_DTYPES = ("fp32", "fp16", "bf16", "fp8")
FP8_SCALE_BYTES = 4  # one fp32 scale per output channel
INT4_GROUP_BYTES = Fraction(5, 2)  # per group and output channel: an fp16 scale and a packed 4-bit zero point


@dataclass(frozen=True)
class StepCost:
    """What one forward step over the new tokens of a batch computes and moves through device memory."""

    flops: int
    weight_bytes: int
    kv_read_bytes: int
    kv_write_bytes: int
    activation_bytes: int

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.kv_read_bytes + self.kv_write_bytes + self.activation_bytes

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes


@dataclass(frozen=True)
class _Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @property
    def projection_params_per_layer(self) -> int:
        """q, k, v, o, gate, up and down: the matrices every new token multiplies in every layer."""
        d, f, D = self.hidden, self.intermediate, self.head_dim
        return d * (self.heads + 2 * self.kv_heads) * D + self.heads * D * d + 3 * d * f

    @property
    def projection_matrices(self) -> tuple[tuple[int, int], ...]:
        """(in features, out features) of each projection of one layer, q/k/v and gate/up fused."""
        d, f, D = self.hidden, self.intermediate, self.head_dim
        return ((d, (self.heads + 2 * self.kv_heads) * D), (self.heads * D, d), (d, 2 * f), (f, d))

    @property
    def other_params(self) -> int:
        """Embedding table, LM head (unless tied to the embedding), two RMSNorms per layer and the final one."""
        tables = 1 if self.tied else 2
        return tables * self.vocab * self.hidden + (2 * self.layers + 1) * self.hidden


def _shape(config) -> _Shape:
    fields = {}
    for name in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads", "vocab_size"):  # fmt: skip
        fields[name] = _positive_int(getattr(config, name, None), f"config.{name}")
    heads, kv_heads = fields["num_attention_heads"], fields["num_key_value_heads"]
    if heads % kv_heads:
        raise ValueError(
            f"config.num_attention_heads ({heads}) must be a multiple of config.num_key_value_heads ({kv_heads})"
        )
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None:
        head_dim = fields["hidden_size"] // heads
    head_dim = _positive_int(head_dim, "config.head_dim")
    tied = getattr(config, "tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise ValueError(f"config.tie_word_embeddings must be a bool, got {tied!r}")
    return _Shape(fields["num_hidden_layers"], fields["hidden_size"], fields["intermediate_size"], heads, kv_heads,
                  head_dim, fields["vocab_size"], tied)  # fmt: skip


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def _rate(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def _dtype(value, allowed: tuple[str, ...], name: str) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def parameter_count(config) -> int:
    """Every parameter of the model: projections, norms, embedding table and (unless tied) the LM head."""
    shape = _shape(config)
    return shape.layers * shape.projection_params_per_layer + shape.other_params


def weight_bytes(config, weight_dtype: str = "bf16", group_size: int = 128) -> int:
    """Memory of all weights: the projections in `weight_dtype` (with their scales), everything else in 16-bit."""
    shape = _shape(config)
    _dtype(weight_dtype, WEIGHT_DTYPES, "weight_dtype")
    group_size = _positive_int(group_size, "group_size")
    return _projection_bytes(shape, weight_dtype, group_size) + shape.other_params * _high_bytes(weight_dtype)


def _high_bytes(weight_dtype: str) -> int:
    """Bytes of what stays unquantized (embedding, LM head, norms) and of activations: fp32 only with fp32 weights."""
    return 4 if weight_dtype == "fp32" else 2


def _projection_bytes(shape: _Shape, weight_dtype: str, group_size: int) -> int:
    params = shape.layers * shape.projection_params_per_layer
    if weight_dtype in ELEMENT_BYTES:
        scales = 0
        if weight_dtype == "fp8":
            scales = shape.layers * sum(n for _, n in shape.projection_matrices) * FP8_SCALE_BYTES
        return params * ELEMENT_BYTES[weight_dtype] + scales
    # int4: two weights per byte, plus per group of `group_size` input channels of each output channel a scale and
    # a zero point (exercise 03's AWQ layout).
    groups = 0
    for k, n in shape.projection_matrices:
        if k % group_size:
            raise ValueError(f"group_size {group_size} does not divide a projection's {k} input features")
        groups += k // group_size * n
    total = Fraction(params, 2) + shape.layers * groups * INT4_GROUP_BYTES
    return math.ceil(total)


def kv_bytes_per_token(config, kv_dtype: str = "bf16") -> int:
    """Bytes one token adds to the KV cache: a key and a value per kv head per layer."""
    shape = _shape(config)
    element = ELEMENT_BYTES[_dtype(kv_dtype, KV_DTYPES, "kv_dtype")]
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * element


def kv_cache_bytes(config, batch_size: int, seq_len: int, kv_dtype: str = "bf16") -> int:
    """Bytes of keys and values for `batch_size` sequences of `seq_len` tokens (exercise 01's formula)."""
    per_token = kv_bytes_per_token(config, kv_dtype)
    return per_token * _positive_int(batch_size, "batch_size") * _positive_int(seq_len, "seq_len")


def forward_cost(config, batch_size: int, new_tokens: int, cached_tokens: int = 0, *, weight_dtype: str = "bf16",
                 kv_dtype: str = "bf16", group_size: int = 128) -> StepCost:  # fmt: skip
    """FLOPs and bytes of one forward step: `new_tokens` per sequence after `cached_tokens` already cached."""
    shape = _shape(config)
    batch = _positive_int(batch_size, "batch_size")
    new = _positive_int(new_tokens, "new_tokens")
    cached = _count(cached_tokens, "cached_tokens")
    weights = weight_bytes(config, weight_dtype, group_size)
    per_token_kv = kv_bytes_per_token(config, kv_dtype)
    L, d, f, V = shape.layers, shape.hidden, shape.intermediate, shape.vocab
    H, Hkv, D = shape.heads, shape.kv_heads, shape.head_dim
    tokens = batch * new

    # Two FLOPs (a multiply and an add) per weight per token; the LM head runs on each sequence's last token only.
    matmul_flops = 2 * tokens * L * shape.projection_params_per_layer + 2 * batch * V * d
    # New token i (position cached + i) attends to cached + i + 1 positions: q.k and p.v, 2 D FLOPs each, per query
    # head (not per kv head: every query head does its own dot products).
    attended = new * cached + new * (new + 1) // 2
    attention_flops = 4 * L * H * D * batch * attended

    # The embedding table is looked up (one row per token, counted as activations), not streamed: tied or not,
    # a step reads the projections, the LM head and the norms.
    streamed_weights = weights - (0 if shape.tied else V * d * _high_bytes(weight_dtype))
    per_layer_elements = (
        (d + (H + 2 * Hkv) * D)  # q/k/v projection: reads the hidden state, writes q, k, v
        + ((H + 2 * Hkv) * D + H * D)  # attention: reads the new q, k, v, writes its output
        + (H * D + d)  # output projection
        + (d + 2 * f)  # gate/up projection
        + (f + d)  # down projection (SwiGLU fused into its input read)
    )
    activation_elements = tokens * (d + L * per_layer_elements) + batch * (d + V)
    return StepCost(
        flops=matmul_flops + attention_flops,
        weight_bytes=streamed_weights,
        kv_read_bytes=batch * cached * per_token_kv,
        kv_write_bytes=tokens * per_token_kv,
        activation_bytes=activation_elements * _high_bytes(weight_dtype),
    )


def prefill_cost(config, batch_size: int, prompt_len: int, *, weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                 group_size: int = 128) -> StepCost:  # fmt: skip
    """A prefill: `prompt_len` new tokens per sequence, nothing cached."""
    return forward_cost(config, batch_size, prompt_len, 0, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
                        group_size=group_size)  # fmt: skip


def decode_cost(config, batch_size: int, cached_tokens: int, *, weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                group_size: int = 128) -> StepCost:  # fmt: skip
    """A decode step: one new token per sequence after `cached_tokens`."""
    return forward_cost(config, batch_size, 1, cached_tokens, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
                        group_size=group_size)  # fmt: skip


def roofline_time(cost: StepCost, bandwidth: float, matrix_rate: float) -> float:
    """Seconds: the larger of moving the bytes at `bandwidth` and computing the FLOPs at `matrix_rate`."""
    bandwidth = _rate(bandwidth, "bandwidth")
    matrix_rate = _rate(matrix_rate, "matrix_rate")
    return max(cost.bytes / bandwidth, cost.flops / matrix_rate)


def decode_crossover_batch(config, cached_tokens: int, bandwidth: float, matrix_rate: float, *,
                           weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                           group_size: int = 128) -> int | None:  # fmt: skip
    """Smallest batch whose decode step is compute-bound (FLOPs / rate >= bytes / bandwidth); None if none is."""
    bandwidth = Fraction(_rate(bandwidth, "bandwidth"))
    matrix_rate = Fraction(_rate(matrix_rate, "matrix_rate"))
    formats = dict(weight_dtype=weight_dtype, kv_dtype=kv_dtype, group_size=group_size)
    one, two = decode_cost(config, 1, cached_tokens, **formats), decode_cost(config, 2, cached_tokens, **formats)
    # FLOPs are B * f1; bytes are W + B * b1 (weights once per step, the rest per sequence).
    f1 = one.flops
    b1 = two.bytes - one.bytes
    fixed = one.bytes - b1
    # compute-bound: B f1 / rate >= (W + B b1) / bandwidth  <=>  B (f1 bandwidth - b1 rate) >= W rate
    margin = f1 * bandwidth - b1 * matrix_rate
    if margin <= 0:
        return None
    return max(1, math.ceil(fixed * matrix_rate / margin))


def max_batch_size(config, memory_bytes: int, context_len: int, *, weight_dtype: str = "bf16",
                   kv_dtype: str = "bf16", group_size: int = 128) -> int:  # fmt: skip
    """Most sequences of `context_len` tokens whose KV cache fits in `memory_bytes` beside the weights."""
    memory_bytes = _count(memory_bytes, "memory_bytes")
    context_len = _positive_int(context_len, "context_len")
    weights = weight_bytes(config, weight_dtype, group_size)
    per_sequence = kv_cache_bytes(config, 1, context_len, kv_dtype)
    return max(0, (memory_bytes - weights) // per_sequence)


def decode_tokens_per_second(config, batch_size: int, cached_tokens: int, bandwidth: float, matrix_rate: float, *,
                             weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                             group_size: int = 128) -> float:  # fmt: skip
    """Tokens per second of decode steps at the roofline: `batch_size` tokens per step."""
    cost = decode_cost(config, batch_size, cached_tokens, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
                       group_size=group_size)  # fmt: skip
    return batch_size / roofline_time(cost, bandwidth, matrix_rate)


def cost_per_million_tokens(tokens_per_second: float, gpu_hour_price: float) -> float:
    """Dollars per million tokens for a GPU rented at `gpu_hour_price` dollars an hour."""
    tokens_per_second = _rate(tokens_per_second, "tokens_per_second")
    if isinstance(gpu_hour_price, bool) or not isinstance(gpu_hour_price, (int, float)) or not (
        math.isfinite(gpu_hour_price) and gpu_hour_price >= 0
    ):
        raise ValueError(f"gpu_hour_price must be a non-negative finite number, got {gpu_hour_price!r}")
    return gpu_hour_price / 3600 / tokens_per_second * 1e6
