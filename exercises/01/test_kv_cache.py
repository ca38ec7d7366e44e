"""Exercise 01 specification: a KV cache for a Llama-style decoder with grouped-query attention.

Correctness is checked against transformers' LlamaForCausalLM (built offline from a config with seeded weights) in
float32 on the CPU; speed is judged on a GPU as ratios measured in the same run (thresholds.toml).
"""

import statistics

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fixtures.checks import expect_error
from fixtures.llama import Llama, build_hf_model, llama_config

TOL = dict(atol=1e-4, rtol=1e-4)  # fp32 end to end: different summation orders only


@pytest.fixture
def kv(impl):
    return impl("kv_cache")


@pytest.fixture(scope="module")
def hf_tiny():
    return build_hf_model("tiny", seed=0)


@pytest.fixture(scope="module")
def tiny(hf_tiny):
    return Llama(hf_tiny)


def hf_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(ids).logits


def random_ids(model, batch, tokens, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.vocab_size, (batch, tokens), generator=generator).to(device)


def new_cache(kv, model, batch, capacity):
    return kv.KVCache(model.num_layers, batch, capacity, model.num_kv_heads, model.head_dim, model.dtype, model.device)


def close(actual, expected, what, **tol):
    torch.testing.assert_close(actual, expected, **(tol or TOL), msg=lambda m: f"{what}\n{m}")


# --- kv_cache_bytes: the memory formula ------------------------------------------------------------------------------


def test_bytes_count_keys_and_values_of_every_layer_sequence_and_token(kv):
    config = llama_config("small")  # 12 layers, 4 kv heads of 64 dims
    got = kv.kv_cache_bytes(config, batch_size=4, seq_len=1000, dtype=torch.float16)
    expected = 2 * 12 * 4 * 1000 * 4 * 64 * 2
    assert got == expected, (
        f"expected 2 (K and V) x 12 layers x 4 sequences x 1000 tokens x 4 kv heads x 64 dims x 2 bytes = {expected}, "
        f"got {got}"
    )


def test_bytes_count_key_value_heads_not_query_heads(kv):
    config = llama_config("small", num_attention_heads=16, num_key_value_heads=2)
    got = kv.kv_cache_bytes(config, batch_size=1, seq_len=10, dtype=torch.float16)
    expected = 2 * 12 * 10 * 2 * 64 * 2
    assert got == expected, (
        f"with grouped-query attention only the {config.num_key_value_heads} key/value heads are cached, not the "
        f"{config.num_attention_heads} query heads: expected {expected}, got {got}"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_bytes_use_the_dtype_size(kv, dtype):
    config = llama_config("small")
    got = kv.kv_cache_bytes(config, batch_size=2, seq_len=7, dtype=dtype)
    expected = 2 * 12 * 2 * 7 * 4 * 64 * dtype.itemsize
    assert got == expected, f"a {dtype} element takes {dtype.itemsize} bytes: expected {expected}, got {got}"


def test_bytes_read_head_dim_from_the_config(kv):
    config = llama_config("small", head_dim=128)  # wider heads than hidden_size // num_attention_heads = 64
    got = kv.kv_cache_bytes(config, batch_size=1, seq_len=1, dtype=torch.float16)
    expected = 2 * 12 * 1 * 1 * 4 * 128 * 2
    assert got == expected, f"config.head_dim is 128, not hidden_size // heads = 64: expected {expected}, got {got}"


def test_bytes_are_an_exact_int_at_the_scale_of_real_models(kv):
    # A Llama-3-70B-shaped config: 80 layers, 64 query heads, 8 kv heads of 128 dims, at a 128k context.
    config = llama_config("small", num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                          hidden_size=8192, head_dim=128)  # fmt: skip
    for batch, expected in ((1, 42_949_672_960), (32, 1_374_389_534_720)):
        got = kv.kv_cache_bytes(config, batch_size=batch, seq_len=131072, dtype=torch.float16)
        assert isinstance(got, int) and not isinstance(got, bool), (
            f"kv_cache_bytes must return an int (a count of bytes), got {type(got).__name__} {got!r}"
        )
        assert got == expected, (
            f"70B-shaped model, batch {batch}, 128k tokens, fp16: expected 2 x 80 x {batch} x 131072 x 8 x 128 x 2 = "
            f"{expected} bytes ({expected / 2**30:.0f} GiB), got {got}"
            + (": the count overflowed 32 bits" if got == expected % 2**32 or got < 2**31 else "")
        )


# --- KVCache: preallocated, written in place ---------------------------------------------------------------------


def kv_pair(batch=2, heads=2, tokens=3, dim=4, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, tokens, dim, generator=generator, dtype=dtype) for _ in range(2))


