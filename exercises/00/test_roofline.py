"""Exercise 00 specification: FLOPs, bytes and the roofline of a Llama-style decoder step.

The counts are checked against values worked out by hand (the arithmetic is in the comments) for a Llama-3-8B-shaped,
a Llama-3-70B-shaped and a Llama-3.2-1B-shaped config (the last ties its embeddings), and against counts that do not
come from this course: transformers' own parameter tensors, and torch's FLOP counter running transformers' Llama.
On a GPU, the predictions are held against chains of matrix products shaped like the course's small Llama, timed in
the same run, with the two ceilings the grader measures there: the copy bandwidth and the bf16 matrix rate.
"""

from __future__ import annotations

import math
from fractions import Fraction
from types import SimpleNamespace

import pytest

from fixtures.checks import expect_error


@pytest.fixture
def rf(impl):
    return impl("roofline")


def llama_shape(layers, hidden, intermediate, heads, kv_heads, head_dim, vocab=128256, tied=False):
    """A config with the attributes of a transformers LlamaConfig that the formulas read."""
    return SimpleNamespace(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=intermediate,
                           num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                           vocab_size=vocab, tie_word_embeddings=tied)  # fmt: skip


LLAMA_8B = llama_shape(32, 4096, 14336, 32, 8, 128)  # Llama-3-8B's shape
LLAMA_70B = llama_shape(80, 8192, 28672, 64, 8, 128)  # Llama-3-70B's shape
LLAMA_1B = llama_shape(16, 2048, 8192, 32, 8, 64, tied=True)  # Llama-3.2-1B's shape: LM head tied to the embedding
TOY = llama_shape(2, 256, 512, 4, 2, 64, vocab=1000)

# Llama-3-8B, per layer: q 4096 x 4096 = 16,777,216; k and v 4096 x (8 x 128) = 4,194,304 each; o 16,777,216;
# gate, up, down 4096 x 14336 = 58,720,256 each. Projections: 218,103,808 per layer, x 32 = 6,979,321,856.
EMBEDDING_8B = 128256 * 4096  # 525,336,576, and as many again for the untied LM head
STREAMED_8B = 15_009_849_344  # bytes a bf16 step reads: (projections + LM head + 65 norms of 4096) x 2
H200 = dict(bandwidth=4.8e12, matrix_rate=9.9e14)  # the datasheet's ceilings (the GPU tests measure their own)


def check_count(got, expected: int, what: str, mistakes: dict[str, int] | None = None) -> None:
    """`got` must be the int `expected`; if it equals a known wrong count, the failure names that mistake."""
    if isinstance(got, bool) or not isinstance(got, int):
        hint = ": count with ints (// not /); a float keeps 53 bits, and these counts need more" if isinstance(
            got, float) else ""  # fmt: skip
        pytest.fail(f"{what}: must be an exact int, got {type(got).__name__} {got!r}{hint}", pytrace=False)
    if got == expected:
        return
    named = [mistake for mistake, value in (mistakes or {}).items() if value == got]
    message = f"{what}: expected {expected:,}, got {got:,}"
    if named:
        message += f". That is the count when {named[0]}"
    elif got == expected % 2**64 or got == (expected + 2**63) % 2**64 - 2**63 or got == expected % 2**32:
        message += ": the count overflowed (int32 or int64 arithmetic wraps around; Python ints do not)"
    pytest.fail(message, pytrace=False)


def close(got, expected: float, what: str, rel: float = 1e-9) -> None:
    if not isinstance(got, (int, float)) or isinstance(got, bool) or not math.isclose(got, expected, rel_tol=rel):
        pytest.fail(f"{what}: expected {expected:.6g}, got {got!r}", pytrace=False)


# --- parameters and weight memory --------------------------------------------------------------------------------


def test_parameter_count_of_a_llama_3_8b_shaped_model(rf):
    # Projections 6,979,321,856 (above) + two RMSNorms of 4096 per layer (262,144) + the embedding table and the
    # untied LM head, 128256 x 4096 = 525,336,576 each + the final norm 4096 = 8,030,261,248.
    check_count(rf.parameter_count(LLAMA_8B), 8_030_261_248, "Llama-3-8B-shaped parameter count", {
        "the LM head was left out (this config does not tie it to the embedding)": 8_030_261_248 - EMBEDDING_8B,
        "k and v were sized by the 32 query heads instead of the 8 key/value heads":
            8_030_261_248 + 32 * 2 * 4096 * (32 - 8) * 128,
        "the norms were left out": 8_030_261_248 - 65 * 4096,
    })  # fmt: skip


def test_parameter_count_of_a_llama_3_70b_shaped_model(rf):
    # Per layer: q and o 8192 x 8192 = 67,108,864 each; k and v 8192 x 1024 = 8,388,608 each; gate, up, down
    # 8192 x 28672 = 234,881,024 each; norms 2 x 8192: 855,654,400 per layer, x 80 = 68,452,352,000.
    # Embedding and LM head 128256 x 8192 = 1,050,673,152 each; final norm 8192: 70,553,706,496 in all.
    check_count(rf.parameter_count(LLAMA_70B), 70_553_706_496, "Llama-3-70B-shaped parameter count", {
        "k and v were sized by the 64 query heads instead of the 8 key/value heads":
            70_553_706_496 + 80 * 2 * 8192 * (64 - 8) * 128,
    })  # fmt: skip


