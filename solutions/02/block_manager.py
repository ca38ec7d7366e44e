"""Exercise 02 reference: paged KV blocks with reference counts and prefix caching.

The pool is a fixed array of blocks. A block is in exactly one of two places: referenced by one or more sequences'
block tables (ref_count > 0), or in the free queue (ref_count == 0). A free block may still hold a cached hash: its
KV is valid until the block is handed out again, so a later request with the same prefix can take it back out of the
queue instead of recomputing it. Eviction is lazy: a hash is dropped only when its block is reused.

The free queue is a doubly linked list threaded through the blocks themselves (each block has prev/next links), so
popping the front, appending at the back and unlinking a cache hit from the middle are each O(1) — a Python list's
`pop(0)` or `remove` would walk or shift the whole pool on every allocation.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

ROOT_HASH = b"inferlab-02-root"  # the parent of a sequence's first block


class OutOfBlocks(Exception):
    """The pool cannot hold what was asked for. Nothing was changed."""


def block_hash(parent_hash: bytes | None, token_ids: Sequence[int], extra_key: str | None = None) -> bytes:
    """sha256 over the parent's hash, the block's token ids (8 bytes each, little-endian on the usual machines)
    and the extra key: a 32-byte digest.

    Fixed-width token encoding: [1, 23] and [12, 3] must never meet as the same bytes.
    """
    if not isinstance(token_ids, array):
        token_ids = array("Q", token_ids)
    data = (parent_hash if parent_hash is not None else ROOT_HASH) + token_ids.tobytes()
    if extra_key is not None:
        data += b"\x00extra\x00" + extra_key.encode()
    return hashlib.sha256(data).digest()


@dataclass(eq=False, slots=True)
class KVBlock:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set while the block holds a full, cached block of tokens
    prev_free: KVBlock | None = field(default=None, repr=False)
    next_free: KVBlock | None = field(default=None, repr=False)


class FreeBlockQueue:
    """Doubly linked list of free blocks: front = next to be handed out (and evicted), back = most recently freed."""

    def __init__(self, blocks: Sequence[KVBlock]):
        # Two sentinels, so that linking and unlinking never test for an empty list or an end.
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def popleft(self) -> KVBlock:
        head = self._head
        block = head.next_free
        if block is self._tail:
            raise OutOfBlocks("the free queue is empty")
        head.next_free = block.next_free  # unlinked in place: this runs once per block handed out
        block.next_free.prev_free = head
        block.prev_free = block.next_free = None
        self._len -= 1
        return block

    def append(self, block: KVBlock) -> None:
        if block.prev_free is not None:
            raise ValueError(f"block {block.block_id} is already in the free queue")
        tail = self._tail
        last = tail.prev_free
        block.prev_free, block.next_free = last, tail
        last.next_free = tail.prev_free = block
        self._len += 1

    def appendleft(self, block: KVBlock) -> None:
        self._link(block, self._head, self._head.next_free)

    def remove(self, block: KVBlock) -> None:
        if block.prev_free is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        block.prev_free.next_free, block.next_free.prev_free = block.next_free, block.prev_free
        block.prev_free = block.next_free = None
        self._len -= 1

    def block_ids(self) -> list[int]:
        ids, block = [], self._head.next_free
        while block is not self._tail:
            ids.append(block.block_id)
            block = block.next_free
        return ids

    def _link(self, block: KVBlock, before: KVBlock, after: KVBlock) -> None:
        if block.prev_free is not None:
            raise ValueError(f"block {block.block_id} is already in the free queue")
        block.prev_free, block.next_free = before, after
        before.next_free = after.prev_free = block
        self._len += 1


@dataclass(slots=True)
class _Sequence:
    token_ids: array  # unsigned 64-bit
    blocks: list[KVBlock]
    hashes: list[bytes]  # chain hash of each full logical block, whether or not its physical block is cached
    extra_key: str | None


class BlockManager:
    """Hands out fixed-size KV blocks to sequences, shares them by reference count, and caches full blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[bytes, KVBlock] = {}
        self.seqs: dict[Hashable, _Sequence] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # --- reading the state ------------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_queue) / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def block_table(self, seq_id: Hashable) -> list[int]:
        return [block.block_id for block in self._seq(seq_id).blocks]

    def slot_mapping(self, seq_id: Hashable) -> list[int]:
        seq, size = self._seq(seq_id), self.block_size
        return [seq.blocks[i // size].block_id * size + i % size for i in range(len(seq.token_ids))]

    def ref_count(self, block_id: int) -> int:
        return self._block(block_id).ref_count

    def cached_hash(self, block_id: int) -> bytes | None:
        return self._block(block_id).hash

    def free_block_ids(self) -> list[int]:
        return self.free_queue.block_ids()

    # --- changing it ------------------------------------------------------------------------------------------------

    def allocate(
        self, seq_id: Hashable, token_ids: Sequence[int], extra_key: str | None = None
    ) -> tuple[list[int], int]:
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id!r} already has blocks: free it first, or use another id")
        tokens = _token_array(token_ids)
        if not tokens:
            raise ValueError("token_ids must hold at least one token")
        if extra_key is not None and not isinstance(extra_key, str):
            raise ValueError(f"extra_key must be a str or None, got {type(extra_key).__name__}")
        size = self.block_size
        hashes = self._chain(tokens, extra_key, parent=None, start=0)
        hits = self._longest_cached_prefix(hashes, max_blocks=(len(tokens) - 1) // size)
        num_new = -(-len(tokens) // size) - len(hits)
        # A hit that sits in the free queue leaves it: it costs a free block just like a new one.
        needed = num_new + sum(block.ref_count == 0 for block in hits) if hits else num_new
        if needed > len(self.free_queue):
            raise OutOfBlocks(
                f"sequence {seq_id!r} needs {needed} free blocks ({num_new} new, {needed - num_new} cached but "
                f"free), the pool has {len(self.free_queue)}"
            )
        for block in hits:
            if block.ref_count == 0:
                self.free_queue.remove(block)
            block.ref_count += 1
        take = self._take_free_block
        blocks = hits + [take() for _ in range(num_new)]
        if self.enable_prefix_caching:
            for block, block_hash_ in zip(blocks[len(hits) :], hashes[len(hits) :], strict=False):
                self._cache(block, block_hash_)
        self.seqs[seq_id] = _Sequence(tokens, blocks, hashes, extra_key)
        self.prefix_cache_queries += len(tokens)
        self.prefix_cache_hits += len(hits) * size
        return [block.block_id for block in blocks], len(hits) * size

    def append_token(self, seq_id: Hashable, token_id: int) -> tuple[int, int] | None:
        seq = self._seq(seq_id)
        token = _token(token_id)
        size, position = self.block_size, len(seq.token_ids)
        copy = None
        if position % size == 0:
            if not self.free_queue:
                raise OutOfBlocks(f"sequence {seq_id!r} needs a new block at token {position}; none is free")
            seq.blocks.append(self._take_free_block())
        elif seq.blocks[-1].ref_count > 1:  # shared by a fork: writing in place would change the other sequence
            if not self.free_queue:
                raise OutOfBlocks(f"sequence {seq_id!r} must copy its shared last block; no block is free")
            source = seq.blocks[-1]
            source.ref_count -= 1
            seq.blocks[-1] = self._take_free_block()
            copy = (source.block_id, seq.blocks[-1].block_id)
        seq.token_ids.append(token)
        if (position + 1) % size == 0 and self.enable_prefix_caching:  # a block just filled: cache it
            parent = seq.hashes[-1] if seq.hashes else None
            seq.hashes += self._chain(seq.token_ids, seq.extra_key, parent=parent, start=position + 1 - size)
            self._cache(seq.blocks[-1], seq.hashes[-1])
        return copy

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        parent = self._seq(parent_id)
        if child_id in self.seqs:
            raise ValueError(f"sequence {child_id!r} already has blocks: fork into a new id")
        for block in parent.blocks:
            block.ref_count += 1
        self.seqs[child_id] = _Sequence(array("Q", parent.token_ids), list(parent.blocks), list(parent.hashes),
                                        parent.extra_key)  # fmt: skip

    def free(self, seq_id: Hashable) -> None:
        seq = self._seq(seq_id)
        del self.seqs[seq_id]
        queue = self.free_queue
        for block in reversed(seq.blocks):  # tail first: a chain's head is evicted last, as it is the most shared
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    queue.append(block)  # still cached: evicted least recently freed first
                else:
                    queue.appendleft(block)  # holds nothing reusable: hand it out first

    def reset_prefix_cache(self) -> bool:
        if len(self.free_queue) != self.num_blocks:
            return False
        for block in self.cached.values():
            block.hash = None
        self.cached.clear()
        return True

    # --- inside -----------------------------------------------------------------------------------------------------

    def _chain(self, tokens: array, extra_key, parent: bytes | None, start: int) -> list[bytes]:
        """Hashes of the full blocks of tokens[start:], chained from `parent` (empty without prefix caching)."""
        if not self.enable_prefix_caching:
            return []
        hashes, size = [], self.block_size
        for begin in range(start, len(tokens) - size + 1, size):
            parent = block_hash(parent, tokens[begin : begin + size], extra_key)  # an array slice: no conversion
            hashes.append(parent)
        return hashes

    def _longest_cached_prefix(self, hashes: list[bytes], max_blocks: int) -> list[KVBlock]:
        hits = []
        for block_hash_ in hashes[:max_blocks]:
            block = self.cached.get(block_hash_)
            if block is None:
                break
            hits.append(block)
        return hits

    def _take_free_block(self) -> KVBlock:
        block = self.free_queue.popleft()
        if block.hash is not None:  # lazy eviction: its KV is about to be overwritten
            del self.cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return block

    def _cache(self, block: KVBlock, block_hash_: bytes) -> None:
        # One physical block per hash: a second block with the same content stays uncached (a duplicate).
        if self.enable_prefix_caching and block_hash_ not in self.cached:
            block.hash = block_hash_
            self.cached[block_hash_] = block

    def _seq(self, seq_id: Hashable) -> _Sequence:
        try:
            return self.seqs[seq_id]
        except (KeyError, TypeError):
            raise ValueError(f"unknown sequence {seq_id!r} (never allocated, or already freed)") from None

    def _block(self, block_id: int) -> KVBlock:
        if not _is_int(block_id) or not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id must be an int in 0 .. {self.num_blocks - 1}, got {block_id!r}")
        return self.blocks[block_id]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token(value) -> int:
    return _token_array([value])[0]


def _token_array(token_ids) -> array:
    """The token ids as unsigned 64-bit ints, converted and range-checked at C speed (a negative id overflows)."""
    if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Iterable):
        raise ValueError(f"token_ids must be a sequence of ints, got {type(token_ids).__name__}")
    try:
        return array("Q", token_ids)
    except (TypeError, OverflowError) as exc:
        raise ValueError(f"token ids must be non-negative ints below 2**64: {exc}") from None