def small_cache(kv, capacity=8):
    return kv.KVCache(num_layers=3, batch_size=2, capacity=capacity, num_kv_heads=2, head_dim=4)


def test_cache_is_allocated_once_at_full_capacity(kv):
    cache = small_cache(kv)
    assert tuple(cache.keys.shape) == (3, 2, 2, 8, 4) and tuple(cache.values.shape) == (3, 2, 2, 8, 4), (
        f"keys and values must be [layers=3, batch=2, kv_heads=2, capacity=8, head_dim=4], got "
        f"{list(cache.keys.shape)} and {list(cache.values.shape)}"
    )
    addresses = (cache.keys.data_ptr(), cache.values.data_ptr())
    for step in range(4):
        for layer in range(3):
            cache.append(layer, *kv_pair(tokens=2 if step == 0 else 1, seed=step))
            # Checked after every append: a buffer replaced twice could land back at its first address.
            assert (cache.keys.data_ptr(), cache.values.data_ptr()) == addresses, (
                f"the cache buffers were reallocated by append (step {step}, layer {layer}): write into the "
                "preallocated tensors (torch.cat onto the cache copies the whole cache every step)"
            )
        cache.advance(2 if step == 0 else 1)
    assert cache.capacity == 8, f"capacity: expected 8, got {cache.capacity}"


def test_cache_uses_the_requested_dtype_and_device(kv):
    cache = kv.KVCache(2, 1, 4, 1, 8, dtype=torch.float16, device="meta")
    for name, buffer in (("keys", cache.keys), ("values", cache.values)):
        assert buffer.dtype == torch.float16 and buffer.device.type == "meta", (
            f"KVCache(dtype=float16, device='meta').{name} must be float16 on meta, got {buffer.dtype} on "
            f"{buffer.device}: a cache in the wrong dtype doubles its memory, on the wrong device it cannot be used"
        )


def test_nbytes_is_the_formula_at_full_capacity(kv, tiny):
    cache = new_cache(kv, tiny, batch=3, capacity=50)
    expected = kv.kv_cache_bytes(tiny.config, 3, 50, tiny.dtype)
    assert cache.nbytes == expected == 2 * 2 * 3 * 50 * 2 * 16 * 4, (
        f"cache.nbytes should equal kv_cache_bytes(config, 3, 50, float32) = {2 * 2 * 3 * 50 * 2 * 16 * 4}; "
        f"got nbytes {cache.nbytes}, formula {expected}"
    )


def test_append_writes_at_seq_len_and_returns_the_filled_prefix(kv):
    cache = small_cache(kv)
    k1, v1 = kv_pair(tokens=3, seed=1)
    k2, v2 = kv_pair(tokens=2, seed=2)
    keys, values = cache.append(1, k1, v1)
    close(keys, k1, "after one append of 3 tokens, append must return exactly those 3 keys")
    assert keys.data_ptr() == cache.keys[1].data_ptr() and values.data_ptr() == cache.values[1].data_ptr(), (
        "append must return views of the cache (slices of cache.keys / cache.values), not copies: a copy per layer "
        "per step costs as much as reading the whole cache again"
    )
    assert cache.seq_len == 0, f"append must not move seq_len (advance does), got seq_len {cache.seq_len}"
    cache.advance(3)
    keys, values = cache.append(1, k2, v2)
    assert keys.shape[2] == 5, f"after 3 + 2 tokens the returned keys must cover 5 positions, got {keys.shape[2]}"
    close(keys, torch.cat([k1, k2], dim=2), "keys at positions 0..4 must be the first 3 then the next 2 appended")
    close(values, torch.cat([v1, v2], dim=2), "values at positions 0..4 must be the first 3 then the next 2 appended")
    cache.advance(2)
    assert cache.seq_len == 5, f"seq_len after advancing 3 then 2: expected 5, got {cache.seq_len}"
    close(cache.keys[1, :, :, :5], torch.cat([k1, k2], dim=2), "the appended keys must be stored in cache.keys")


def test_layers_do_not_share_storage(kv):
    cache = small_cache(kv)
    k, v = kv_pair(tokens=2, seed=3)
    cache.append(0, k, v)
    before = cache.keys[1:].clone(), cache.values[1:].clone()
    cache.append(0, k * 2, v * 2)
    close(cache.keys[1:], before[0], "appending to layer 0 must not touch layers 1 and 2")
    close(cache.values[1:], before[1], "appending to layer 0 must not touch layers 1 and 2")