def test_tied_embeddings_count_the_shared_table_once(rf):
    # Llama-3.2-1B's shape, per layer: q and o 2048 x 2048 = 4,194,304 each; k and v 2048 x 512 = 1,048,576 each;
    # MLP 3 x 2048 x 8192 = 50,331,648; norms 4096: 60,821,504, x 16 = 973,144,064. One table 128256 x 2048 =
    # 262,668,288 serves as embedding and LM head; final norm 2048: 1,235,814,400.
    check_count(rf.parameter_count(LLAMA_1B), 1_235_814_400, "Llama-3.2-1B-shaped parameter count (tied)", {
        "the tied embedding table was counted twice (embedding and LM head are one tensor)": 1_498_482_688,
    })  # fmt: skip


def test_head_dim_comes_from_the_config_or_is_hidden_over_heads(rf):
    # TOY: 2 layers, 256 wide, 4 query heads, 2 kv heads, MLP 512, vocabulary 1000, untied.
    # head_dim 64: q, o 256 x 256; k, v 256 x 128; MLP 3 x 256 x 512; norms 512 -> 590,336 per layer, x 2
    # + 2 tables of 256,000 + 256 = 1,692,928. head_dim 96 (wider than 256 / 4): q, o 256 x 384; k, v 256 x 192
    # -> 688,640 per layer, x 2 + 512,256 = 1,889,536.
    wide = SimpleNamespace(**{**vars(TOY), "head_dim": 96})
    check_count(rf.parameter_count(wide), 1_889_536, "config.head_dim = 96 (not hidden_size / heads = 64)",
                {"config.head_dim was ignored (hidden_size // num_attention_heads used instead)": 1_692_928})
    unset = SimpleNamespace(**{**vars(TOY), "head_dim": None})
    check_count(rf.parameter_count(unset), 1_692_928, "config.head_dim None: hidden_size // num_attention_heads")
    bare = SimpleNamespace(**{k: v for k, v in vars(TOY).items() if k not in ("head_dim", "tie_word_embeddings")})
    check_count(rf.parameter_count(bare), 1_692_928,
                "config without head_dim or tie_word_embeddings attributes (head_dim = 256 // 4, untied)")


def test_weight_bytes_at_32_and_16_bits(rf):
    for dtype, size in (("fp32", 4), ("bf16", 2), ("fp16", 2)):
        check_count(rf.weight_bytes(LLAMA_8B, dtype), 8_030_261_248 * size, f"Llama-3-8B weights in {dtype}")
    # 70,553,706,496 x 2 = 141,107,412,992: more than 2**32, the count must not wrap.
    check_count(rf.weight_bytes(LLAMA_70B, "bf16"), 141_107_412_992, "Llama-3-70B weights in bf16")


def test_fp8_weights_take_a_byte_each_plus_one_fp32_scale_per_output_channel(rf):
    # Projections: 6,979,321,856 x 1 byte. Output channels per layer: q/k/v 6144 + o 4096 + gate/up 28672
    # + down 4096 = 43,008, x 32 layers x 4 bytes = 5,505,024 bytes of scales. Embedding, LM head and norms stay
    # bf16: (2 x 525,336,576 + 65 x 4096) x 2 = 2,101,878,784. Total 9,086,705,664.
    check_count(rf.weight_bytes(LLAMA_8B, "fp8"), 9_086_705_664, "Llama-3-8B weights in fp8", {
        "the fp8 scales were left out (one fp32 per output channel)": 9_086_705_664 - 5_505_024,
        "the embedding, LM head and norms were stored in fp8 too (they stay 16-bit)": 9_086_705_664 - 1_050_939_392,
    })  # fmt: skip
    # 70B: 68,451,041,280 + 80 x 83,968 channels x 4 + (2 x 1,050,673,152 + 161 x 8192) x 2 = 72,683,241,472.
    check_count(rf.weight_bytes(LLAMA_70B, "fp8"), 72_683_241_472, "Llama-3-70B weights in fp8")


def test_int4_weights_take_half_a_byte_plus_a_scale_and_zero_point_per_group(rf):
    # Half a byte per weight: 6,979,321,856 / 2 = 3,489,660,928. Groups of 128 input channels per output channel,
    # per layer: q/k/v 4096/128 x 6144 = 196,608; o 32 x 4096 = 131,072; gate/up 32 x 28672 = 917,504; down
    # 14336/128 x 4096 = 458,752: 1,703,936, x 32 = 54,525,952 groups x (2-byte scale + half-byte zero) =
    # 136,314,880. Plus the bf16 embedding, LM head and norms 2,101,878,784: 5,727,854,592.
    check_count(rf.weight_bytes(LLAMA_8B, "int4", group_size=128), 5_727_854_592, "Llama-3-8B weights in int4, G=128", {
        "int4 bytes were counted without the group scales and zero points": 3_489_660_928 + 2_101_878_784,
        "the zero points were left out (AWQ stores a 4-bit zero per group, as in exercise 03)":
            5_727_854_592 - 54_525_952 // 2,
        "the embedding, LM head and norms were stored in int4 too (they stay 16-bit)":
            5_727_854_592 - 2_101_878_784 + 2_101_878_784 // 4,
    })  # fmt: skip
    # G = 32: four times the groups, 218,103,808 x 2.5 = 545,259,520 bytes of scales and zeros.
    check_count(rf.weight_bytes(LLAMA_8B, "int4", group_size=32), 3_489_660_928 + 545_259_520 + 2_101_878_784,
                "Llama-3-8B weights in int4, G=32")
    # group_size is read only for int4: another format ignores it, even one that would not divide.
    check_count(rf.weight_bytes(LLAMA_8B, "fp8", group_size=100), 9_086_705_664, "8B fp8 weights, group_size=100")
    # 70B, G = 128: 34,225,520,640 + 80 x 6,684,672 groups x 2.5 + 4,205,330,432 = 39,767,785,472.
    check_count(rf.weight_bytes(LLAMA_70B, "int4"), 39_767_785_472, "Llama-3-70B weights in int4 (default G=128)")


