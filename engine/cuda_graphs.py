"""CUDA graphs of decode-only steps, one per batch-size bucket, captured on first use (CUDA only).

A decode step of a small model is hundreds of small kernels; launched one by one from Python, the launches cost
more than the work. A CUDA graph records the whole step once and replays it with one launch. A graph has fixed
shapes and addresses, so a step of n decodes runs the graph of the smallest bucket >= n, with its inputs copied into
static buffers: token ids, positions, slots, block tables and context lengths. The rows past n are padding: they
read and write only the scratch block (the pool's extra last block, never handed out) with a context of one token,
and their logits are dropped. Attention is exercise 06's kernel, called with `max_context_len` = the table's full
width, so that it neither reads lengths back to the host (impossible inside a graph) nor changes its launch from
step to step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class DecodeGraphs:
    def __init__(self, runner):
        self.runner = runner
        self.max_batch = runner.max_num_seqs
        self.buckets = sorted({b for b in BUCKETS if b < self.max_batch} | {self.max_batch})
        device, rows, width = runner.device, self.max_batch, runner.max_blocks_per_seq
        self.scratch_slot = runner.scratch_block * runner.block_size
        # static device inputs, and pinned host copies filled on the host then copied in one go each
        self.ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slots = torch.full((rows,), self.scratch_slot, dtype=torch.long, device=device)
        self.lens = torch.ones(rows, dtype=torch.int32, device=device)
        self.tables = torch.full((rows, width), runner.scratch_block, dtype=torch.int32, device=device)
        self.host_vectors = torch.zeros((4, rows), dtype=torch.long).pin_memory()  # ids, positions, slots, lens
        self.host_tables = torch.full((rows, width), runner.scratch_block, dtype=torch.int32).pin_memory()
        self.host_vectors_np, self.host_tables_np = self.host_vectors.numpy(), self.host_tables.numpy()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def run(self, decodes) -> torch.Tensor:
        """Logits [len(decodes), vocab] (the graph's own buffer: read it before the next step)."""
        n = len(decodes)
        bucket = next(b for b in self.buckets if b >= n)
        runner, size = self.runner, self.runner.block_size
        vectors, tables = self.host_vectors_np, self.host_tables_np  # numpy views: fast writes from lists
        ids, positions, slots, lens = vectors
        for i, s in enumerate(decodes):
            start = s.start
            ids[i], positions[i], lens[i] = s.token_ids[0], start, start + 1
            slots[i] = s.block_table[start // size] * size + start % size
            used = start // size + 1
            tables[i, :used] = s.block_table[:used]
        ids[n:bucket], positions[n:bucket] = 0, 0  # padding rows: the scratch block, one token of context
        slots[n:bucket], lens[n:bucket] = self.scratch_slot, 1
        tables[n:bucket, 0] = runner.scratch_block
        vectors = self.host_vectors
        tables = self.host_tables
        self.ids[:bucket].copy_(vectors[0, :bucket], non_blocking=True)
        self.positions[:bucket].copy_(vectors[1, :bucket], non_blocking=True)
        self.slots[:bucket].copy_(vectors[2, :bucket], non_blocking=True)
        self.lens[:bucket].copy_(vectors[3, :bucket], non_blocking=True)
        self.tables[:bucket].copy_(tables[:bucket], non_blocking=True)
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket)
        graph, logits = self.graphs[bucket]
        graph.replay()
        torch.cuda.current_stream().synchronize()  # the pinned host buffers are refilled by the next step
        return logits[:n]

    def _capture(self, bucket: int):
        def step():
            return decode_step(self.runner, self.ids[:bucket], self.positions[:bucket], self.slots[:bucket],
                               self.tables[:bucket], self.lens[:bucket])  # fmt: skip

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS picks its kernels, outside the capture
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = step()
        self.pool = graph.pool()
        return graph, logits


def decode_step(runner, ids, positions, slots, tables, lens) -> torch.Tensor:
    """One decode token per row, with no host values that change between steps: logits [rows, vocab]."""
    capacity = tables.shape[1] * runner.block_size
    kernel = runner.parts.paged_attention.paged_attention_decode
    cos, sin = runner.cos[positions], runner.sin[positions]
    hidden = F.embedding(ids, runner.embedding)
    kv_heads, dim = runner.num_kv_heads, runner.head_dim
    for index, layer in enumerate(runner.layers):
        q, k, v = runner._qkv(layer, hidden, cos, sin)
        k_pool, v_pool = runner.k_cache[index], runner.v_cache[index]
        k_pool.view(-1, kv_heads, dim).index_copy_(0, slots, k)
        v_pool.view(-1, kv_heads, dim).index_copy_(0, slots, v)
        attended = kernel(q.contiguous(), k_pool, v_pool, tables, lens, runner.scale, max_context_len=capacity)
        hidden = runner._finish_layer(layer, hidden, attended)
    return runner._logits(hidden)
