"""Exercise 02: paged KV blocks and prefix caching (the memory half of PagedAttention).

Exercise 01 gave every sequence one buffer at full capacity: most of it sits empty, and a server that reserves the
longest possible answer for every request runs out of memory long before it runs out of compute. A serving engine
instead carves the KV cache into fixed-size *blocks* of `block_size` tokens and gives each sequence a *block table*:
the list of block ids that hold its tokens, in order, wherever they sit in the pool. Memory is then taken one block
at a time as a sequence grows, and returned the moment it finishes.

Blocks can be shared. Two samples of one prompt (`fork`) share every block by reference count, and copy only the
last, partly written block when one of them writes to it (copy-on-write). And requests that start with the same
tokens — a system prompt, a few-shot preamble, a chat history — can reuse each other's KV: every *full* block gets a
hash chained over all tokens before it, a table maps hashes to blocks, and a new request takes its longest cached
prefix instead of recomputing it (prefix caching). A freed block keeps its hash in the free queue until the block is
handed out again (lazy eviction), so cached prefixes survive as long as memory allows.

You build:
  1. `block_hash`: the chained hash of one full block.
  2. `FreeBlockQueue`: a doubly linked list of free blocks, every operation O(1).
  3. `BlockManager`: allocate, append, fork and free, with reference counts, prefix caching and eviction.

Run `pytest exercises/02` to check your work. The README draws one scenario step by step.
"""

from __future__ import annotations

import hashlib  # noqa: F401  (block_hash wants hashlib.sha256)
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

ROOT_HASH = b"inferlab-02-root"  # stands in for the parent hash of a sequence's first block


class OutOfBlocks(Exception):
    """The pool cannot hold what was asked for. Raised before anything changes: the manager is left as it was."""


def block_hash(parent_hash: bytes | None, token_ids: Sequence[int], extra_key: str | None = None) -> bytes:
    """The hash of one full block: a digest of bytes (at least 16 bytes long, e.g. hashlib.sha256(...).digest()).

    parent_hash: the previous block's hash, or None for a sequence's first block (use ROOT_HASH in its place).
    token_ids: the block's token ids (non-negative ints). extra_key: anything else that changes the KV of equal tokens
    (a cache salt, a LoRA adapter's name), or None.

    Equal inputs give equal hashes in every process: Python's hash() of a str is salted per process (PYTHONHASHSEED),
    so never use it. Different inputs give different hashes: the same tokens under another parent (another
    position, or another prefix), another extra key, or token lists that differ only in how their digits split ([1, 23]
    and [12, 3]: encode each id at a fixed width, e.g. 8 bytes little-endian).
    """
    raise NotImplementedError(
        "block_hash: sha256 over parent (or ROOT_HASH) + each token id as 8 bytes + the extra key's bytes; .digest()"
    )


@dataclass(eq=False, slots=True)
class KVBlock:
    """One block of the pool. `prev_free` / `next_free` link it into the free queue (None while it is not in it)."""

    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set while the block holds a full, cached block of tokens
    prev_free: KVBlock | None = field(default=None, repr=False)
    next_free: KVBlock | None = field(default=None, repr=False)