# --- KV cache --------------------------------------------------------------------------------------------------------


def test_kv_bytes_per_token_count_keys_and_values_of_the_kv_heads(rf):
    # 2 (K and V) x 32 layers x 8 kv heads x 128 dims x 2 bytes = 131,072: 128 KiB per token.
    check_count(rf.kv_bytes_per_token(LLAMA_8B, "bf16"), 131_072, "Llama-3-8B KV bytes per token (bf16)", {
        "the query heads (32) were cached instead of the key/value heads (8)": 524_288,
        "only K or only V was counted: the cache holds both": 65_536,
    })  # fmt: skip
    check_count(rf.kv_bytes_per_token(LLAMA_70B, "bf16"), 327_680,
                "Llama-3-70B KV bytes per token (2 x 80 x 8 x 128 x 2)")
    for dtype, size in (("fp32", 4), ("fp16", 2), ("fp8", 1)):
        check_count(rf.kv_bytes_per_token(LLAMA_8B, dtype), 65_536 * size, f"Llama-3-8B KV bytes per token in {dtype}")


def test_kv_cache_bytes_at_the_scale_of_real_models(rf):
    # Exercise 01's formula: 70B, 32 sequences of 128k tokens: 327,680 x 32 x 131072 = 1,374,389,534,720 (1.25 TiB).
    check_count(rf.kv_cache_bytes(LLAMA_70B, 32, 131072, "bf16"), 1_374_389_534_720, "70B KV cache, 32 x 128k, bf16")
    check_count(rf.kv_cache_bytes(LLAMA_8B, 3, 8192, "fp8"), 3 * 8192 * 65_536, "8B KV cache, 3 x 8192, fp8")


# --- FLOPs -----------------------------------------------------------------------------------------------------------


def test_decode_flops_are_two_per_weight_plus_attention(rf):
    # One new token after 8191 cached. Projections and the LM head: 2 x (6,979,321,856 + 525,336,576) =
    # 15,009,316,864 (2 x the parameters, less the embedding table, which is looked up, and the norms).
    # Attention: the new token attends to 8192 positions (8191 cached and itself); per layer and query head, q.k and
    # p.v cost 2 x 128 FLOPs each per position: 4 x 32 layers x 32 heads x 128 x 8192 = 4,294,967,296.
    cost = rf.decode_cost(LLAMA_8B, 1, 8191)
    check_count(cost.flops, 19_304_284_160, "Llama-3-8B decode FLOPs (batch 1, 8191 cached)", {
        "FLOPs were counted as one per multiply-add (a multiply-add is 2 FLOPs)": 19_304_284_160 // 2,
        "attention was counted per kv head: every query head does its own dot products":
            15_009_316_864 + 1_073_741_824,
        "attention was left out": 15_009_316_864,
        "the new token did not attend to itself (it attends to cached + 1 positions)":
            19_304_284_160 - 524_288,
        "the embedding lookup was counted as a matrix product": 19_304_284_160 + 2 * EMBEDDING_8B,
    })  # fmt: skip


def test_decode_flops_grow_linearly_with_the_batch(rf):
    one, many = rf.decode_cost(LLAMA_8B, 1, 1000), rf.decode_cost(LLAMA_8B, 64, 1000)
    check_count(many.flops, 64 * one.flops, "decode FLOPs at batch 64 (64 x batch 1: every sequence does the same)")


def test_prefill_attention_is_causal_and_the_lm_head_runs_on_the_last_token(rf):
    # Batch 1, 8192 prompt tokens. Projections: 2 x 8192 x 6,979,321,856 = 114,349,209,288,704.
    # LM head, last token only (sampling needs only the next token's logits): 2 x 525,336,576 = 1,050,673,152.
    # Attention, causal: token i attends to i + 1 positions, 1 + 2 + ... + 8192 = 8192 x 8193 / 2 = 33,558,528;
    # x 4 x 32 x 32 x 128 = 524,288 FLOPs each: 17,594,333,528,064. Total 131,944,593,489,920.
    cost = rf.prefill_cost(LLAMA_8B, 1, 8192)
    check_count(cost.flops, 131_944_593_489_920, "Llama-3-8B prefill FLOPs (1 x 8192 tokens)", {
        "attention was counted over the full 8192 x 8192 square: it is causal, token i sees i + 1 positions":
            114_349_209_288_704 + 1_050_673_152 + 524_288 * 8192 * 8192,
        "the LM head ran on every prompt token: a prefill needs the logits of the last token only":
            131_944_593_489_920 + 8191 * 1_050_673_152,
        "FLOPs were counted as one per multiply-add (a multiply-add is 2 FLOPs)": 131_944_593_489_920 // 2,
    })  # fmt: skip


def test_counts_at_a_70b_scale_stay_exact_past_2_to_the_63(rf):
    # 256 prompts of 131072 tokens on the 70B shape. Projections: 2 x 256 x 131072 x 68,451,041,280
    # = 4,593,671,619,917,905,920. LM head: 2 x 256 x 128256 x 8192 = 537,944,653,824. Attention:
    # 4 x 80 x 64 x 128 = 2,621,440 per position pair, x 256 x (131072 x 131073 / 2 = 8,590,000,128)
    # = 5,764,651,503,499,345,920. Total 10,358,323,661,361,905,664: more than 2**63, so int64 math overflows.
    cost = rf.prefill_cost(LLAMA_70B, 256, 131072)
    check_count(cost.flops, 10_358_323_661_361_905_664, "70B prefill FLOPs, 256 x 131072 tokens")
    # KV written: 256 x 131072 x 327,680 = 10,995,116,277,760 bytes (10 TiB: no GPU holds it, the count still must be
    # right).
    check_count(cost.kv_write_bytes, 10_995_116_277_760, "70B prefill KV bytes written, 256 x 131072 tokens")