def test_append_past_capacity_raises_and_changes_nothing(kv):
    cache = small_cache(kv, capacity=4)
    for layer in range(3):
        cache.append(layer, *kv_pair(tokens=3, seed=4))
    cache.advance(3)
    snapshot = cache.keys.clone()
    # 3 stored + 2 > 4: silently writing past the end is the bug
    expect_error(ValueError, lambda: cache.append(0, *kv_pair(tokens=2, seed=5)), "append past capacity", "capacity")
    assert cache.seq_len == 3 and torch.equal(cache.keys, snapshot), "a rejected append must leave the cache unchanged"
    expect_error(ValueError, lambda: cache.advance(2), "advance past capacity", "capacity")
    assert cache.seq_len == 3, f"a rejected advance must leave seq_len at 3, got {cache.seq_len}"


BAD_APPENDS = {
    "wrong batch": lambda k: k[:1],
    "wrong kv heads": lambda k: torch.cat([k, k], dim=1),
    "wrong head dim": lambda k: k[..., :3],
    "missing batch dim": lambda k: k[0],
    "wrong dtype": lambda k: k.double(),
    "wrong device": lambda k: k.to("meta"),
}


@pytest.mark.parametrize("which", ["k and v", "v only"])
@pytest.mark.parametrize("mistake", BAD_APPENDS)
def test_append_rejects_bad_tensors_and_changes_nothing(kv, mistake, which):
    cache = small_cache(kv)
    k, v = kv_pair(tokens=2, seed=6)
    snapshot = cache.keys.clone(), cache.values.clone()
    bad = BAD_APPENDS[mistake]
    args = (bad(k), bad(v)) if which == "k and v" else (k, bad(v))
    expect_error(ValueError, lambda: cache.append(0, *args), f"append with {mistake} ({which})")
    assert cache.seq_len == 0 and torch.equal(cache.keys, snapshot[0]) and torch.equal(cache.values, snapshot[1]), (
        f"append with {mistake} ({which}) must raise ValueError before writing anything"
        + (": check v before writing k" if which == "v only" and not torch.equal(cache.keys, snapshot[0]) else "")
    )


def test_append_rejects_a_layer_out_of_range_and_mismatched_k_v(kv):
    cache = small_cache(kv)
    k, v = kv_pair(tokens=2, seed=7)
    for layer in (3, -1):  # -1 would silently write the last layer
        expect_error(ValueError, lambda layer=layer: cache.append(layer, k, v), f"append to layer {layer}", "layer")
    expect_error(ValueError, lambda: cache.append(0, k, v[:, :, :1]), "append with 2 keys but 1 value")
    assert not cache.keys.any() and not cache.values.any(), "a rejected append wrote into the cache"


SIZES = ("num_layers", "batch_size", "capacity", "num_kv_heads", "head_dim")


@pytest.mark.parametrize("value", [0, -1, 2.5])
@pytest.mark.parametrize("name", SIZES)
def test_constructor_rejects_bad_sizes(kv, name, value):
    sizes = dict(num_layers=1, batch_size=1, capacity=4, num_kv_heads=1, head_dim=4) | {name: value}
    expect_error(ValueError, lambda: kv.KVCache(**sizes), f"KVCache({name}={value})", match=name)