class FreeBlockQueue:
    """The free blocks, in eviction order: the front is handed out (and evicted) next, the back was freed last.

    A doubly linked list through the blocks' own `prev_free` / `next_free` fields: `popleft`, `append`,
    `appendleft` and `remove` are each O(1), whatever the pool's size. (A Python list's `pop(0)` or `remove(block)`
    walks or shifts the whole list: with a million blocks that is a million steps per allocation.) Tip: two sentinel
    blocks at the ends make linking and unlinking free of special cases.
    """

    def __init__(self, blocks: Sequence[KVBlock]):
        """A queue holding `blocks` in the given order (front first)."""
        # TODO: sentinels, then append every block.
        raise NotImplementedError("FreeBlockQueue.__init__: link the blocks into a doubly linked list, front first")

    def __len__(self) -> int:
        """How many blocks are in the queue, in O(1) (keep a count)."""
        raise NotImplementedError("FreeBlockQueue.__len__: keep a count as blocks are linked and unlinked")

    def popleft(self) -> KVBlock:
        """Unlink and return the front block. OutOfBlocks if the queue is empty."""
        raise NotImplementedError("FreeBlockQueue.popleft: unlink the block after the head sentinel")

    def append(self, block: KVBlock) -> None:
        """Link `block` at the back. ValueError if it is already in the queue."""
        raise NotImplementedError("FreeBlockQueue.append: link the block before the tail sentinel")

    def appendleft(self, block: KVBlock) -> None:
        """Link `block` at the front. ValueError if it is already in the queue."""
        raise NotImplementedError("FreeBlockQueue.appendleft: link the block after the head sentinel")

    def remove(self, block: KVBlock) -> None:
        """Unlink `block` from wherever it is, in O(1). ValueError if it is not in the queue."""
        raise NotImplementedError("FreeBlockQueue.remove: join its neighbours to each other, clear its links")

    def block_ids(self) -> list[int]:
        """The ids of the queued blocks, front to back (O(n): for inspection and tests, not for the hot path)."""
        raise NotImplementedError("FreeBlockQueue.block_ids: walk from the head sentinel")