def test_a_chunk_after_cached_tokens_does_the_work_a_longer_prefill_adds(rf):
    """forward_cost(T new after S cached) + one LM head = prefill(S + T) - prefill(S): causal attention continues."""
    chunk = rf.forward_cost(LLAMA_8B, 2, 300, 700)
    whole, start = rf.prefill_cost(LLAMA_8B, 2, 1000), rf.prefill_cost(LLAMA_8B, 2, 700)
    lm_head = 2 * 2 * EMBEDDING_8B  # 2 sequences x 2 FLOPs x 128256 x 4096
    check_count(chunk.flops, whole.flops - start.flops + lm_head,
                "FLOPs of 300 new tokens after 700 cached: new token i attends to 700 + i + 1 positions")
    check_count(chunk.kv_read_bytes, 2 * 700 * 131_072, "KV bytes read by a chunk after 700 cached (2 sequences)")
    check_count(chunk.kv_write_bytes, 2 * 300 * 131_072, "KV bytes written by a chunk of 300 new tokens (2 sequences)")


# --- bytes -----------------------------------------------------------------------------------------------------------


def test_decode_bytes_are_the_weights_once_the_kv_cache_and_the_activations(rf):
    cost = rf.decode_cost(LLAMA_8B, 1, 8191)
    # Every weight but the embedding table, which is looked up one row per token: 16,060,522,496 - 2 x 525,336,576.
    check_count(cost.weight_bytes, STREAMED_8B, "8B decode: weight bytes read", {
        "the embedding table was counted as streamed: a step looks up one row per token": 16_060_522_496,
    })  # fmt: skip
    check_count(cost.kv_read_bytes, 8191 * 131_072, "8B decode: KV bytes read (8191 cached tokens x 128 KiB)")
    check_count(cost.kv_write_bytes, 131_072, "8B decode: KV bytes written (the new token's K and V)")
    # Activations per token per layer (elements): q/k/v projection 4096 in + 6144 out; attention 6144 in + 4096
    # out; o 4096 + 4096; gate/up 4096 + 28672; down 14336 + 4096: 79,872, x 32 layers + the embedding row 4096
    # = 2,560,000. Per sequence, the LM head reads 4096 and writes 128,256 logits. (2,560,000 + 132,352) x 2 bytes.
    check_count(cost.activation_bytes, 5_384_704, "8B decode: activation bytes (batch 1)")
    check_count(cost.bytes, STREAMED_8B + 1_073_610_752 + 131_072 + 5_384_704, "8B decode: StepCost.bytes")
    close(cost.intensity, 19_304_284_160 / 16_088_975_872, "8B decode: StepCost.intensity (FLOPs per byte)")


def test_weights_are_read_once_per_step_not_once_per_token(rf):
    cost = rf.decode_cost(LLAMA_8B, 64, 8191)
    check_count(cost.weight_bytes, STREAMED_8B, "8B decode at batch 64: weight bytes read", {
        "the weights were counted per token: a step reads them once for the whole batch": 64 * STREAMED_8B,
    })  # fmt: skip
    check_count(cost.kv_read_bytes, 64 * 8191 * 131_072, "8B decode at batch 64: KV bytes read (every sequence's own)")
    prefill = rf.prefill_cost(LLAMA_8B, 1, 8192)
    check_count(prefill.weight_bytes, STREAMED_8B, "8B prefill of 8192 tokens: weight bytes read", {
        "the weights were counted per token: a step reads them once for all its tokens": 8192 * STREAMED_8B,
    })  # fmt: skip


def test_tied_embeddings_save_memory_but_not_bandwidth(rf):
    untied = SimpleNamespace(**{**vars(LLAMA_1B), "tie_word_embeddings": False})
    table = 128256 * 2048 * 2  # 525,336,576 bytes: one bf16 table of 128256 x 2048
    check_count(rf.weight_bytes(LLAMA_1B), 2_471_628_800, "Llama-3.2-1B (tied) weight memory: 1,235,814,400 x 2")
    check_count(rf.weight_bytes(untied), 2_471_628_800 + table, "the same shape untied: one more table")
    # Either way a step streams the LM head (which *is* the table when tied) and looks up rows of the embedding:
    # 2,471,628,800 bytes read per step, tied or not.
    check_count(rf.decode_cost(LLAMA_1B, 8, 100).weight_bytes, 2_471_628_800, "tied: weight bytes a step reads", {
        "the shared table was subtracted as if it were only looked up: with tied weights the LM head streams it":
            2_471_628_800 - table,
    })  # fmt: skip
    check_count(rf.decode_cost(untied, 8, 100).weight_bytes, 2_471_628_800, "untied: weight bytes a step reads", {
        "the embedding table was counted as streamed: a step looks up one row per token": 2_471_628_800 + table,
    })  # fmt: skip