class ElementsProduced(TorchDispatchMode):
    """Counts the elements that every tensor operation except views writes: the work an operation does."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.count += sum(t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out


def test_append_work_is_proportional_to_the_new_tokens_not_the_cache(kv):
    cache = kv.KVCache(num_layers=2, batch_size=2, capacity=1024, num_kv_heads=2, head_dim=4)
    k, v = kv_pair(tokens=1, seed=30)
    work = {}
    for seq_len in (8, 1000):
        cache.seq_len = seq_len
        with ElementsProduced() as counter:
            cache.append(1, k, v)
        work[seq_len] = counter.count
    assert work[1000] <= 1.5 * work[8], (
        f"appending one token wrote {work[8]} elements with 8 tokens cached and {work[1000]} with 1000: append must "
        "cost O(new tokens), not O(cache) — write only the new positions (re-concatenating or copying the whole "
        "prefix into the buffer every step gives the right answer at O(S) work per token)"
    )


def test_reset_forgets_tokens_but_keeps_the_buffers(kv):
    cache = small_cache(kv)
    cache.append(0, *kv_pair(tokens=3, seed=8))
    cache.advance(3)
    address = cache.keys.data_ptr()
    cache.reset()
    assert cache.seq_len == 0, f"reset must set seq_len to 0, got {cache.seq_len}"
    assert cache.keys.data_ptr() == address, "reset must keep the preallocated buffers (no reallocation)"
    k, v = kv_pair(tokens=1, seed=9)
    keys, _ = cache.append(0, k, v)
    close(keys, k, "after reset, the next append starts at position 0")


def test_append_writes_at_seq_len_after_a_rewind(kv):
    """seq_len is the one count of stored tokens: a caller may rewind it by assignment (speculative decoding drops
    rejected draft tokens that way), and the next append of every layer writes at the rewound seq_len."""
    cache = small_cache(kv)
    first = [kv_pair(tokens=5, seed=20 + layer) for layer in range(3)]
    for layer in range(3):
        cache.append(layer, *first[layer])
    cache.advance(5)
    cache.seq_len = 2  # rewind: positions 2..4 are dropped
    for layer in range(3):
        k, v = kv_pair(tokens=1, seed=30 + layer)
        keys, values = cache.append(layer, k, v)
        assert keys.shape[2] == 3, (
            f"layer {layer}: after rewinding seq_len to 2, append of 1 token must return 3 positions, got "
            f"{keys.shape[2]}: append writes at seq_len, whatever it was set to, never at a count of its own"
        )
        expected = torch.cat([first[layer][0][:, :, :2], k], dim=2)
        close(keys, expected, f"layer {layer}: after a rewind to seq_len 2, keys must be positions 0, 1 then the new "
              "token (append writes at seq_len, not at a per-layer count of its own)")  # fmt: skip
    cache.advance(1)
    assert cache.seq_len == 3, f"rewound to 2, then advanced by 1: expected seq_len 3, got {cache.seq_len}"


# --- RoPE and attention ----------------------------------------------------------------------------------------------


def hf_rope(x, positions, theta):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = llama_config("tiny", rope_parameters={"rope_type": "default", "rope_theta": theta}, rope_theta=theta)
    cos, sin = LlamaRotaryEmbedding(config)(x, positions[None])
    return apply_rotary_pos_emb(x, x, cos, sin)[0]


@pytest.mark.parametrize(
    "positions",
    [torch.arange(0, 6), torch.arange(5, 13), torch.tensor([300]), torch.tensor([0, 5, 17, 100])],
    ids=["prompt", "chunk", "decode", "scattered"],
)
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_matches_transformers(kv, positions, theta):
    x = torch.randn(2, 3, len(positions), 16, generator=torch.Generator().manual_seed(10))
    got = kv.apply_rope(x, positions, theta)
    close(
        got,
        hf_rope(x, positions, theta),
        f"RoPE at positions {positions.tolist()[:4]}... theta {theta}: pair dimension i with i + D/2 (not 2i with "
        "2i+1), rotate by position * theta ** (-2i / D), use the given positions themselves (not positions[0] + "
        "0, 1, 2, ...: they need not be contiguous)",
        atol=1e-5,
        rtol=1e-5,
    )


def test_rope_angles_are_computed_in_float32(kv):
    positions = torch.arange(3000, 3004)
    x = torch.randn(1, 2, 4, 16, generator=torch.Generator().manual_seed(20)).to(torch.bfloat16)
    got = kv.apply_rope(x, positions, 10000.0)
    assert got.shape == x.shape and got.dtype == x.dtype, (
        f"apply_rope returns x's shape and dtype: expected {list(x.shape)} bfloat16, got {list(got.shape)} {got.dtype}"
    )
    close(
        got.float(),
        hf_rope(x, positions, 10000.0).float(),
        "bf16 input at positions 3000..3003: compute position * inverse frequency in float32 (bf16 keeps 8 bits, so "
        "an angle near 3000 rad would be off by several radians), then cast cos and sin to x's dtype",
        atol=2e-2,
        rtol=2e-2,
    )


def reference_attention(q, k, v, heads="h // G", scale="1/sqrt(D)", diagonal="bottom right"):
    """Causal GQA attention in float64, written out: query head h reads kv head h // G, bottom-right diagonal.

    The keyword arguments build the usual wrong variants, to name the mistake when a result matches one of them.
    """
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    spread = torch.Tensor.repeat_interleave if heads == "h // G" else lambda t, g, dim: t.repeat(1, g, 1, 1)
    k, v = spread(k, groups, dim=1), spread(v, groups, dim=1)
    queries, keys = q.shape[2], k.shape[2]
    factor = {"1/sqrt(D)": q.shape[-1] ** -0.5, "none": 1.0, "twice": q.shape[-1] ** -1.0}[scale]
    scores = q @ k.transpose(-1, -2) * factor
    offset = {"bottom right": keys - queries, "top left": 0, "none": keys}[diagonal]
    visible = torch.ones(queries, keys, dtype=torch.bool).tril(diagonal=offset)
    return (scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v).float()


ATTENTION_MISTAKES = {
    "query head h read kv head h % Hkv (repeat instead of repeat_interleave)": dict(heads="h % Hkv"),
    "the scores were not scaled by 1/sqrt(D)": dict(scale="none"),
    "the scores were scaled by 1/sqrt(D) twice": dict(scale="twice"),
    "the causal diagonal sits at the top left (SDPA's is_causal=True with T < S)": dict(diagonal="top left"),
    "no causal mask: queries see later positions": dict(diagonal="none"),
}


def check_attention(got, q, k, v, what):
    expected = reference_attention(q, k, v)
    if got.shape == expected.shape and torch.allclose(got.float(), expected, atol=1e-5, rtol=1e-5):
        return
    named = [
        mistake
        for mistake, variant in ATTENTION_MISTAKES.items()
        if got.shape == expected.shape and torch.allclose(got.float(), reference_attention(q, k, v, **variant),
                                                          atol=1e-5, rtol=1e-5)  # fmt: skip
    ]
    close(got, expected, what + (f". Your output equals attention where {named[0]}" if len(named) == 1 else ""),
          atol=1e-5, rtol=1e-5)  # fmt: skip


def qkv(heads, kv_heads, queries, keys, seed):
    generator = torch.Generator().manual_seed(seed)
    shapes = ((2, heads, queries, 8), (2, kv_heads, keys, 8), (2, kv_heads, keys, 8))
    return tuple(torch.randn(*shape, generator=generator) for shape in shapes)


def test_attention_scales_scores_by_one_over_sqrt_head_dim(kv):
    q, k, v = qkv(heads=2, kv_heads=2, queries=1, keys=6, seed=10)  # one query, one kv head per query head
    check_attention(kv.attention(q, k, v), q, k, v, "one query, no grouping: softmax(q k^T / sqrt(D)) v")


def test_attention_query_heads_share_kv_heads_in_consecutive_groups(kv):
    q, k, v = qkv(heads=8, kv_heads=2, queries=1, keys=6, seed=11)
    check_attention(
        kv.attention(q, k, v), q, k, v,
        "with 8 query heads and 2 kv heads, query heads 0-3 read kv head 0 and 4-7 read kv head 1 (h // 4)",
    )  # fmt: skip


def test_attention_causal_diagonal_is_at_the_bottom_right(kv):
    q, k, v = qkv(heads=2, kv_heads=2, queries=3, keys=7, seed=12)
    check_attention(
        kv.attention(q, k, v), q, k, v,
        "3 new queries over 7 keys are positions 4, 5, 6: query i sees keys 0..4+i",
    )  # fmt: skip


def test_attention_over_a_whole_prompt_is_causal(kv):
    q, k, v = qkv(heads=4, kv_heads=1, queries=5, keys=5, seed=13)
    check_attention(kv.attention(q, k, v), q, k, v, "prompt attention: token i sees tokens 0..i only")


# --- forward and generate against transformers --------------------------------------------------------------------


@pytest.mark.points(2)
def test_prefill_logits_match_transformers(kv, tiny, hf_tiny):
    ids = random_ids(tiny, batch=2, tokens=9, seed=14)
    cache = new_cache(kv, tiny, batch=2, capacity=16)
    got = kv.forward(tiny, ids, cache)
    close(got, hf_logits(hf_tiny, ids), "prefill logits [2, 9, 256] must match LlamaForCausalLM's")
    assert cache.seq_len == 9, f"after a 9-token prefill the cache must hold 9 tokens, got seq_len {cache.seq_len}"


@pytest.mark.points(2)
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_logits_match_transformers_at_every_step(kv, tiny, hf_tiny, batch):
    ids = random_ids(tiny, batch=batch, tokens=16, seed=15)
    expected = hf_logits(hf_tiny, ids)
    cache = new_cache(kv, tiny, batch=batch, capacity=16)
    kv.forward(tiny, ids[:, :6], cache)
    assert cache.seq_len == 6, f"forward over a 6-token prompt must advance the cache to 6, got seq_len {cache.seq_len}"
    for position in range(6, 16):
        got = kv.forward(tiny, ids[:, position : position + 1], cache)
        assert cache.seq_len == position + 1, (
            f"a decode step must advance the cache by one token: expected seq_len {position + 1}, got {cache.seq_len}"
        )
        close(
            got[:, 0],
            expected[:, position],
            f"decode step at position {position} ({position - 5} after the prompt): logits differ from a full forward "
            "pass, while the prefill's matched. A guess, to check first: the new token's RoPE position (it is "
            "cache.seq_len, not 0) or what the new query attends to (every cached token and itself)",
        )


def test_prefill_in_chunks_matches_one_pass(kv, tiny, hf_tiny):
    ids = random_ids(tiny, batch=2, tokens=9, seed=16)
    expected = hf_logits(hf_tiny, ids)
    cache = new_cache(kv, tiny, batch=2, capacity=9)
    start = 0
    for size in (5, 3, 1):
        got = kv.forward(tiny, ids[:, start : start + size], cache)
        close(
            got,
            expected[:, start : start + size],
            f"chunk of {size} tokens at positions {start}..{start + size - 1} after {start} cached: logits differ "
            "from a full forward pass. A guess, to check first: each new token attends to every cached token and the "
            "new ones before it (causal diagonal at the bottom right), at RoPE positions that continue the cache's",
        )
        start += size


@pytest.fixture(scope="module")
def hf_llama3_rope():
    """The tiny model with Llama 3's RoPE base (theta 500000; Llama 2 used 10000)."""
    return build_hf_model("tiny", seed=3, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                          rope_theta=500000.0)  # fmt: skip


