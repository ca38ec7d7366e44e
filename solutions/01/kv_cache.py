"""Exercise 01 reference solution: a preallocated KV cache, cached attention and a greedy decode loop.

Decoding one token needs the keys and values of every earlier token. Recomputing them costs O(n) work per token and
O(n²) per sequence; caching them makes each step O(1) in compute, leaving only the O(n) read of the cache. The cache
is allocated once at full capacity, so appending is an in-place write and never a reallocation.

On a GPU, `generate` records one decode step as a CUDA graph and replays it: a small model's decode step is hundreds
of tiny kernels, and launching them one by one from Python costs more than running them. A graph needs fixed shapes
and addresses, so the replayed step reads its position from a device tensor, writes the cache with `index_copy_`
and attends over the whole capacity with a mask instead of slicing to the current length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """Keys and values of every layer, preallocated: `keys`, `values` are [layers, batch, kv_heads, capacity, head_dim].

    `seq_len` tokens are stored (the same count in every layer once a forward step is done). A forward step appends
    its T new tokens to every layer at positions seq_len .. seq_len + T - 1, then calls `advance(T)` once.
    """

    def __init__(self, num_layers, batch_size, capacity, num_kv_heads, head_dim, dtype=torch.float32, device="cpu"):
        sizes = dict(
            num_layers=num_layers,
            batch_size=batch_size,
            capacity=capacity,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
        )
        for name, size in sizes.items():
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"KVCache: {name} must be a positive int, got {size!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"KVCache: dtype must be a floating-point dtype, got {dtype}")
        shape = (num_layers, batch_size, num_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.seq_len = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, Hkv, T, D] at positions seq_len.. of `layer`; return its keys and values so far (views)."""
        self._check_append(layer, k, v)
        end = self.seq_len + k.shape[2]
        self.keys[layer, :, :, self.seq_len : end] = k
        self.values[layer, :, :, self.seq_len : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Count `num_tokens` more tokens as stored, once every layer has appended them."""
        if not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"KVCache.advance: num_tokens must be a non-negative int, got {num_tokens!r}")
        if self.seq_len + num_tokens > self.capacity:
            raise ValueError(
                f"KVCache.advance: {self.seq_len} stored + {num_tokens} new tokens exceeds capacity {self.capacity}"
            )
        self.seq_len += num_tokens

    def reset(self) -> None:
        """Forget every stored token; keep the memory."""
        self.seq_len = 0

    def _check_append(self, layer, k, v) -> None:
        num_layers, batch, heads, _, head_dim = self.keys.shape
        if not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ValueError(f"KVCache.append: layer must be an int in [0, {num_layers}), got {layer!r}")
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"KVCache.append: {name} must be a tensor, got {type(t).__name__}")
            if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (batch, heads, head_dim):
                raise ValueError(
                    f"KVCache.append: {name} must be [batch={batch}, kv_heads={heads}, T, head_dim={head_dim}], "
                    f"got {list(t.shape)}"
                )
            if t.dtype != self.keys.dtype:
                raise ValueError(f"KVCache.append: {name} has dtype {t.dtype}, the cache holds {self.keys.dtype}")
            if t.device != self.keys.device:
                raise ValueError(f"KVCache.append: {name} is on {t.device}, the cache is on {self.keys.device}")
        if k.shape != v.shape:
            raise ValueError(f"KVCache.append: k {list(k.shape)} and v {list(v.shape)} must have the same shape")
        if self.seq_len + k.shape[2] > self.capacity:
            raise ValueError(
                f"KVCache.append: {self.seq_len} stored + {k.shape[2]} new tokens exceeds capacity {self.capacity}"
            )


def kv_cache_bytes(config, batch_size: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of keys and values for `batch_size` sequences of `seq_len` tokens of the model `config`."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype.itemsize
    return per_token * batch_size * seq_len


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate x [B, heads, T, D] by its absolute positions [T] (Llama's half-split pairing: i with i + D/2)."""
    return _rotate(x, *_rope_tables(positions, x.shape[-1], theta, x.dtype))


def _rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, D] of every position's angles, each half repeated so one multiply covers both halves."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal grouped-query attention of the last T positions over all S.

    q [B, H, T, D] holds the queries of positions S - T .. S - 1; k, v [B, Hkv, S, D]. Query head h reads kv head
    h // (H / Hkv). Returns [B, H, T, D].
    """
    queries, keys = q.shape[2], k.shape[2]
    if queries == 1:
        mask = None  # the newest token sees every cached one
    elif queries == keys:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:  # the causal diagonal sits at the bottom right: query i is position S - T + i
        mask = torch.ones(queries, keys, dtype=torch.bool, device=q.device).tril(diagonal=keys - queries)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def forward(model, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run T new tokens [B, T] through the decoder, using and extending `cache`; return logits [B, T, V]."""
    _check_ids(model, input_ids)
    tokens = input_ids.shape[1]
    positions = torch.arange(cache.seq_len, cache.seq_len + tokens, device=input_ids.device)
    cos, sin = _rope_tables(positions, model.head_dim, model.rope_theta, model.dtype)  # once for all layers
    hidden = model.embed(input_ids)
    for layer in range(model.num_layers):
        q, k, v = model.attention_input(layer, hidden)
        keys, values = cache.append(layer, _rotate(k, cos, sin), v)
        hidden = model.attention_output(layer, hidden, attention(_rotate(q, cos, sin), keys, values))
        hidden = model.mlp(layer, hidden)
    cache.advance(tokens)
    return model.logits(hidden)