def test_prefill_reads_no_kv_and_writes_every_prompt_token(rf):
    cost = rf.prefill_cost(LLAMA_8B, 4, 2048, kv_dtype="fp8")
    check_count(cost.kv_read_bytes, 0, "prefill with nothing cached: KV bytes read")
    check_count(cost.kv_write_bytes, 4 * 2048 * 65_536, "prefill of 4 x 2048 tokens, fp8 KV: KV bytes written")
    # 8B, 8192 tokens: (8192 x 2,560,000 + 132,352) x 2 = 41,943,304,704 activation bytes: more than the weights.
    check_count(rf.prefill_cost(LLAMA_8B, 1, 8192).activation_bytes, 41_943_304_704,
                "8B prefill of 8192 tokens: activation bytes")


def test_activations_follow_the_traffic_table_and_the_precision(rf):
    # TOY, 3 sequences x 5 new tokens after 7 cached. Per token per layer: qkv 256 + 512; attention 512 + 256;
    # o 256 + 256; gate/up 256 + 1024; down 512 + 256 = 4096, x 2 layers + 256 = 8448 per token, x 15 tokens
    # = 126,720; LM head per sequence 256 + 1000, x 3 = 3768. 130,488 elements.
    for dtype, size in (("bf16", 2), ("fp8", 2), ("int4", 2), ("fp32", 4)):
        cost = rf.forward_cost(TOY, 3, 5, 7, weight_dtype=dtype)
        check_count(cost.activation_bytes, 130_488 * size,
                    f"TOY activations with {dtype} weights (16-bit activations, fp32 only with fp32 weights)")


def test_quantized_weights_change_the_bytes_not_the_flops(rf):
    bf16 = rf.decode_cost(LLAMA_8B, 16, 512)
    int4 = rf.decode_cost(LLAMA_8B, 16, 512, weight_dtype="int4", group_size=64)
    check_count(int4.flops, bf16.flops, "decode FLOPs with int4 weights (dequantized, the same multiply-adds)")
    check_count(int4.weight_bytes, rf.weight_bytes(LLAMA_8B, "int4", 64) - 2 * EMBEDDING_8B,
                "decode weight bytes with int4 weights (G=64): int4 memory less the bf16 embedding table")
    check_count(int4.kv_read_bytes + int4.activation_bytes, bf16.kv_read_bytes + bf16.activation_bytes,
                "KV and activation bytes with int4 weights (the KV cache and activations stay bf16)")


def test_step_cost_totals_and_intensity(rf):
    cost = rf.StepCost(flops=1_000_000, weight_bytes=1000, kv_read_bytes=300, kv_write_bytes=20, activation_bytes=5)
    check_count(cost.bytes, 1325, "StepCost.bytes: weights + KV reads + KV writes + activations")
    close(cost.intensity, 1_000_000 / 1325, "StepCost.intensity: FLOPs / bytes")


# --- the roofline ------------------------------------------------------------------------------------------------


def test_roofline_time_is_the_larger_of_memory_time_and_compute_time(rf):
    memory_bound = rf.StepCost(flops=10**12, weight_bytes=4 * 10**10, kv_read_bytes=0, kv_write_bytes=0,
                               activation_bytes=0)  # fmt: skip
    compute_bound = rf.StepCost(flops=10**15, weight_bytes=10**9, kv_read_bytes=0, kv_write_bytes=0,
                                activation_bytes=0)  # fmt: skip
    for cost, expected, which in ((memory_bound, 0.01, "memory"), (compute_bound, 1.0, "compute")):
        got = rf.roofline_time(cost, bandwidth=4e12, matrix_rate=1e15)
        added = cost.bytes / 4e12 + cost.flops / 1e15
        hint = ("the two times were added: the roofline takes the larger, as memory and math overlap"
                if isinstance(got, float) and math.isclose(got, added) else "")
        close(got, expected, f"roofline time of a {which}-bound step (4 TB/s, 1 PFLOP/s) {hint}".strip())


def test_decode_is_memory_bound_and_prefill_compute_bound_on_an_h200(rf):
    ridge = H200["matrix_rate"] / H200["bandwidth"]  # 206 FLOPs per byte
    decode, prefill = rf.decode_cost(LLAMA_8B, 1, 8191), rf.prefill_cost(LLAMA_8B, 1, 8192)
    assert decode.intensity < 2 < ridge < 2000 < prefill.intensity, (
        f"8B decode at batch 1 does about 1 FLOP per byte and an 8192-token prefill about 2000; got "
        f"{decode.intensity:.3g} and {prefill.intensity:.3g} (the ridge is {ridge:.0f})"
    )
    close(rf.roofline_time(decode, **H200), 16_088_975_872 / 4.8e12, "8B decode time at batch 1 (memory-bound)")
    close(rf.roofline_time(prefill, **H200), 131_944_593_489_920 / 9.9e14, "8B prefill time (compute-bound)")


# --- the crossover batch ---------------------------------------------------------------------------------------------


def compute_bound(step_cost, batch: int, bandwidth: float, matrix_rate: float) -> bool:
    """FLOPs / rate >= bytes / bandwidth, in exact rationals (the test's own check of the definition)."""
    flops, nbytes = step_cost(batch)
    return flops * Fraction(bandwidth) >= nbytes * Fraction(matrix_rate)


