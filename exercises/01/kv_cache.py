"""Exercise 01: the KV cache.

A decoder generates one token at a time, and each new token attends to the keys and values of every token before
it. Without a cache, every step recomputes those keys and values for the whole prefix: O(n) work per token, O(n²)
per sequence. A KV cache stores them once, so a decode step only computes the newest token's K and V and reads the
rest. That read is why decoding is memory-bound: per token, the GPU streams all the weights and the whole cache, and
does only a few FLOPs per byte.

You build, for a Llama-style decoder with grouped-query attention (GQA: fewer key/value heads than query heads):
  1. `kv_cache_bytes`: how much memory a cache needs.
  2. `KVCache`: one preallocated buffer per K and V; appending writes in place.
  3. `apply_rope`: rotary position embeddings at absolute positions.
  4. `attention`: causal GQA attention of the newest T tokens over everything cached.
  5. `forward` and `generate`: the decode loop that ties them together.
The rest of the model (embedding, RMSNorm, projections, MLP, LM head) is given: see fixtures/llama.py, whose `Llama`
object is the `model` argument below.

Shapes: B batch, T new tokens, S tokens so far (cached + new), H query heads, Hkv key/value heads, D head dim,
V vocabulary. Run `pytest exercises/01` to check your work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: F401  (you will likely want F.scaled_dot_product_attention)


class KVCache:
    """Keys and values of every layer, allocated once at full capacity.

    Attributes:
        keys, values: tensors [num_layers, batch_size, num_kv_heads, capacity, head_dim] of `dtype` on `device`,
            allocated in __init__ and never reallocated (appending writes into them).
        seq_len: int, how many tokens are stored. Tests may rewind it by assignment (tokens past it are ignored).

    Protocol of one forward step over T new tokens: each layer calls `append(layer, k, v)`, which writes at
    positions seq_len .. seq_len + T - 1 of that layer and returns the layer's keys and values so far; after the
    last layer, `advance(T)` moves seq_len on by T.
    """

    def __init__(self, num_layers, batch_size, capacity, num_kv_heads, head_dim, dtype=torch.float32, device="cpu"):
        # TODO: validate the sizes (positive ints; a ValueError whose message names the bad argument, e.g.
        #  "capacity must be a positive int") and allocate self.keys and
        #  self.values once, at full capacity. Start with seq_len = 0.
        raise NotImplementedError("KVCache.__init__: allocate keys and values [L, B, Hkv, capacity, D] once")

    @property
    def capacity(self) -> int:
        """Most tokens the cache can hold."""
        raise NotImplementedError("KVCache.capacity: read it off the buffers' shape")

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values buffers together (equals kv_cache_bytes for the full capacity)."""
        raise NotImplementedError("KVCache.nbytes: bytes of both buffers (Tensor.nbytes)")

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, T, D] at positions seq_len .. seq_len + T - 1 of `layer`.

        Returns that layer's keys and values for positions 0 .. seq_len + T - 1, [B, Hkv, seq_len + T, D] each,
        as views of the buffers (no copy). Does not change seq_len: `advance` does, once all layers have appended.
        Raises ValueError, changing nothing, if `layer` is out of range (the message says "layer"), k or v has
        the wrong shape, dtype or device, or the new tokens would not fit (the message says "capacity").
        """
        # TODO: check everything first, then write in place: self.keys[layer, :, :, start:end] = k
        #  Never torch.cat onto the cache: that reallocates and copies the whole cache every step.
        raise NotImplementedError("KVCache.append: write k and v in place at positions seq_len .. seq_len + T - 1")

    def advance(self, num_tokens: int) -> None:
        """Count `num_tokens` more tokens as stored. ValueError (saying "capacity") if that exceeds the capacity."""
        raise NotImplementedError("KVCache.advance: seq_len += num_tokens, within capacity")

    def reset(self) -> None:
        """Forget every stored token, keeping the memory (no reallocation)."""
        raise NotImplementedError("KVCache.reset: set seq_len back to 0")


def kv_cache_bytes(config, batch_size: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes needed to cache keys and values for `batch_size` sequences of `seq_len` tokens.

    `config` is a transformers LlamaConfig: num_hidden_layers, num_attention_heads, num_key_value_heads,
    hidden_size and head_dim (if head_dim is missing or None, it is hidden_size // num_attention_heads).
    Think about what one token costs in one layer: a key and a value for each *key/value* head.
    """
    raise NotImplementedError("kv_cache_bytes: 2 (K and V) x layers x batch x tokens x kv heads x head dim x bytes")


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding of x [B, heads, T, D] at absolute positions [T] (int64). Same shape and dtype.

    Llama pairs dimension i with i + D/2 (not 2i with 2i+1) and rotates the pair by the angle
    position * theta ** (-2i / D), for i in 0 .. D/2 - 1:
        out[..., i]       = x[..., i] * cos - x[..., i + D/2] * sin
        out[..., i + D/2] = x[..., i + D/2] * cos + x[..., i] * sin
    Compute the angles in float32. At decode, the position of the new token is the cache's seq_len, not 0.
    """
    raise NotImplementedError("apply_rope: rotate dimension pairs (i, i + D/2) by position * theta ** (-2i / D)")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal grouped-query attention of the newest T positions over all S positions.

    q [B, H, T, D]: queries of positions S - T .. S - 1. k, v [B, Hkv, S, D]. Returns [B, H, T, D].
    Query head h uses key/value head h // (H // Hkv): consecutive query heads share one kv head.
    Query i (position S - T + i) attends to positions 0 .. S - T + i. Careful: with T < S the causal diagonal is
    at the bottom right, and F.scaled_dot_product_attention(is_causal=True) puts it at the top left.
    Scale scores by 1 / sqrt(D).
    """
    raise NotImplementedError(
        "attention: softmax(q k^T / sqrt(D) + causal mask) v, query head h reading kv head h // G"
    )


def forward(model, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run T new tokens input_ids [B, T] through the decoder, using and extending `cache`. Returns logits [B, T, V].

    The tokens take positions cache.seq_len .. cache.seq_len + T - 1. For each layer:
        q, k, v = model.attention_input(layer, hidden)          # before RoPE
        rotate q and k (apply_rope with the model's own model.rope_theta: 10000 in Llama 2, 500000 in Llama 3),
        append k and v to the cache (at cache.seq_len, whatever it was set to), attend over what the cache returns,
        hidden = model.attention_output(layer, hidden, attended)
        hidden = model.mlp(layer, hidden)
    Start from hidden = model.embed(input_ids); end with cache.advance(T) and model.logits(hidden).
    Works for a prompt (T > 1, empty cache), a chunk of a prompt, and a decode step (T = 1).
    """
    raise NotImplementedError("forward: embed, then per layer attention_input / RoPE / cache / attention / mlp")


def generate(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding. Returns the new tokens, [B, max_new_tokens] int64.

    Make a KVCache with room for the prompt and the new tokens (model.num_layers, model.num_kv_heads,
    model.head_dim, model.dtype, on input_ids.device), prefill the whole prompt with one forward call, then feed one
    token per step: each new token is the argmax of the last position's logits.
    ValueError for input_ids that are not [B, T] integer token ids in the vocabulary on the model's device, for
    max_new_tokens < 1, or for more tokens than model.config.max_position_embeddings.
    """
    raise NotImplementedError("generate: prefill with forward(model, prompt, cache), then one token per step")