def test_forward_uses_the_models_rope_theta(kv, hf_llama3_rope):
    model = Llama(hf_llama3_rope)
    assert model.rope_theta == 500000.0, "test setup: the model's RoPE theta should be 500000"
    ids = random_ids(model, batch=2, tokens=10, seed=21)
    expected = hf_logits(hf_llama3_rope, ids)
    cache = new_cache(kv, model, batch=2, capacity=12)
    hint = ("a model whose rope_theta is 500000 (Llama 3's): forward must rotate with model.rope_theta, not a "
            "hard-coded 10000 (Llama 2's)")  # fmt: skip
    close(kv.forward(model, ids[:, :8], cache), expected[:, :8], f"prefill logits differ on {hint}")
    for position in (8, 9):
        got = kv.forward(model, ids[:, position : position + 1], cache)
        close(got[:, 0], expected[:, position], f"decode step at position {position}: logits differ on {hint}")


def hf_greedy(hf_model, ids, steps):
    """Greedy decoding with a full forward pass per token: slow, obviously right."""
    for _ in range(steps):
        ids = torch.cat([ids, hf_logits(hf_model, ids)[:, -1:].argmax(-1)], dim=1)
    return ids[:, -steps:]


@pytest.mark.points(2)
@pytest.mark.parametrize("batch", [1, 2])
def test_generate_matches_transformers_greedy(kv, tiny, hf_tiny, batch):
    ids = random_ids(tiny, batch=batch, tokens=7, seed=17)
    prompt = ids.clone()
    got = kv.generate(tiny, ids, max_new_tokens=12)
    expected = hf_greedy(hf_tiny, ids, 12)
    assert got.shape == (batch, 12) and got.dtype == torch.int64, (
        f"generate must return the 12 new tokens as [{batch}, 12] int64, got {list(got.shape)} {got.dtype}"
    )
    assert torch.equal(got, expected), f"greedy tokens differ from transformers:\nexpected {expected}\ngot      {got}"
    assert torch.equal(ids, prompt), "generate must not modify the prompt tensor"