def test_decode_turns_compute_bound_at_the_crossover_batch(rf):
    # Nothing cached, bf16. Per sequence: FLOPs 15,009,316,864 + 524,288 (the token attends to itself) =
    # 15,009,841,152; bytes 131,072 (KV write) + 5,384,704 (activations) = 5,515,776. Per step: 15,009,849,344
    # weight bytes. Compute-bound when B x 15,009,841,152 / 9.9e14 >= (15,009,849,344 + B x 5,515,776) / 4.8e12,
    # i.e. B >= 223.16: the smallest such batch is 224.
    got = rf.decode_crossover_batch(LLAMA_8B, 0, **H200)
    exact = lambda batch: (batch * 15_009_841_152, 15_009_849_344 + batch * 5_515_776)  # noqa: E731
    assert compute_bound(exact, 224, **H200) and not compute_bound(exact, 223, **H200)
    if got is None or got != 224:
        hint = ""
        if got is None:
            hint = ": None means no batch is compute-bound; one common cause is weights counted per token"
        elif got == 223:
            hint = ": batch 223 is still memory-bound; the smallest batch that is compute-bound is wanted (ceil)"
        pytest.fail(f"8B bf16 decode crossover on an H200 (4.8 TB/s, 990 TFLOP/s): expected 224, got {got!r}{hint}",
                    pytrace=False)  # fmt: skip
    check_count(got, 224, "crossover batch")


def test_the_crossover_batch_is_the_first_compute_bound_batch(rf):
    for weights, kv, cached, expected in (("fp32", "bf16", 0, 486), ("fp8", "bf16", 0, 120), ("int4", "fp8", 256, 92)):
        formats = dict(weight_dtype=weights, kv_dtype=kv)
        got = rf.decode_crossover_batch(LLAMA_8B, cached, **H200, **formats)

        def cost(batch, formats=formats, cached=cached):
            step = rf.decode_cost(LLAMA_8B, batch, cached, **formats)
            return step.flops, step.bytes

        what = f"8B decode crossover with {weights} weights, {kv} KV, {cached} cached"
        assert isinstance(got, int) and compute_bound(cost, got, **H200), (
            f"{what}: got {got!r}, which is not a compute-bound batch (FLOPs / rate >= bytes / bandwidth)"
        )
        assert got == 1 or not compute_bound(cost, got - 1, **H200), (
            f"{what}: got {got}, but {got - 1} is compute-bound already: the smallest such batch is wanted"
        )
        check_count(got, expected, what)


def test_no_batch_makes_a_long_context_decode_compute_bound(rf):
    # At 4096 cached tokens each sequence reads 4096 x 128 KiB = 512 MiB of KV cache per step for about 17 GFLOPs:
    # 33 FLOPs per byte, under the ridge of 206. Batching multiplies both: the step never turns compute-bound.
    got = rf.decode_crossover_batch(LLAMA_8B, 4096, **H200)
    assert got is None, (
        f"8B decode at 4096 cached tokens: every sequence's KV cache costs more bytes than its FLOPs can cover, so no "
        f"batch is compute-bound and the answer is None; got {got!r}"
    )


# --- memory, throughput, cost ----------------------------------------------------------------------------------------


def test_largest_batch_that_fits_beside_the_weights(rf):
    # 80 GiB = 85,899,345,920 bytes. 8B bf16 weights 16,060,522,496; a sequence of 8192 tokens needs
    # 8192 x 131,072 = 1 GiB of KV cache: (85,899,345,920 - 16,060,522,496) / 1,073,741,824 = 65.04 -> 65.
    check_count(rf.max_batch_size(LLAMA_8B, 80 * 2**30, 8192), 65, "8B bf16, 80 GiB, 8192-token sequences", {
        "the weights were not subtracted from the memory": 80,
        "the KV cache was sized by the query heads": 16,
    })  # fmt: skip
    # int4 weights (5,727,854,592) and an fp8 cache (512 MiB per sequence): 80,171,491,328 / 536,870,912 = 149.3.
    check_count(rf.max_batch_size(LLAMA_8B, 80 * 2**30, 8192, weight_dtype="int4", kv_dtype="fp8"), 149,
                "8B int4 weights, fp8 KV, 80 GiB, 8192-token sequences")
    # 70B in bf16 needs 141 GB for its weights alone: not even one sequence fits in 80 GiB.
    check_count(rf.max_batch_size(LLAMA_70B, 80 * 2**30, 8192), 0, "70B bf16 in 80 GiB: the weights do not fit")


def test_decode_tokens_per_second_is_the_batch_over_the_step_time(rf):
    # Batch 1: 16,088,975,872 bytes / 4.8 TB/s = 3.352 ms per step: 298.3 tokens/s.
    close(rf.decode_tokens_per_second(LLAMA_8B, 1, 8191, **H200), 4.8e12 / 16_088_975_872, "8B tokens/s at batch 1")
    # Batch 64: 84,073,947,136 bytes (the weights once, 64 KV caches): 17.5 ms per step for 64 tokens.
    got = rf.decode_tokens_per_second(LLAMA_8B, 64, 8191, **H200)
    close(got, 64 * 4.8e12 / 84_073_947_136,
          "8B tokens/s at batch 64 (64 tokens per step)" + (
              ": one token per step was counted, a step makes one token per sequence" if isinstance(got, float)
              and math.isclose(got, 4.8e12 / 84_073_947_136) else ""))  # fmt: skip


def test_cost_per_million_tokens(rf):
    got = rf.cost_per_million_tokens(1000.0, 3.6)  # $3.60 an hour is $0.001 a second; 10^6 tokens take 1000 s
    hint = {3600.0: ": the hourly price was not divided by 3600 s",
            1e-6: ": that is the cost of one token, not a million"}.get(got, "")  # fmt: skip
    close(got, 1.0, f"$3.60/h at 1000 tokens/s, dollars per million tokens{hint}")
    close(rf.cost_per_million_tokens(298.34092848343107, 2.5), 2.5 / 3600 / 298.34092848343107 * 1e6,
          "$2.50/h at 298 tokens/s")