def generate(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding: prefill the prompt [B, T], then one token per step. Returns the new tokens [B, N]."""
    _check_ids(model, input_ids)
    if input_ids.min() < 0 or input_ids.max() >= model.vocab_size:
        raise ValueError(f"generate: token ids must lie in [0, {model.vocab_size}), the model's vocabulary")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    batch, prompt_len = input_ids.shape
    capacity = prompt_len + max_new_tokens
    limit = model.config.max_position_embeddings
    if capacity > limit:
        raise ValueError(f"generate: prompt {prompt_len} + {max_new_tokens} new tokens exceeds the model's {limit}")
    cache = KVCache(
        model.num_layers, batch, capacity, model.num_kv_heads, model.head_dim, model.dtype, input_ids.device
    )
    out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=input_ids.device)
    out[:, 0] = forward(model, input_ids, cache)[:, -1].argmax(-1)
    if input_ids.is_cuda and max_new_tokens > 2:
        _decode_with_graph(model, cache, out)
    else:
        for step in range(1, max_new_tokens):
            out[:, step] = forward(model, out[:, step - 1 : step], cache)[:, -1].argmax(-1)
    return out


def _decode_with_graph(model, cache: KVCache, out: torch.Tensor) -> None:
    """Decode out[:, 1:] by replaying one CUDA-graphed step. The step's inputs live in fixed device tensors."""
    prompt_len = cache.seq_len
    position = torch.tensor(prompt_len, device=out.device)  # position of the token being fed
    slots = torch.arange(cache.capacity, device=out.device)
    tables = _rope_tables(slots, model.head_dim, model.rope_theta, model.dtype)  # every position, computed once

    def step():
        token = out.index_select(1, (position - prompt_len).view(1))  # [B, 1], the last token produced
        logits = _graph_step(model, cache, token, position, slots, tables)
        out.index_copy_(1, (position - prompt_len + 1).view(1), logits[:, -1].argmax(-1, keepdim=True))
        position.add_(1)

    # One eager step on a side stream warms up cuBLAS and the allocator before capture, and is a real step.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()  # recorded, not run
    for _ in range(out.shape[1] - 2):
        graph.replay()
    cache.seq_len = prompt_len + out.shape[1] - 1


def _graph_step(model, cache: KVCache, token, position, slots, tables) -> torch.Tensor:
    """One decode step with no Python ints that change between steps: safe to capture in a CUDA graph.

    Fewer, larger kernels than `forward`: every kernel in a graph still costs a few microseconds, and a decode step
    of a small model is hundreds of them. RoPE rotates q and k in one pass (they are adjacent heads of the fused
    projection) and the mask is built once per step, not once per layer.
    """
    positions = position.view(1)
    cos, sin = (table.index_select(0, positions) for table in tables)
    hidden_mask = torch.where(slots <= position, 0.0, float("-inf")).to(model.dtype)  # [capacity]
    heads, kv_heads, dim = model.num_heads, model.num_kv_heads, model.head_dim
    batch = token.shape[0]
    hidden = model.embed(token)
    for layer in range(model.num_layers):
        q, k, v = model.attention_input(layer, hidden)
        # q and k are adjacent heads of one projection output: one strided view covers both.
        q, k = _rotate(q.as_strided((batch, heads + kv_heads, 1, dim), q.stride()), cos, sin).split(
            [heads, kv_heads], dim=1
        )
        keys, values = cache.keys[layer], cache.values[layer]
        keys.index_copy_(2, positions, k)
        values.index_copy_(2, positions, v)
        # Grouped queries as rows of one matrix per kv head: query head h = kv head h // G, no copy of the keys.
        grouped = q.reshape(batch, kv_heads, heads // kv_heads, dim) * dim**-0.5
        scores = torch.baddbmm(
            hidden_mask.expand(batch * kv_heads, heads // kv_heads, -1),
            grouped.flatten(0, 1),
            keys.flatten(0, 1).transpose(-1, -2),
        )
        probs = scores.softmax(-1)
        attended = (probs @ values.flatten(0, 1)).view(batch, heads, 1, dim)
        hidden = model.attention_output(layer, hidden, attended)
        hidden = model.mlp(layer, hidden)
    return model.logits(hidden)


def _check_ids(model, input_ids) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        shape = list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a [batch, tokens] tensor with at least one token, got {shape}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must hold integer token ids (int64), got {input_ids.dtype}")
    if input_ids.device != model.device:
        raise ValueError(f"input_ids are on {input_ids.device}, the model is on {model.device}")