class LogitsRecorder:
    """Wraps model.logits to keep the last position's logits of every step, eager or replayed from a CUDA graph.

    The copy into the buffer is itself a device operation with a device-side step counter, so when a decode step is
    captured in a CUDA graph the recording is captured with it and runs at every replay.
    """

    def __init__(self, model, steps: int):
        self.inner = model.logits
        self.steps = torch.zeros((), dtype=torch.long, device=model.device)
        self.buffer = torch.full((2 * steps + 8, 2, model.vocab_size), float("nan"), device=model.device)

    def __call__(self, hidden):
        logits = self.inner(hidden)
        slot = self.steps.clamp(max=self.buffer.shape[0] - 1).view(1)
        self.buffer.index_copy_(0, slot, logits[:, -1:].transpose(0, 1).to(self.buffer.dtype))
        self.steps.add_(1)
        return logits


@pytest.mark.gpu
def test_generate_on_a_gpu_matches_transformers_logits_at_every_step(kv, monkeypatch):
    """The GPU path (the reference replays a CUDA graph) is held to transformers' logits at every step, at fp32.

    Greedy tokens alone can hide a RoPE or mask mistake on a random model; the logits cannot.
    """
    hf_model = build_hf_model("tiny", seed=3, device="cuda")
    model = Llama(hf_model)
    new_tokens = 24
    recorder = LogitsRecorder(model, new_tokens)
    monkeypatch.setattr(model, "logits", recorder)
    ids = random_ids(model, batch=2, tokens=9, seed=31, device="cuda")
    got = kv.generate(model, ids, max_new_tokens=new_tokens)
    torch.cuda.synchronize()
    expected = hf_logits(hf_model, torch.cat([ids, got], dim=1))[:, ids.shape[1] - 1 : -1]  # [B, N, V]
    gap = expected.max(-1).values - expected.gather(-1, got[..., None]).squeeze(-1)
    steps = (gap > 1e-3).nonzero()
    assert not len(steps), (
        f"on the GPU, generate's token at step {int(steps[0, 1])} (sequence {int(steps[0, 0])}) is not the argmax of "
        f"transformers' logits (gap {float(gap.max()):.3f}): the GPU decode path computes something else"
    )
    # Match each step to the recorded call closest to it: a warm-up call before a graph capture is not a mistake.
    calls = min(int(recorder.steps), recorder.buffer.shape[0])
    recorded = recorder.buffer[:calls]  # [calls, B, V]
    distance = (recorded[:, None] - expected.transpose(0, 1)[None]).abs().amax(dim=(2, 3))  # [calls, steps]
    error = distance.nan_to_num(float("inf")).amin(dim=0)  # per step; a NaN row matches nothing
    bound = 1e-3 * expected.abs().amax()
    wrong = (error > bound).nonzero().flatten()
    assert not len(wrong), (
        f"on the GPU, no call of model.logits gave transformers' logits for decode steps {wrong.tolist()} (closest "
        f"differs by {float(error.max()):.3g}, allowed {float(bound):.2g}; model.logits ran {int(recorder.steps)} "
        f"times for {new_tokens} tokens): the GPU decode path (a CUDA graph, if you capture one) computes something "
        "else than the eager path, though its greedy tokens may agree"
    )