# --- bad input -------------------------------------------------------------------------------------------------------


def with_field(config, **fields):
    return SimpleNamespace(**{**vars(config), **fields})


BAD_CALLS = {
    "zero layers": (lambda rf: rf.parameter_count(with_field(TOY, num_hidden_layers=0)), "num_hidden_layers"),
    "negative hidden size": (lambda rf: rf.weight_bytes(with_field(TOY, hidden_size=-256)), "hidden_size"),
    "a float head count": (lambda rf: rf.kv_bytes_per_token(with_field(TOY, num_key_value_heads=2.0)),
                           "num_key_value_heads"),
    "query heads not a multiple of kv heads": (
        lambda rf: rf.parameter_count(with_field(TOY, num_attention_heads=4, num_key_value_heads=3)), "multiple"),
    "unknown weight dtype": (lambda rf: rf.weight_bytes(TOY, "int3"), "weight_dtype"),
    "int4 KV cache": (lambda rf: rf.kv_bytes_per_token(TOY, "int4"), "kv_dtype"),
    "unknown kv dtype in a step": (lambda rf: rf.decode_cost(TOY, 1, 10, kv_dtype="float16"), "kv_dtype"),
    "group size not dividing the input features": (lambda rf: rf.weight_bytes(TOY, "int4", group_size=100),
                                                   "group_size"),
    "zero group size": (lambda rf: rf.weight_bytes(TOY, "int4", group_size=0), "group_size"),
    "zero batch": (lambda rf: rf.forward_cost(TOY, 0, 1), "batch_size"),
    "fractional batch": (lambda rf: rf.decode_cost(TOY, 2.5, 10), "batch_size"),
    "zero new tokens": (lambda rf: rf.forward_cost(TOY, 1, 0), "new_tokens"),
    "negative cached tokens": (lambda rf: rf.forward_cost(TOY, 1, 1, -1), "cached_tokens"),
    "zero sequence length": (lambda rf: rf.kv_cache_bytes(TOY, 1, 0), "seq_len"),
    "zero sequences in the cache": (lambda rf: rf.kv_cache_bytes(TOY, 0, 10), "batch_size"),
    "zero bandwidth": (lambda rf: rf.roofline_time(rf.decode_cost(TOY, 1, 1), 0.0, 1e15), "bandwidth"),
    "NaN matrix rate": (lambda rf: rf.roofline_time(rf.decode_cost(TOY, 1, 1), 4e12, float("nan")), "matrix_rate"),
    "negative bandwidth at the crossover": (lambda rf: rf.decode_crossover_batch(TOY, 0, -1.0, 1e15), "bandwidth"),
    "negative cached tokens at the crossover": (lambda rf: rf.decode_crossover_batch(TOY, -5, 4e12, 1e15),
                                                "cached_tokens"),
    "negative memory": (lambda rf: rf.max_batch_size(TOY, -1, 100), "memory_bytes"),
    "zero context": (lambda rf: rf.max_batch_size(TOY, 10**9, 0), "context_len"),
    "zero tokens per second": (lambda rf: rf.cost_per_million_tokens(0.0, 2.0), "tokens_per_second"),
    "negative price": (lambda rf: rf.cost_per_million_tokens(100.0, -2.0), "gpu_hour_price"),
}


@pytest.mark.parametrize("mistake", BAD_CALLS)
def test_bad_input_is_rejected_with_a_clear_error(rf, mistake):
    call, name = BAD_CALLS[mistake]
    expect_error(ValueError, lambda: call(rf), mistake, match=name)


# --- independent counts: transformers' parameters, torch's FLOP counter ----------------------------------------------


def test_parameters_and_weight_bytes_match_transformers_tensors(rf):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    for name, shape in (("Llama-3-8B", LLAMA_8B), ("Llama-3.2-1B (tied)", LLAMA_1B), ("TOY", TOY)):
        config = LlamaConfig(**vars(shape))
        with torch.device("meta"):  # shapes only: no memory, no initialization
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        tensors = {id(p): p for p in model.parameters()}.values()  # a tied table is one tensor
        check_count(rf.parameter_count(config), sum(p.numel() for p in tensors),
                    f"{name}: parameter count of transformers' LlamaForCausalLM(config)")  # fmt: skip
        check_count(rf.weight_bytes(config, "bf16"), sum(p.nbytes for p in tensors),
                    f"{name}: bytes of transformers' bf16 parameters")  # fmt: skip


def model_flops(counter) -> int:
    """The counter's total less RoPE's angle table, which some transformers versions build with a small matmul."""
    counts = counter.get_flop_counts()
    rope = sum(sum(ops.values()) for module, ops in counts.items() if module.endswith("rotary_emb"))
    return counter.get_total_flops() - rope