class BlockManager:
    """Hands out `num_blocks` blocks of `block_size` tokens to sequences, by reference count, with prefix caching.

    At the start every block is free and the free queue holds blocks 0, 1, ..., num_blocks - 1 in that order.
    A sequence is known by its id (any hashable: an int, a str) from `allocate` (or `fork`) until `free`.
    Every method that gets bad input raises ValueError with a message naming the problem (an unknown or duplicate
    sequence id, a token id that is not a non-negative int) and changes nothing; OutOfBlocks likewise changes nothing.

    Attributes: num_blocks, block_size, enable_prefix_caching (as given), and prefix_cache_queries and
    prefix_cache_hits, two int counters that start at 0 (see hit_rate).

    Invariants, after every call: a block is either referenced (ref_count = the number of block tables holding it)
    or in the free queue (ref_count 0), never both; the free blocks plus the referenced blocks are all num_blocks;
    a block has a hash only if it holds a full block of tokens whose chained hash that is; at most one block holds
    each hash.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        """ValueError (naming the argument) unless num_blocks and block_size are positive ints."""
        # TODO: make the blocks, the free queue over all of them, the hash -> block table, the sequences' state
        #  (token ids, blocks, chained hashes, extra key) and the two hit counters.
        raise NotImplementedError("BlockManager.__init__: blocks 0..num_blocks-1, all in a FreeBlockQueue")

    # --- reading the state ------------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks in the free queue (cached ones included: they can be evicted whenever a block is needed)."""
        raise NotImplementedError("BlockManager.num_free_blocks: the free queue's length")

    @property
    def usage(self) -> float:
        """Fraction of the pool referenced by sequences: 1 - num_free_blocks / num_blocks."""
        raise NotImplementedError("BlockManager.usage: 1 - free / total")

    @property
    def hit_rate(self) -> float:
        """prefix_cache_hits / prefix_cache_queries, or 0.0 before any query.

        The counters count tokens over successful allocations only: prefix_cache_queries += len(token_ids) and
        prefix_cache_hits += the cached tokens that `allocate` returned.
        """
        raise NotImplementedError("BlockManager.hit_rate: hits / queries, 0.0 when there were none")

    def block_table(self, seq_id: Hashable) -> list[int]:
        """The sequence's block ids, in token order (a new list: changing it changes nothing)."""
        raise NotImplementedError("BlockManager.block_table: the ids of the sequence's blocks")

    def slot_mapping(self, seq_id: Hashable) -> list[int]:
        """Where each token's KV lives: token i -> block_table[i // block_size] * block_size + i % block_size."""
        raise NotImplementedError("BlockManager.slot_mapping: one slot per token of the sequence")

    def ref_count(self, block_id: int) -> int:
        """How many block tables hold the block. ValueError for an id outside 0 .. num_blocks - 1."""
        raise NotImplementedError("BlockManager.ref_count: the block's reference count")

    def cached_hash(self, block_id: int) -> bytes | None:
        """The hash the block is cached under, or None. ValueError for an id outside 0 .. num_blocks - 1."""
        raise NotImplementedError("BlockManager.cached_hash: the block's hash, None if it holds no cached block")

    def free_block_ids(self) -> list[int]:
        """The free queue's block ids, front (next to be handed out) to back."""
        raise NotImplementedError("BlockManager.free_block_ids: the free queue, front to back")

    # --- changing it ------------------------------------------------------------------------------------------------

    def allocate(
        self, seq_id: Hashable, token_ids: Sequence[int], extra_key: str | None = None
    ) -> tuple[list[int], int]:
        """Blocks for a new sequence's prompt. Returns (its block table, how many prompt tokens were found cached).

        With prefix caching, hash the prompt's full blocks (chained; a partial last block is never hashed) and walk
        them from the first: take every cached block until the first miss, but never the whole prompt — at most
        (len(token_ids) - 1) // block_size blocks, so at least one token is left to compute (its logits are needed).
        The cached tokens returned are the hit blocks times block_size.

        All or nothing: the new blocks plus the hits that sit in the free queue (taking them out costs a free block
        too) must fit in the free queue, or OutOfBlocks is raised and nothing changes: no block taken, no ref_count
        or counter moved. Hits get ref_count + 1 (leaving the free queue if they were in it). New blocks come off the
        front of the free queue; a block that still has a hash is evicted first: its hash is dropped from the table.
        Each new full block is then cached under its hash, unless another block already holds that hash.
        ValueError for a seq_id already allocated, an empty or non-int token list, or an extra_key that is not a str.
        """
        # TODO: validate; hash the full blocks; find the hits; check room; then (and only then) change state.
        raise NotImplementedError("BlockManager.allocate: hits from the cache, then new blocks from the free queue")

    def append_token(self, seq_id: Hashable, token_id: int) -> tuple[int, int] | None:
        """Add one generated token to a sequence. Returns None, or (source, destination) block ids of a copy.

        A new block is taken (off the front of the free queue, evicting as in allocate) only when the token starts
        a block: its position is a multiple of block_size. Otherwise the token goes into the last block, but if that
        block is shared (ref_count > 1, after a fork) it is first copied: the sequence takes a new block in its place,
        the shared block loses one reference, and (source id, new id) is returned so the engine can copy the KV.
        When the token fills its block, the block is hashed (chained, with the sequence's extra key) and cached,
        so a later prompt can hit it. OutOfBlocks (changing nothing) if a block is needed and none is free.
        """
        raise NotImplementedError("BlockManager.append_token: a new block on a boundary, copy-on-write if shared")

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """A new sequence `child_id` sharing every block of `parent_id` (ref_count + 1 each) and its tokens.

        Takes no block. ValueError for an unknown parent or a child id already in use.
        """
        raise NotImplementedError("BlockManager.fork: the child's table is the parent's; every block gains a reference")

    def free(self, seq_id: Hashable) -> None:
        """The sequence is finished: release its blocks and forget it.

        Blocks are released tail first (last block of the table first), each losing one reference. One whose
        ref_count reaches 0 joins the free queue: at the back if it holds a cached hash (it keeps the hash, and
        cached blocks are evicted least recently freed first), at the front if it holds none (nothing to keep).
        Tail first means a cached prefix's head outlives its tail: the head is what other prompts share most.
        ValueError for an unknown sequence, or one already freed (a double free would release the blocks twice).
        """
        raise NotImplementedError("BlockManager.free: tail first; cached blocks to the back, others to the front")

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash (e.g. after new weights are loaded). Refuses, returning False and changing nothing,
        while any block is referenced; returns True once done. The free queue's order is kept.
        """
        raise NotImplementedError("BlockManager.reset_prefix_cache: only when every block is free")