def test_generate_feeds_one_new_token_per_step(kv, tiny, monkeypatch):
    seen = []
    embed = tiny.embed
    monkeypatch.setattr(tiny, "embed", lambda ids: seen.append(tuple(ids.shape)) or embed(ids))
    kv.generate(tiny, random_ids(tiny, batch=2, tokens=6, seed=21), max_new_tokens=5)
    assert seen and seen[0] == (2, 6) and all(shape == (2, 1) for shape in seen[1:]), (
        f"generate must embed the prompt once, then one new token per step; it embedded {seen}: feeding the whole "
        "sequence again each step recomputes what the cache holds"
    )


def with_id(ids, value):
    ids = ids.clone()
    ids[0, 2] = value
    return ids


BAD_GENERATE = {
    "float ids": lambda ids: (ids.float(), 4),
    "1-d ids": lambda ids: (ids[0], 4),
    "no new tokens": lambda ids: (ids, 0),
    "past max positions": lambda ids: (ids, 512),
    "id outside vocab": lambda ids: (ids + 256, 4),
    "id equal to the vocabulary size": lambda ids: (with_id(ids, 256), 4),  # valid ids are 0 .. V - 1
    "negative id": lambda ids: (with_id(ids, -1), 4),
    "ids on another device": lambda ids: (ids.to("meta"), 4),
}


@pytest.mark.parametrize("mistake", BAD_GENERATE)
def test_generate_rejects_bad_input(kv, tiny, mistake):
    ids, new = BAD_GENERATE[mistake](random_ids(tiny, batch=1, tokens=5, seed=18))
    expect_error(ValueError, lambda: kv.generate(tiny, ids, max_new_tokens=new), f"generate with {mistake}")


# --- speed (GPU): ratios measured in this run, thresholds in thresholds.toml ----------------------------------------


@pytest.fixture(scope="module")
def hf_small():
    return build_hf_model("small", seed=0, dtype=torch.float16, device="cuda")


@pytest.fixture(scope="module")
def small(hf_small):
    return Llama(hf_small)