def test_flops_match_torch_flop_counter_on_transformers_llama(rf):
    """torch's FlopCounterMode counts 2 FLOPs per multiply-add of every matrix product transformers' Llama runs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fixtures.llama import build_hf_model

    model = build_hf_model("tiny", seed=0, attn_implementation="eager")  # attention as plain matrix products
    config = model.config  # 2 layers, 64 wide, 4 query heads, 2 kv heads of 16 dims, MLP 160, vocabulary 256
    batch, prompt = 3, 7
    ids = torch.randint(0, config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as prefill_counter:
        cache = model(ids, use_cache=True, logits_to_keep=1).past_key_values
    # Eager attention multiplies the whole T x T score matrix and masks it afterwards; a causal count does T(T+1)/2.
    per_pair = 4 * config.num_hidden_layers * config.num_attention_heads * config.head_dim
    wasted = per_pair * batch * (prompt**2 - prompt * (prompt + 1) // 2)
    check_count(rf.prefill_cost(config, batch, prompt).flops, model_flops(prefill_counter) - wasted,
                "tiny Llama prefill (3 x 7 tokens): FLOPs against torch's counter, less the masked half of attention")
    with torch.no_grad(), FlopCounterMode(display=False) as decode_counter:
        model(ids[:, :1], past_key_values=cache, use_cache=True)
    check_count(rf.decode_cost(config, batch, prompt).flops, model_flops(decode_counter),
                "tiny Llama decode step (3 sequences, 7 cached): FLOPs against torch's counter")


# --- on a GPU: predictions against measured chains of matrix products -------------------------------------------------
# The grader measures the copy bandwidth (once per session) and a bf16 8192^3 matrix product's rate; chains of the
# small Llama's matrix products are timed in the same run (bench/00_roofline.py). Thresholds: thresholds.toml.


@pytest.fixture(scope="module")
def small_config():
    from fixtures.llama import llama_config

    return llama_config("small")  # 12 layers, 1024 wide, 16 query / 4 kv heads of 64, MLP 2816, vocabulary 32000


@pytest.fixture(scope="module")
def chain(small_config):
    from fixtures.roofline_chains import SmallLlamaChain

    return SmallLlamaChain(small_config)


@pytest.fixture
def ceilings(speed):
    """(copy bandwidth in bytes/s, bf16 matrix rate in FLOP/s), both measured on this GPU in this session."""
    from fixtures.roofline_chains import matrix_rate

    rate = matrix_rate()
    speed.benchmark.extra_info["matrix_rate_flops_per_s"] = rate
    return speed.copy_bandwidth, rate


def judge_prediction(speed, name: str, predicted, measured: float, what: str) -> None:
    if not isinstance(predicted, float) or not predicted > 0:
        pytest.fail(f"{what}: roofline_time must return positive seconds, got {predicted!r}", pytrace=False)
    factor = max(measured / predicted, predicted / measured)
    speed.judge(name, factor, detail=f"{what}: predicted {predicted * 1e6:.0f} us, measured {measured * 1e6:.0f} us "
                                     f"({predicted / measured:.0%} of the roofline)")  # fmt: skip


@pytest.mark.speed
def test_decode_step_time_is_the_roofline_prediction(rf, speed, ceilings, chain, small_config):
    """A memory-bound step: batch 64 after 2048 cached tokens streams 0.34 GB of weights and 1.6 GB of KV cache."""
    from fixtures.roofline_chains import time_decode

    batch, cached = 64, 2048
    predicted = rf.roofline_time(rf.decode_cost(small_config, batch, cached), *ceilings)
    timing = time_decode(chain, speed.bench, batch, cached, rounds=20)
    judge_prediction(speed, "decode_time_factor", predicted, timing.median,
                     f"small Llama decode step, batch {batch}, {cached} cached (bf16)")  # fmt: skip


@pytest.mark.speed
def test_prefill_time_is_the_roofline_prediction(rf, speed, ceilings, chain, small_config):
    """A compute-bound step: 8 prompts of 1024 tokens, about 2.4 TFLOPs."""
    from fixtures.roofline_chains import time_prefill

    batch, tokens = 8, 1024
    predicted = rf.roofline_time(rf.prefill_cost(small_config, batch, tokens), *ceilings)
    timing = time_prefill(chain, speed.bench, batch, tokens)
    judge_prediction(speed, "prefill_time_factor", predicted, timing.median,
                     f"small Llama prefill, {batch} x {tokens} tokens (bf16)")  # fmt: skip


@pytest.mark.speed
def test_time_per_token_stops_falling_at_the_predicted_crossover_batch(rf, speed, ceilings, chain, small_config):
    """Below the crossover B* a bigger batch shares the same weight reads, so the time per token falls by about half
    per doubling; above it the step is compute-bound and the time per token flattens. On real kernels it keeps falling
    a little past B*, because a product of a few hundred rows does not reach the 8192^3 product's rate (on an H200 the
    small Llama's chain reaches 400 TFLOP/s at batch 512, 680 at 4096). So: still falling from B*/4 to B*/2, and
    nearly flat from 4 B* to 8 B*."""
    from fixtures.roofline_chains import time_decode

    crossover = rf.decode_crossover_batch(small_config, 0, *ceilings)
    if not isinstance(crossover, int) or not 4 <= crossover <= 1024:
        pytest.fail(f"small Llama decode crossover batch (nothing cached, bf16): expected an int between 4 and 1024 "
                    f"on a GPU whose ridge is {ceilings[1] / ceilings[0]:.0f} FLOP/byte, got {crossover!r}",
                    pytrace=False)  # fmt: skip
    batches = (crossover // 4, crossover // 2, 4 * crossover, 8 * crossover)
    per_token = {}
    for batch in batches:
        timer = speed.bench if batch == batches[-1] else speed.time
        per_token[batch] = time_decode(chain, timer, batch, 0).median / batch
    table = ", ".join(f"batch {b}: {t * 1e6:.3f} us/token" for b, t in per_token.items())
    speed.judge("per_token_ratio_below_crossover", per_token[batches[1]] / per_token[batches[0]],
                detail=f"predicted crossover batch {crossover}; {table}")  # fmt: skip
    speed.judge("per_token_ratio_above_crossover", per_token[batches[3]] / per_token[batches[2]],
                detail=f"predicted crossover batch {crossover}; {table}")  # fmt: skip
