# ruff: noqa: E501  (mutants are data: one replacement per line reads best)
"""Exercise 02 mutants: the reference block manager with one mistake each, as students make them."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mutation import Mutant  # noqa: E402

F = "block_manager.py"
PYTEST_ARGS = ("-k", "not cost")  # the host-clock speed tests run only for the mutant that needs them

MUTANTS = [
    Mutant("unchained hashes: the parent is left out", F,
           "data = (parent_hash if parent_hash is not None else ROOT_HASH) + token_ids.tobytes()",
           "data = ROOT_HASH + token_ids.tobytes()", "unchained"),
    Mutant("hash() of a str: salted per process", F,
           "    return hashlib.sha256(data).digest()",
           "    return hashlib.sha256(data + str(hash(str(extra_key))).encode()).digest()", "salted per process"),
    Mutant("token ids joined as digits", F,
           "    data = (parent_hash if parent_hash is not None else ROOT_HASH) + token_ids.tobytes()",
           "    data = (parent_hash or ROOT_HASH) + ''.join(map(str, token_ids)).encode()", "fixed width"),
    Mutant("extra key ignored", F,
           '        data += b"\\x00extra\\x00" + extra_key.encode()', "        pass", "extra key"),
    Mutant("a partial block is hashed and cached", F,
           "        for begin in range(start, len(tokens) - size + 1, size):",
           "        for begin in range(start, len(tokens), size):", "partial block"),
    Mutant("a hit may cover the whole prompt", F,
           "max_blocks=(len(tokens) - 1) // size)", "max_blocks=len(tokens) // size)", "whole prompt"),
    Mutant("hits in the free queue not charged against the room", F,
           "        needed = num_new + sum(block.ref_count == 0 for block in hits)", "        needed = num_new",
           "count against the room"),
    Mutant("a refused allocation leaks the hits it took", F,
           "        if needed > len(self.free_queue):\n            raise OutOfBlocks(",
           "        for block in hits:\n            block.ref_count += 1\n"
           "        if needed > len(self.free_queue):\n            raise OutOfBlocks(", "must change nothing"),
    Mutant("an evicted block keeps its hash", F,
           "        if block.hash is not None:  # lazy eviction: its KV is about to be overwritten\n"
           "            del self.cached[block.hash]\n            block.hash = None\n",
           "", "evicted block kept its hash"),
    Mutant("head-first freeing", F,
           "        for block in reversed(seq.blocks):  # tail first", "        for block in seq.blocks:  # head first",
           "head first"),
    Mutant("the most recently freed cached block is evicted first", F,
           "                    queue.append(block)  # still cached",
           "                    queue.appendleft(block)  # still cached", "most recently freed"),
    Mutant("every freed block goes to the back", F,
           "                    queue.appendleft(block)  # holds nothing reusable",
           "                    queue.append(block)  # holds nothing reusable", "uncached ones belong at the front"),
    Mutant("fork without reference counts", F,
           "        for block in parent.blocks:\n            block.ref_count += 1\n", "", "fork without reference counts"),
    Mutant("a double free is accepted", F,
           "    def free(self, seq_id: Hashable) -> None:\n",
           "    def free(self, seq_id: Hashable) -> None:\n        if seq_id not in self.seqs:\n            return\n",
           "double free"),
    Mutant("no copy-on-write of a shared last block", F,
           "        elif seq.blocks[-1].ref_count > 1:", "        elif False:", "copy"),
    Mutant("a block filled while decoding is never cached", F,
           "            self._cache(seq.blocks[-1], seq.hashes[-1])", "            pass", "decoding"),
    Mutant("slots assume contiguous blocks", F,
           "[seq.blocks[i // size].block_id * size + i % size for i in range(len(seq.token_ids))]",
           "[seq.blocks[0].block_id * size + i for i in range(len(seq.token_ids))]", "contiguous"),
    Mutant("negative token ids accepted", F,
           '        return array("Q", token_ids)', '        return array("q", token_ids)', "negative token"),
    Mutant("counters moved by a refused allocation", F,
           "        num_new = -(-len(tokens) // size) - len(hits)\n",
           "        num_new = -(-len(tokens) // size) - len(hits)\n        self.prefix_cache_queries += len(tokens)\n",
           "must change nothing"),
    Mutant("reset_prefix_cache while blocks are in use", F,
           "        if len(self.free_queue) != self.num_blocks:\n            return False\n", "",
           "refuse"),
    Mutant("removing a cache hit walks the free queue (O(n))", F,
           "        if block.prev_free is None:\n            raise ValueError(f\"block {block.block_id} is not in",
           "        walk = self._head\n        while walk is not block and walk is not None:\n"
           "            walk = walk.next_free\n"
           "        if block.prev_free is None:\n            raise ValueError(f\"block {block.block_id} is not in",
           "doubly linked free queue", pytest_args=("-k", "cost")),
    Mutant("new blocks taken one token too late", F,
           "        if position % size == 0:\n            if not self.free_queue:",
           "        if position % size == 0 and position > len(seq.blocks) * size:\n            if not self.free_queue:",
           "boundary"),
    Mutant("usage counts the free blocks", F,
           "        return 1.0 - len(self.free_queue) / self.num_blocks", "        return len(self.free_queue) / self.num_blocks",
           "usage"),
    Mutant("a block filled during decode is hashed even with prefix caching off", F,
           "        if (position + 1) % size == 0 and self.enable_prefix_caching:  # a block just filled: cache it",
           "        if (position + 1) % size == 0:", "without_prefix_caching_decode"),
]