def check_tokens(model, batch, count):
    def check(tokens, *args, **kwargs):
        assert tokens.shape == (batch, count), f"expected [{batch}, {count}] tokens, got {list(tokens.shape)}"
        vocab = model.config.vocab_size
        assert 0 <= int(tokens.min()) and int(tokens.max()) < vocab, "token ids outside the vocabulary"

    return check


def assert_greedy(hf_model, ids, tokens, batch, count):
    """Each token must be the argmax of the model's logits up to fp16 noise: checked with a full forward pass."""
    check_tokens(hf_model, batch, count)(tokens)
    logits = hf_logits(hf_model, torch.cat([ids, tokens], dim=1))[:, ids.shape[1] - 1 : -1].float()
    gap = logits.max(-1).values - logits.gather(-1, tokens[..., None]).squeeze(-1)
    assert bool((gap <= 0.1 * logits.std()).all()), f"generated tokens are not greedy: worst logit gap {gap.max():.3f}"


@pytest.mark.speed
@pytest.mark.points(2)
def test_cached_generate_beats_recomputing_the_prefix(kv, small, hf_small, speed):
    batch, prompt_len, new = 64, 512, 32

    def recompute(model, ids, steps):
        for _ in range(steps):
            cache = new_cache(kv, model, batch, ids.shape[1])
            ids = torch.cat([ids, kv.forward(model, ids, cache)[:, -1:].argmax(-1)], dim=1)
        return ids[:, -steps:]

    def setup():
        return (
            small,
            random_ids(small, batch, prompt_len, seed=int(torch.randint(1 << 30, ())), device="cuda"),
            new,
        ), {}

    def check(tokens, model, ids, steps):
        assert_greedy(hf_small, ids, tokens, batch, steps)

    baseline = speed.time(recompute, setup, rounds=3, warmup=1, check=check)
    cached = speed.bench(kv.generate, setup, rounds=5, warmup=1, check=check)
    speed.judge(
        "speedup_over_recompute",
        baseline.median / cached.median,
        detail=f"generate {batch * new / cached.median:.0f} tokens/s, recomputing {batch * new / baseline.median:.0f}",
    )


@pytest.mark.speed
def test_decode_step_time_stays_flat_as_the_context_grows(kv, small, speed):
    capacity = 4096
    cache = new_cache(kv, small, 1, capacity)
    kv.forward(small, random_ids(small, 1, capacity - 1, seed=19, device="cuda"), cache)

    def at_context(tokens):
        def setup():
            cache.seq_len = tokens  # rewind: the step writes position `tokens` and attends over 0..tokens
            return (small, random_ids(small, 1, 1, seed=tokens, device="cuda"), cache), {}

        return setup

    def check(logits, *args):
        assert logits.shape == (1, 1, small.vocab_size) and bool(logits.isfinite().all()), "bad decode logits"

    # Early and late steps alternate, one early step timed right before each late one, so that whatever else the
    # machine is doing slows both alike: an eager decode step is bound by the host's launches, which jitter.
    early_samples = []
    early, late_setup = at_context(64), at_context(capacity - 1)

    def interleaved_setup():
        early_samples.extend(speed.time(kv.forward, early, rounds=1, warmup=0, check=check).samples)
        return late_setup()

    speed.time(kv.forward, early, rounds=1, warmup=5, check=check)  # warm up at both contexts
    late = speed.bench(kv.forward, interleaved_setup, rounds=30, warmup=5, check=check)
    early_median = statistics.median(early_samples[5:])  # the ones beside the timed late steps
    speed.judge(
        "late_over_early_decode_step",
        late.median / early_median,
        detail=f"step at context {capacity - 1}: {late.median * 1e6:.0f} us, at 64: {early_median * 1e6:.0f} us",
    )


@pytest.mark.speed
def test_generate_beats_transformers_generate(kv, small, hf_small, speed):
    batch, prompt_len, new = 1, 128, 128

    def setup():
        return (random_ids(small, batch, prompt_len, seed=int(torch.randint(1 << 30, ())), device="cuda"),), {}

    def hf_generate(ids):
        mask = torch.ones_like(ids)
        return hf_small.generate(
            ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
        )

    def check_greedy(tokens, ids):
        assert_greedy(hf_small, ids, tokens, batch, new)

    hf = speed.time(hf_generate, setup, rounds=3, warmup=1)
    ours = speed.bench(lambda ids: kv.generate(small, ids, new), setup, rounds=5, warmup=1, check=check_greedy)
    speed.judge(
        "speedup_over_hf_generate",
        hf.median / ours.median,
        detail=f"generate {batch * new / ours.median:.0f} tokens/s, transformers {batch * new / hf.median:.0f}",
    )
