"""Exercise 00: the memory wall and the compute wall.

A GPU has two speed limits: how many bytes per second its memory delivers (an H200: about 4.3 TB/s) and how many
FLOPs per second its matrix units do (about 800 TFLOP/s in bf16). A step that does F FLOPs and moves M bytes takes at
least max(M / bandwidth, F / rate): that is the roofline. Its arithmetic intensity F / M says which limit binds: below
rate / bandwidth (about 200 FLOPs per byte) the step is memory-bound, above it compute-bound.

A decode step multiplies each weight once per sequence in the batch, so at batch 1 it does 2 FLOPs per 2-byte weight:
1 FLOP per byte, hopelessly memory-bound. Batching shares one read of the weights among many sequences, until the
step turns compute-bound; the KV cache, which every sequence reads for itself, pushes that point away. A prefill
multiplies each weight by every prompt token and is compute-bound. You count it all here, exactly.

Conventions (every count is an exact int: Python ints never overflow; a float keeps only 53 bits):
  * `config`: a transformers LlamaConfig, or any object with its attributes num_hidden_layers (L), hidden_size (d),
    intermediate_size (f), num_attention_heads (H), num_key_value_heads (Hkv), vocab_size (V), head_dim (D; if
    missing or None, hidden_size // num_attention_heads) and tie_word_embeddings (missing means False). Sizes must
    be positive ints and H a multiple of Hkv, else ValueError naming the attribute (or saying "multiple").
  * Each layer has the projections q (d -> H D), k and v (d -> Hkv D each), o (H D -> d), gate and up (d -> f each)
    and down (f -> d), and two RMSNorms (d weights each); then a final norm (d), the embedding table (V x d) and the
    LM head (V x d, the same tensor as the embedding when tied).
  * Dtypes are names: weight_dtype is one of "fp32", "fp16", "bf16", "fp8", "int4"; kv_dtype one of "fp32", "fp16",
    "bf16", "fp8". Anything else is a ValueError naming the argument (weight_dtype, kv_dtype).
  * FLOPs: 2 per multiply-add, matrix products only (norms, RoPE, softmax, SwiGLU are left out).

Run `pytest exercises/00` to check your work.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepCost:
    """What one forward step over the new tokens of a batch computes and moves through device memory.

    flops: matrix FLOPs of the step. weight_bytes: weight bytes the step reads. kv_read_bytes, kv_write_bytes: KV
    cache traffic. activation_bytes: activation traffic. All exact ints.
    """

    flops: int
    weight_bytes: int
    kv_read_bytes: int
    kv_write_bytes: int
    activation_bytes: int

    @property
    def bytes(self) -> int:
        """All bytes moved: weights + KV reads + KV writes + activations."""
        raise NotImplementedError("StepCost.bytes: add up the four kinds of traffic")

    @property
    def intensity(self) -> float:
        """Arithmetic intensity: FLOPs per byte moved."""
        raise NotImplementedError("StepCost.intensity: flops / bytes")


def parameter_count(config) -> int:
    """Every parameter of the model: L x (projections + 2 norms) + final norm + embedding + LM head.

    A tied LM head *is* the embedding table: count it once.
    """
    # TODO: validate the config first (see the module docstring), then count. k and v have Hkv D outputs, not H D.
    raise NotImplementedError("parameter_count: per layer d(H + 2 Hkv)D + H D d + 3 d f + 2 d, then the tables")


def weight_bytes(config, weight_dtype: str = "bf16", group_size: int = 128) -> int:
    """Memory the weights occupy.

    The seven projections of every layer are stored in `weight_dtype`:
      * "fp32": 4 bytes per weight; "fp16", "bf16": 2.
      * "fp8": 1 byte per weight plus one fp32 scale (4 bytes) per output channel of each projection.
      * "int4": half a byte per weight plus, for each output channel and each group of `group_size` consecutive
        input channels, an fp16 scale and a 4-bit zero point (2.5 bytes): exercise 03's AWQ layout. group_size must
        divide every projection's input features (d, H D and f), else ValueError naming group_size.
    The embedding, the LM head and the norms stay 16-bit (2 bytes each), or 4 bytes when weight_dtype is "fp32".
    group_size must be a positive int (it is read only for "int4").
    """
    raise NotImplementedError("weight_bytes: projections in the weight format (with their scales), the rest 16-bit")


def kv_bytes_per_token(config, kv_dtype: str = "bf16") -> int:
    """Bytes one token adds to the KV cache: a key and a value of D elements per kv head per layer, in kv_dtype."""
    raise NotImplementedError("kv_bytes_per_token: 2 (K and V) x layers x kv heads x head dim x bytes per element")


def kv_cache_bytes(config, batch_size: int, seq_len: int, kv_dtype: str = "bf16") -> int:
    """Bytes of keys and values for `batch_size` sequences of `seq_len` tokens (exercise 01's formula).

    batch_size and seq_len must be positive ints, else ValueError naming them.
    """
    raise NotImplementedError("kv_cache_bytes: kv_bytes_per_token x batch x tokens")


def forward_cost(config, batch_size: int, new_tokens: int, cached_tokens: int = 0, *, weight_dtype: str = "bf16",
                 kv_dtype: str = "bf16", group_size: int = 128) -> StepCost:  # fmt: skip
    """FLOPs and bytes of one forward step of `batch_size` sequences, each with `new_tokens` new tokens after
    `cached_tokens` already in the KV cache. batch_size and new_tokens must be positive ints and cached_tokens a
    non-negative int, else ValueError naming the argument.

    FLOPs:
      * every new token multiplies every projection weight: 2 FLOPs per weight per token;
      * the LM head (V x d) runs on the last new token of each sequence only (sampling needs only its logits);
      * attention is causal: new token i (0-based) attends to cached_tokens + i + 1 positions, itself included,
        and costs 2 D FLOPs for q.k plus 2 D for p.v per position, per layer and per *query* head;
      * the embedding is a lookup, not a product: no FLOPs.
    Bytes:
      * weight_bytes: every weight is read once per step (not once per token), except the embedding table, which
        is looked up row by row (those rows count as activations). A tied table is read as the LM head.
      * kv_read_bytes: the cached tokens' keys and values; kv_write_bytes: the new tokens' (kv_dtype).
      * activation_bytes: each kernel reads its input and writes its output once, per new token:
            embedding lookup            reads d
            per layer, q/k/v projection  reads d, writes (H + 2 Hkv) D
                       attention         reads (H + 2 Hkv) D (the new q, k, v), writes H D
                       o projection      reads H D, writes d
                       gate/up           reads d, writes 2 f
                       down              reads f, writes d
        and per sequence the LM head reads d and writes V logits. Activations are 16-bit (2 bytes per element),
        or 4 bytes when weight_dtype is "fp32".
    Quantized weights change weight_bytes only: the FLOPs are the same multiply-adds.
    """
    # TODO: validate, then build StepCost(flops=..., weight_bytes=..., kv_read_bytes=..., kv_write_bytes=...,
    #  activation_bytes=...). Sum 1 + 2 + ... + n with n (n + 1) // 2 (ints), never a float.
    raise NotImplementedError("forward_cost: FLOPs of the products and attention; weights once, KV, activations")


def prefill_cost(config, batch_size: int, prompt_len: int, *, weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                 group_size: int = 128) -> StepCost:  # fmt: skip
    """A prefill: `prompt_len` new tokens per sequence, nothing cached. (Given.)"""
    return forward_cost(config, batch_size, prompt_len, 0, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
                        group_size=group_size)  # fmt: skip


def decode_cost(config, batch_size: int, cached_tokens: int, *, weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                group_size: int = 128) -> StepCost:  # fmt: skip
    """A decode step: one new token per sequence after `cached_tokens`. (Given.)"""
    return forward_cost(config, batch_size, 1, cached_tokens, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
                        group_size=group_size)  # fmt: skip


def roofline_time(cost: StepCost, bandwidth: float, matrix_rate: float) -> float:
    """Seconds the step takes at best: the larger of cost.bytes / bandwidth (bytes/s) and cost.flops / matrix_rate
    (FLOP/s). Memory traffic and math overlap, so the times are not added. bandwidth and matrix_rate must be positive
    finite numbers, else ValueError naming them.
    """
    raise NotImplementedError("roofline_time: max(bytes / bandwidth, flops / matrix_rate)")


def decode_crossover_batch(config, cached_tokens: int, bandwidth: float, matrix_rate: float, *,
                           weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                           group_size: int = 128) -> int | None:  # fmt: skip
    """The smallest batch size whose decode step (after `cached_tokens` per sequence) is compute-bound:
    flops / matrix_rate >= bytes / bandwidth. None if no batch size is (each sequence's own traffic, its KV cache
    above all, then costs more time than its FLOPs, however large the batch).
    """
    # TODO: a decode step's FLOPs are B x (per sequence) and its bytes (weights) + B x (per sequence): solve the
    #  inequality for B. Do not search: when the answer is None, no search ends. fractions.Fraction(x) is exact.
    raise NotImplementedError("decode_crossover_batch: solve B f1 / rate >= (W + B b1) / bandwidth for the least B")


def max_batch_size(config, memory_bytes: int, context_len: int, *, weight_dtype: str = "bf16",
                   kv_dtype: str = "bf16", group_size: int = 128) -> int:  # fmt: skip
    """The most sequences of `context_len` tokens whose KV cache fits in `memory_bytes` beside the weights (0 if not
    even one does). memory_bytes must be a non-negative int and context_len a positive int, else ValueError naming
    them.
    """
    raise NotImplementedError("max_batch_size: (memory - weights) // KV bytes of one sequence, never below 0")


def decode_tokens_per_second(config, batch_size: int, cached_tokens: int, bandwidth: float, matrix_rate: float, *,
                             weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                             group_size: int = 128) -> float:  # fmt: skip
    """Tokens per second of decode steps at the roofline: each step makes one token per sequence."""
    raise NotImplementedError("decode_tokens_per_second: tokens per step / roofline_time of the decode step")


def cost_per_million_tokens(tokens_per_second: float, gpu_hour_price: float) -> float:
    """Dollars per million tokens, for a GPU rented at `gpu_hour_price` dollars an hour producing tokens_per_second.

    tokens_per_second must be positive and gpu_hour_price non-negative (finite numbers), else ValueError naming them.
    """
    raise NotImplementedError("cost_per_million_tokens: price per second / tokens per second x one million")
