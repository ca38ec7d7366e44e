"""Exercise 02 specification: paged KV blocks with reference counts, prefix caching and lazy eviction.

Scenarios small enough to follow by hand (the README draws the first ones), each catching one named mistake; bad
input that must change nothing; a hypothesis state machine that checks the invariants after every random step; and,
on the host clock, that the allocator's cost does not grow with the pool. Everything runs on the CPU.
"""

import os
import subprocess
import sys
from collections import deque

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fixtures.checks import expect_error


@pytest.fixture
def bm(impl):
    return impl("block_manager")


def pool(bm, num_blocks=8, block_size=4, caching=True):
    return bm.BlockManager(num_blocks, block_size, enable_prefix_caching=caching)


def tokens(start, count):
    """`count` distinct token ids starting at `start`: prompts that share nothing unless a test says so."""
    return list(range(start, start + count))


def state(manager, seq_ids=()):
    """Everything a caller can observe, to check that a refused call changed nothing."""
    ids = range(manager.num_blocks)
    return dict(
        free_queue=manager.free_block_ids(),
        ref_counts=[manager.ref_count(b) for b in ids],
        hashes=[manager.cached_hash(b) for b in ids],
        tables={s: manager.block_table(s) for s in seq_ids},
        slots={s: manager.slot_mapping(s) for s in seq_ids},
        counters=(manager.prefix_cache_queries, manager.prefix_cache_hits),
    )


def assert_unchanged(before, after, what):
    changed = [key for key in before if before[key] != after[key]]
    assert not changed, (
        f"{what} must change nothing, but it changed {', '.join(changed)}: "
        + "; ".join(f"{k} was {before[k]}, now {after[k]}" for k in changed)
    )


# --- block_hash: one full block, chained over everything before it ---------------------------------------------------


def test_hash_is_a_digest_of_bytes(bm):
    digest = bm.block_hash(None, [1, 2, 3, 4])
    assert isinstance(digest, bytes) and len(digest) >= 16, (
        f"block_hash must return a digest of at least 16 bytes (e.g. hashlib.sha256(...).digest()), got "
        f"{type(digest).__name__} {digest!r:.60}: a short hash collides, and two prompts that collide share KV"
    )
    assert bm.block_hash(None, [1, 2, 3, 4]) == digest, "block_hash must give the same hash for the same inputs"


HASH_IN_A_FRESH_PROCESS = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("student_block_manager", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
first = module.block_hash(None, [5, 6, 7, 8], "tenant-a")
print(module.block_hash(first, [9, 10, 11, 12], "tenant-a").hex())
"""


def test_hash_is_the_same_in_every_process(bm):
    """A cache shared between processes (or restarted) needs hashes that do not depend on the process."""
    first = bm.block_hash(None, [5, 6, 7, 8], "tenant-a")
    here = bm.block_hash(first, [9, 10, 11, 12], "tenant-a").hex()
    seen = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        run = subprocess.run([sys.executable, "-c", HASH_IN_A_FRESH_PROCESS, bm.__file__], env=env,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert run.returncode == 0, f"could not compute block_hash in a fresh process:\n{run.stderr[-2000:]}"
        seen.add(run.stdout.strip())
    assert seen == {here}, (
        f"block_hash of the same tokens and extra key differs between processes ({sorted(seen)} vs {here} here): "
        "Python's hash() of a str is salted per process (PYTHONHASHSEED); hash bytes with hashlib instead"
    )


def test_hash_chains_over_the_parent(bm):
    block = [7, 7, 7, 7]
    first, other_first = bm.block_hash(None, [1, 2, 3, 4]), bm.block_hash(None, [4, 3, 2, 1])
    assert bm.block_hash(first, block) != bm.block_hash(other_first, block), (
        "the same tokens after different prefixes got the same hash: unchained hashes (the parent is not hashed in), "
        "so a block would be reused at a position (or after a prefix) whose keys and values are different"
    )
    assert bm.block_hash(None, block) != bm.block_hash(first, block), (
        "a first block (parent None) and a later block with the same tokens got the same hash: chain the parent in"
    )


def test_hash_depends_on_the_extra_key(bm):
    hashes = {key: bm.block_hash(None, [1, 2, 3, 4], key) for key in (None, "lora-a", "lora-b")}
    assert len(set(hashes.values())) == 3, (
        f"the same tokens under extra keys None, 'lora-a' and 'lora-b' must hash differently (another adapter or "
        f"cache salt means other KV), got {sum(a == b for a in hashes.values() for b in hashes.values()) - 3} "
        "equal pairs"
    )


@pytest.mark.parametrize("a, b", [([1, 23], [12, 3]), ([0, 256], [256, 0]), ([1, 2], [258])], ids=str)
def test_hash_encodes_each_id_at_a_fixed_width(bm, a, b):
    assert bm.block_hash(None, a) != bm.block_hash(None, b), (
        f"token lists {a} and {b} got the same hash: encode each id at a fixed width (e.g. 8 bytes), not as digits "
        "run together or as single bytes"
    )


def test_hash_takes_ids_of_a_large_vocabulary(bm):
    try:
        high = bm.block_hash(None, [128_000, 151_935, 0, 255])
    except (ValueError, OverflowError) as exc:
        pytest.fail(f"block_hash must take any token id of a real vocabulary (151935 here), raised {exc!r}")
    assert high != bm.block_hash(None, [128_000 % 256, 151_935 % 256, 0, 255]), "ids above 255 lost their high bytes"


# --- FreeBlockQueue: a doubly linked list, O(1) everywhere -----------------------------------------------------------


def blocks_of(bm, n):
    return [bm.KVBlock(i) for i in range(n)]


def test_free_queue_pops_the_front_and_appends_at_either_end(bm):
    blocks = blocks_of(bm, 5)
    queue = bm.FreeBlockQueue(blocks)
    assert queue.block_ids() == [0, 1, 2, 3, 4] and len(queue) == 5, (
        f"a new queue holds the blocks in the given order: expected [0, 1, 2, 3, 4], got {queue.block_ids()} "
        f"(len {len(queue)})"
    )
    first = queue.popleft()
    assert first is blocks[0], f"popleft must return the front block (id 0), got {first.block_id}"
    assert first.prev_free is None and first.next_free is None, "a block out of the queue must have no links"
    queue.append(first)
    queue.appendleft(queue.popleft())  # block 1: off the front and back on
    assert queue.block_ids() == [1, 2, 3, 4, 0] and len(queue) == 4 + 1, (
        f"after popleft (0), append(0), popleft (1), appendleft(1): expected [1, 2, 3, 4, 0], got {queue.block_ids()}"
    )


def test_free_queue_removes_from_the_middle_and_the_ends(bm):
    blocks = blocks_of(bm, 5)
    queue = bm.FreeBlockQueue(blocks)
    for block_id, expected in ((2, [0, 1, 3, 4]), (0, [1, 3, 4]), (4, [1, 3])):
        queue.remove(blocks[block_id])
        assert queue.block_ids() == expected and len(queue) == len(expected), (
            f"after removing block {block_id}: expected {expected}, got {queue.block_ids()} (len {len(queue)})"
        )
        assert blocks[block_id].prev_free is None and blocks[block_id].next_free is None, (
            f"block {block_id} keeps its links after remove: unlink it fully, or appending it later corrupts the list"
        )
    queue.append(blocks[2])
    assert queue.block_ids() == [1, 3, 2], f"a removed block can be appended again: got {queue.block_ids()}"


def test_free_queue_refuses_what_would_corrupt_it(bm):
    blocks = blocks_of(bm, 3)
    queue = bm.FreeBlockQueue(blocks[:2])
    # Linking a queued block again makes a cycle; unlinking one that is not queued cuts the list.
    expect_error(ValueError, lambda: queue.append(blocks[0]), "append of a block already in the queue")
    expect_error(ValueError, lambda: queue.appendleft(blocks[1]), "appendleft of a block already in the queue")
    expect_error(ValueError, lambda: queue.remove(blocks[2]), "remove of a block that is not in the queue")
    assert queue.block_ids() == [0, 1] and len(queue) == 2, f"refused calls changed the queue: {queue.block_ids()}"
    queue.popleft(), queue.popleft()
    expect_error(bm.OutOfBlocks, queue.popleft, "popleft of an empty queue")
    assert len(queue) == 0 and queue.block_ids() == []


# --- BlockManager: tables, slots and the free queue ------------------------------------------------------------------


def test_a_new_pool_is_all_free_in_id_order(bm):
    manager = pool(bm, num_blocks=6, block_size=4)
    queue = manager.free_block_ids()
    assert queue == [0, 1, 2, 3, 4, 5], f"the free queue starts as [0, 1, 2, 3, 4, 5], got {queue}"
    assert (manager.num_free_blocks, manager.usage, manager.hit_rate) == (6, 0.0, 0.0), (
        f"a new pool: 6 free blocks, usage 0.0, hit_rate 0.0; got {manager.num_free_blocks}, {manager.usage}, "
        f"{manager.hit_rate}"
    )
    assert (manager.num_blocks, manager.block_size, manager.enable_prefix_caching) == (6, 4, True)
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (0, 0)


def test_allocate_takes_whole_blocks_off_the_front(bm):
    manager = pool(bm)
    table, cached = manager.allocate("a", tokens(100, 10))  # 10 tokens, blocks of 4: 3 blocks, the last partial
    assert (table, cached) == ([0, 1, 2], 0), f"expected blocks [0, 1, 2] and 0 cached tokens, got {table}, {cached}"
    assert manager.block_table("a") == [0, 1, 2]
    assert manager.free_block_ids() == [3, 4, 5, 6, 7] and manager.num_free_blocks == 5
    assert manager.usage == 3 / 8, f"3 of 8 blocks in use: usage 0.375, got {manager.usage}"
    assert [manager.ref_count(b) for b in range(8)] == [1, 1, 1, 0, 0, 0, 0, 0]
    manager.block_table("a").append(99)
    assert manager.block_table("a") == [0, 1, 2], "block_table must return a new list, not the manager's own"


def test_slot_mapping_follows_the_block_table(bm):
    manager = pool(bm)
    manager.allocate("a", tokens(0, 5))  # blocks 0 (full, cached) and 1 (partial)
    manager.allocate("b", tokens(50, 5))  # blocks 2 and 3
    manager.free("a")  # block 1 to the front (nothing cached), block 0 to the back (cached)
    table, _ = manager.allocate("c", tokens(100, 9))
    assert table == [1, 4, 5], f"c must take blocks 1, 4, 5 (front of [1, 4, 5, 6, 7, 0]), got {table}"
    expected = [4, 5, 6, 7, 16, 17, 18, 19, 20]  # block * 4 + offset for tokens 0..8 in blocks 1, 4, 5
    got = manager.slot_mapping("c")
    assert got == expected, (
        f"token i sits at slot table[i // 4] * 4 + i % 4: expected {expected}, got {got}"
        + (": the slots assume contiguous blocks" if got == list(range(4, 13)) else "")
    )


def test_appending_takes_a_block_only_on_a_block_boundary(bm):
    manager = pool(bm)
    manager.allocate("a", tokens(0, 3))
    assert manager.append_token("a", 1003) is None
    assert manager.block_table("a") == [0], f"token 3 fits in block 0, got table {manager.block_table('a')}"
    assert manager.append_token("a", 1004) is None
    assert manager.block_table("a") == [0, 1], (
        f"token 4 starts a new block: expected [0, 1], got {manager.block_table('a')}"
    )
    assert manager.slot_mapping("a") == [0, 1, 2, 3, 4] and manager.num_free_blocks == 6


# --- prefix caching --------------------------------------------------------------------------------------------------


def test_a_repeated_prompt_reuses_its_full_blocks(bm):
    manager = pool(bm)
    prompt = tokens(100, 10)
    first, _ = manager.allocate("a", prompt)
    manager.free("a")
    table, cached = manager.allocate("b", prompt)
    assert cached == 8 and table[:2] == first[:2], (
        f"the prompt's two full blocks are cached: expected 8 cached tokens in blocks {first[:2]}, got {cached} "
        f"cached, table {table}"
    )
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (20, 8) and manager.hit_rate == 0.4, (
        f"counters count tokens: 20 looked up, 8 found (hit rate 0.4); got {manager.prefix_cache_queries}, "
        f"{manager.prefix_cache_hits}, {manager.hit_rate}"
    )


def test_a_hit_never_covers_the_whole_prompt(bm):
    manager = pool(bm)
    prompt = tokens(100, 8)  # exactly two full blocks
    first, _ = manager.allocate("a", prompt)
    manager.free("a")
    table, cached = manager.allocate("b", prompt)
    assert cached == 4, (
        f"a prompt of exactly 2 cached blocks may reuse only the first (4 tokens): at least one token must be "
        f"computed, for its logits; got {cached} cached tokens"
        + (" — the hit covered the whole prompt" if cached == 8 else "")
    )
    assert table[0] == first[0] and table[1] != first[1] and len(table) == 2


def test_a_partial_block_is_never_cached(bm):
    manager = pool(bm)
    manager.allocate("a", tokens(100, 6))  # block 0 full, block 1 holds 2 tokens
    assert manager.cached_hash(0) is not None and manager.cached_hash(1) is None, (
        f"only full blocks are hashed: block 0 (4 tokens) cached, block 1 (2 tokens) not (a partial block was "
        f"hashed if it has one); got hashes "
        f"{manager.cached_hash(0)!r:.20} and {manager.cached_hash(1)!r:.20}"
    )
    manager.free("a")
    longer = tokens(100, 6) + [7, 7, 7, 7]  # same 6 tokens, then more: block 1 would be a stale partial match
    _, cached = manager.allocate("b", longer)
    assert cached == 4, (
        f"only the full first block may hit: expected 4 cached tokens, got {cached}"
        + (" — a partial block was cached and reused" if cached > 4 else "")
    )


def test_the_cached_hash_is_the_chained_hash_of_the_blocks_tokens(bm):
    manager = pool(bm)
    prompt = tokens(100, 9)
    manager.allocate("a", prompt, extra_key="salt")
    first = bm.block_hash(None, prompt[:4], "salt")
    expected = [first, bm.block_hash(first, prompt[4:8], "salt"), None]
    got = [manager.cached_hash(b) for b in manager.block_table("a")]
    assert got == expected, "cached_hash of each block must be block_hash chained over the prompt, with its extra key"


def test_equal_tokens_at_another_position_do_not_hit(bm):
    manager = pool(bm)
    shared_block = [7, 7, 7, 7]
    manager.allocate("a", tokens(100, 4) + shared_block + [1])
    manager.free("a")
    _, cached = manager.allocate("b", tokens(200, 4) + shared_block + [1])
    assert cached == 0, (
        f"b's first block differs from a's, so its second block must miss even though its tokens equal a's second "
        f"block; got {cached} cached tokens: unchained hashes (false hits at another position)"
    )


def test_the_extra_key_separates_caches(bm):
    manager = pool(bm)
    prompt = tokens(100, 5)
    manager.allocate("a", prompt, extra_key="lora-a")
    manager.free("a")
    _, other = manager.allocate("b", prompt, extra_key="lora-b")
    manager.free("b")
    _, same = manager.allocate("c", prompt, extra_key="lora-a")
    assert (other, same) == (0, 4), (
        f"the same prompt under another extra key must miss and under the same key hit: expected 0 and 4 cached "
        f"tokens, got {other} and {same}"
    )


def test_running_sequences_share_a_prefix_by_reference(bm):
    manager = pool(bm)
    system_prompt = tokens(100, 8)
    a, _ = manager.allocate("a", system_prompt + [1, 2])
    b, cached = manager.allocate("b", system_prompt + [3])
    assert cached == 8 and b[:2] == a[:2], f"b must share a's two full blocks: a {a}, b {b}, cached {cached}"
    assert [manager.ref_count(x) for x in a] == [2, 2, 1], (
        f"blocks in two tables have ref_count 2: got {[manager.ref_count(x) for x in a]} for a's blocks {a}"
    )
    assert manager.num_free_blocks == 8 - 4, f"a took 3 blocks, b one more: 4 free, got {manager.num_free_blocks}"
    manager.free("a")
    assert [manager.ref_count(x) for x in a[:2]] == [1, 1] and manager.num_free_blocks == 5, (
        "freeing a must leave the blocks b still uses referenced (ref_count 1) and out of the free queue"
    )


def test_a_block_filled_while_decoding_is_cached(bm):
    manager = pool(bm)
    manager.allocate("a", tokens(100, 3))
    manager.append_token("a", 103)  # fills block 0
    assert manager.cached_hash(0) == bm.block_hash(None, tokens(100, 4)), (
        "a block that a generated token fills must be hashed and cached at once (chained, like a prompt block)"
    )
    manager.append_token("a", 104)
    manager.free("a")
    _, cached = manager.allocate("b", tokens(100, 5) + [9])
    assert cached == 4, f"a later prompt must hit the block that decoding filled: expected 4 cached, got {cached}"


# --- freeing and eviction --------------------------------------------------------------------------------------------


def test_free_releases_tail_first_cached_blocks_to_the_back_others_to_the_front(bm):
    manager = pool(bm)
    manager.allocate("a", tokens(100, 9))  # blocks 0, 1 cached; block 2 partial
    manager.free("a")
    expected = [2, 3, 4, 5, 6, 7, 1, 0]
    got = manager.free_block_ids()
    hints = {
        (2, 3, 4, 5, 6, 7, 0, 1): "the cached blocks were freed head first: free the tail first, so the shared "
        "head of a prefix is evicted last",
        (3, 4, 5, 6, 7, 1, 0, 2): "the uncached block went to the back: it holds nothing reusable, put it at the "
        "front so it is handed out before any cached block",
        (3, 4, 5, 6, 7, 2, 1, 0): "every freed block went to the back: uncached ones belong at the front",
        (0, 1, 2, 3, 4, 5, 6, 7): "the cached blocks went to the front: they would be evicted next, the most "
        "recently freed first; cached blocks belong at the back",
    }
    assert got == expected, (
        f"after freeing blocks [0 (cached), 1 (cached), 2 (partial)] the free queue must be {expected}, got {got}"
        + (f": {hints[tuple(got)]}" if tuple(got) in hints else "")
    )
    assert manager.cached_hash(0) is not None and manager.cached_hash(1) is not None, (
        "freed blocks keep their hashes (lazy eviction): the prefix stays reusable until a block is needed"
    )


def test_eviction_takes_the_least_recently_freed_block(bm):
    manager = pool(bm, num_blocks=4)
    manager.allocate("a", tokens(100, 5))  # blocks 0 (cached), 1
    manager.allocate("b", tokens(200, 5))  # blocks 2 (cached), 3
    manager.free("a")  # queue: 1, 0
    manager.free("b")  # queue: 3, 1, 0, 2
    queue = manager.free_block_ids()
    assert queue == [3, 1, 0, 2], (
        f"uncached blocks 3 and 1 at the front, then cached blocks 0 and 2 in the order they were freed: expected "
        f"[3, 1, 0, 2], got {queue}"
        + (": cached blocks at the front evict the most recently freed first" if queue[0] in (0, 2) else "")
    )
    manager.allocate("c", tokens(300, 2))  # takes block 3 (uncached)
    manager.allocate("d", tokens(400, 2))  # takes block 1 (uncached)
    table, _ = manager.allocate("e", tokens(500, 2))  # must evict a cached block: the least recently freed, 0
    assert table == [0], (
        f"with only cached blocks left, the front one goes first: block 0 (freed before block 2), got {table}"
        + (": that evicts the most recently freed block" if table == [2] else "")
    )
    manager.free("c"), manager.free("d"), manager.free("e")
    _, cached_b = manager.allocate("b2", tokens(200, 5))
    assert cached_b == 4, f"b's prefix (block 2) was not evicted and must still hit: got {cached_b} cached tokens"


def test_an_evicted_block_loses_its_hash(bm):
    manager = pool(bm, num_blocks=2)
    manager.allocate("a", tokens(100, 5))  # blocks 0 (cached), 1
    manager.free("a")  # queue: 1, 0
    manager.allocate("b", tokens(200, 6))  # takes both blocks: block 0 is evicted and overwritten
    assert manager.cached_hash(0) is None or manager.cached_hash(0) == bm.block_hash(None, tokens(200, 4)), (
        "an evicted block kept its hash: a block handed out again must drop its old hash, as its KV is about to "
        "be overwritten"
    )
    manager.free("b")
    _, cached = manager.allocate("c", tokens(100, 5))
    assert cached == 0, (
        f"a's prefix was evicted (block 0 now holds b's tokens), yet a's prompt found {cached} cached tokens: an "
        "evicted block kept its hash, so the lookup would return another prompt's keys and values"
    )


# --- all or nothing ----------------------------------------------------------------------------------------------


def test_out_of_blocks_changes_nothing(bm):
    manager = pool(bm, num_blocks=4)
    manager.allocate("a", tokens(100, 11))  # 3 blocks, 1 left
    before = state(manager, ["a"])
    expect_error(bm.OutOfBlocks, lambda: manager.allocate("b", tokens(200, 5)), "allocating 2 blocks with 1 free")
    assert_unchanged(before, state(manager, ["a"]), "a refused allocation (OutOfBlocks)")
    expect_error(ValueError, lambda: manager.block_table("b"), "block_table of b after its allocation was refused")
    manager.allocate("b", tokens(200, 3))  # one block still fits: nothing leaked


def test_cached_blocks_in_the_free_queue_count_against_the_room(bm):
    manager = pool(bm, num_blocks=4)
    prompt = tokens(100, 9)
    manager.allocate("a", prompt)  # 0, 1 cached, 2 partial
    manager.free("a")  # queue: 2, 3, 1, 0
    manager.allocate("x", tokens(300, 1))  # takes 2
    manager.allocate("y", tokens(400, 1))  # takes 3; queue: 1, 0 (both cached)
    before = state(manager, ["x", "y"])
    expect_error(bm.OutOfBlocks, lambda: manager.allocate("b", prompt),  # 2 hits in the free queue + 1 new > 2 free
                 "allocating 2 cached blocks that sit in the free queue and 1 new block with 2 blocks free")
    assert_unchanged(
        before, state(manager, ["x", "y"]),
        "an allocation whose cache hits come out of the free queue (2 hits + 1 new block > 2 free: hits count "
        "against the room too)",
    )  # fmt: skip
    manager.free("x")
    table, cached = manager.allocate("b", prompt)
    assert (table, cached) == ([0, 1, 2], 8), f"with 3 free it fits: expected [0, 1, 2] and 8, got {table}, {cached}"


def test_appending_without_a_free_block_changes_nothing(bm):
    manager = pool(bm, num_blocks=2)
    manager.allocate("a", tokens(100, 8))
    before = state(manager, ["a"])
    expect_error(bm.OutOfBlocks, lambda: manager.append_token("a", 5), "appending a token that needs a block, 0 free")
    assert_unchanged(before, state(manager, ["a"]), "a refused append (OutOfBlocks)")


# --- fork and copy-on-write ----------------------------------------------------------------------------------------


def test_fork_shares_every_block_by_reference(bm):
    manager = pool(bm)
    table, _ = manager.allocate("a", tokens(100, 6))
    manager.fork("a", "b")
    assert manager.block_table("b") == table and manager.slot_mapping("b") == manager.slot_mapping("a")
    assert [manager.ref_count(x) for x in table] == [2, 2] and manager.num_free_blocks == 6, (
        f"fork shares blocks and takes none: ref_counts [2, 2] and 6 free (a fork without reference counts leaves "
        f"them at 1), got "
        f"{[manager.ref_count(x) for x in table]} and {manager.num_free_blocks}"
    )
    manager.free("a")
    assert [manager.ref_count(x) for x in table] == [1, 1] and not set(table) & set(manager.free_block_ids()), (
        "after freeing the parent, the child still uses every block: fork without reference counts frees blocks "
        f"that are still in use (free queue {manager.free_block_ids()}, b's blocks {table})"
    )


def test_writing_to_a_shared_last_block_copies_it_first(bm):
    manager = pool(bm)
    manager.allocate("a", tokens(100, 6))  # blocks 0 (full), 1 (2 tokens)
    manager.fork("a", "b")
    copy = manager.append_token("b", 42)
    assert copy == (1, 2), (
        f"b's last block is shared with a: b must copy it into a new block (2, the front of the free queue) and "
        f"report (source, destination) = (1, 2); got {copy}"
    )
    assert manager.block_table("b") == [0, 2] and manager.block_table("a") == [0, 1], (
        f"after the copy: a [0, 1], b [0, 2]; got a {manager.block_table('a')}, b {manager.block_table('b')}"
    )
    assert [manager.ref_count(x) for x in (0, 1, 2)] == [2, 1, 1]
    assert manager.append_token("a", 43) is None, "a is now the only owner of block 1: no copy"


def test_a_fork_on_a_block_boundary_needs_no_copy(bm):
    manager = pool(bm)
    manager.allocate("a", tokens(100, 8))
    manager.fork("a", "b")
    assert manager.append_token("b", 1) is None and manager.block_table("b") == [0, 1, 2], (
        f"b's next token starts a new block, nothing is written to the shared ones: expected no copy and table "
        f"[0, 1, 2], got table {manager.block_table('b')}"
    )


# --- reset and prefix caching switched off ---------------------------------------------------------------------------


def test_reset_prefix_cache_refuses_while_blocks_are_in_use(bm):
    manager = pool(bm)
    manager.allocate("a", tokens(100, 9))
    before = state(manager, ["a"])
    assert manager.reset_prefix_cache() is False, "reset_prefix_cache must refuse (False) while a sequence runs"
    assert_unchanged(before, state(manager, ["a"]), "a refused reset_prefix_cache")
    manager.free("a")
    queue = manager.free_block_ids()
    assert manager.reset_prefix_cache() is True
    assert all(manager.cached_hash(b) is None for b in range(8)) and manager.free_block_ids() == queue
    _, cached = manager.allocate("b", tokens(100, 9))
    assert cached == 0, f"after a reset nothing may hit, got {cached} cached tokens"


def test_without_prefix_caching_nothing_is_hashed_or_reused(bm):
    manager = pool(bm, caching=False)
    manager.allocate("a", tokens(100, 9))
    assert all(manager.cached_hash(b) is None for b in range(8)), "with prefix caching off, no block is hashed"
    manager.free("a")
    assert manager.free_block_ids()[:3] == [0, 1, 2], (
        f"uncached blocks go to the front, tail first: expected the queue to start [0, 1, 2], got "
        f"{manager.free_block_ids()}"
    )
    _, cached = manager.allocate("b", tokens(100, 9))
    assert cached == 0 and manager.hit_rate == 0.0


def test_without_prefix_caching_decode_fills_blocks_and_goes_on(bm):
    """A serving engine with prefix caching off still decodes past block boundaries: a block that fills is hashed by
    nobody, and the next token takes a new block."""
    manager = pool(bm, caching=False)
    manager.allocate("a", tokens(100, 3))
    for token in range(103, 110):  # fills block 1 at token 4 and block 2 at token 8
        manager.append_token("a", token)
    assert len(manager.block_table("a")) == 3, f"10 tokens in blocks of 4 take 3 blocks, got {manager.block_table('a')}"
    assert all(manager.cached_hash(b) is None for b in range(8)), "with prefix caching off, no block is hashed"
    assert manager.num_free_blocks == 5


# --- bad input: a clear ValueError, and nothing changed ----------------------------------------------------------


@pytest.mark.parametrize(
    "bad", [dict(num_blocks=0), dict(num_blocks=-3), dict(num_blocks=2.0), dict(block_size=0), dict(block_size="16")],
    ids=str,
)
def test_constructor_rejects_sizes_that_are_not_positive_ints(bm, bad):
    sizes = dict(num_blocks=8, block_size=4) | bad
    name = next(iter(bad))
    expect_error(ValueError, lambda: bm.BlockManager(**sizes), f"BlockManager({name}={bad[name]!r})", match=name)


BAD_CALLS = {
    "allocate a duplicate id": lambda m: m.allocate("a", [1, 2]),
    "allocate an empty prompt": lambda m: m.allocate("z", []),
    "a negative token id": lambda m: m.allocate("z", [1, -1]),
    "a float token id": lambda m: m.allocate("z", [1, 2.0]),
    "a str token id": lambda m: m.allocate("z", [1, "2"]),
    "a str as the prompt": lambda m: m.allocate("z", "12"),
    "an extra key that is not a str": lambda m: m.allocate("z", [1, 2], extra_key=3),
    "append to an unknown id": lambda m: m.append_token("z", 1),
    "append a negative token": lambda m: m.append_token("a", -5),
    "append a float token": lambda m: m.append_token("a", 5.5),
    "fork an unknown parent": lambda m: m.fork("z", "y"),
    "fork into an id in use": lambda m: m.fork("a", "b"),
    "free an unknown id": lambda m: m.free("z"),
    "table of an unknown id": lambda m: m.block_table("z"),
    "slots of an unknown id": lambda m: m.slot_mapping("z"),
    "ref_count of a block out of range": lambda m: m.ref_count(8),
    "cached_hash of a negative block id": lambda m: m.cached_hash(-1),
}


@pytest.mark.parametrize("mistake", BAD_CALLS)
def test_bad_input_is_a_clear_error_that_changes_nothing(bm, mistake):
    manager = pool(bm)
    manager.allocate("a", [1, 2, 3, 4, 5])
    manager.allocate("b", [1, 2, 3, 4, 6])
    before = state(manager, ["a", "b"])
    error = expect_error(ValueError, lambda: BAD_CALLS[mistake](manager), f"a call with {mistake}")
    assert str(error), f"{mistake}: the ValueError must say what is wrong"
    assert_unchanged(before, state(manager, ["a", "b"]), f"a call with {mistake} (ValueError)")


def test_a_double_free_is_refused(bm):
    manager = pool(bm)
    manager.allocate("a", [1, 2, 3, 4, 5])
    manager.allocate("b", [1, 2, 3, 4, 6])  # shares block 0 with a
    manager.free("a")
    before = state(manager, ["b"])
    expect_error(ValueError, lambda: manager.free("a"), "freeing a sequence twice (a double free)")
    assert_unchanged(before, state(manager, ["b"]), "a double free (it would release a's blocks twice)")


# --- the invariants, after every step of random workloads -------------------------------------------------------


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / append / fork / free over a small pool and a 3-token alphabet, so prefixes collide often.

    A plain model (each live sequence's tokens and table, and what each block last held) checks after every step:
    free + referenced = all blocks; a block's ref_count is the number of tables holding it; no free block is in a
    table; every cached hash is the chained hash of the tokens the block holds, and no two blocks share one; cache
    hits return blocks that hold the prompt's own prefix, never all of it; a refused call changes nothing; and
    once every sequence is freed, every block is free.
    """

    module = None  # set by the test below to the implementation under test
    block_size = 2
    num_blocks = 10

    def __init__(self):
        super().__init__()
        self.manager = self.module.BlockManager(self.num_blocks, self.block_size)
        self.tokens: dict[int, list[int]] = {}
        self.holds: dict[int, bytes] = {}  # block id -> chained hash of the full block it last held
        self.next_id = 0

    def chain(self, tokens):
        hashes, parent = [], None
        for start in range(0, len(tokens) - self.block_size + 1, self.block_size):
            parent = self.module.block_hash(parent, tokens[start : start + self.block_size])
            hashes.append(parent)
        return hashes

    def record_contents(self):
        for seq_id, tokens in self.tokens.items():
            for block_id, full_hash in zip(self.manager.block_table(seq_id), self.chain(tokens), strict=False):
                self.holds[block_id] = full_hash

    @rule(prompt=st.lists(st.integers(0, 2), min_size=1, max_size=9))
    def allocate(self, prompt):
        seq_id, before = self.next_id, state(self.manager, self.tokens)
        try:
            table, cached = self.manager.allocate(seq_id, prompt)
        except self.module.OutOfBlocks:
            assert_unchanged(before, state(self.manager, self.tokens), "a refused allocate")
            return
        self.next_id += 1
        size = self.block_size
        assert len(table) == -(-len(prompt) // size), f"{len(prompt)} tokens need {-(-len(prompt) // size)} blocks"
        assert cached % size == 0 and cached <= len(prompt) - 1, (
            f"{cached} cached tokens of a {len(prompt)}-token prompt: whole blocks, never the whole prompt"
        )
        hashes = self.chain(prompt)
        for i in range(cached // size):
            assert self.holds.get(table[i]) == hashes[i], (
                f"a cache hit returned block {table[i]}, which does not hold prompt block {i}: another prompt's KV"
            )
        self.tokens[seq_id] = list(prompt)
        self.record_contents()

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), token=st.integers(0, 2))
    def append(self, data, token):
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        before = state(self.manager, self.tokens)
        try:
            self.manager.append_token(seq_id, token)
        except self.module.OutOfBlocks:
            assert_unchanged(before, state(self.manager, self.tokens), "a refused append")
            return
        self.tokens[seq_id].append(token)
        self.record_contents()

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        self.manager.fork(parent, self.next_id)
        self.tokens[self.next_id] = list(self.tokens[parent])
        self.next_id += 1

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        self.manager.free(seq_id)
        del self.tokens[seq_id]

    @invariant()
    def blocks_are_free_or_referenced_by_count(self):
        tables = {s: self.manager.block_table(s) for s in self.tokens}
        counts = [0] * self.num_blocks
        for table in tables.values():
            for block_id in table:
                counts[block_id] += 1
        free = self.manager.free_block_ids()
        referenced = {b for b in range(self.num_blocks) if counts[b]}
        assert len(free) == len(set(free)) == self.manager.num_free_blocks, f"free queue {free} has duplicates"
        assert not set(free) & referenced, f"blocks {set(free) & referenced} are both free and in a block table"
        assert len(free) + len(referenced) == self.num_blocks, (
            f"{len(free)} free + {len(referenced)} referenced != {self.num_blocks} blocks: blocks leaked"
        )
        got = [self.manager.ref_count(b) for b in range(self.num_blocks)]
        assert got == counts, f"ref_counts {got} differ from the number of tables holding each block {counts}"
        for seq_id, tokens in self.tokens.items():
            assert len(tables[seq_id]) == -(-len(tokens) // self.block_size)
            assert self.manager.slot_mapping(seq_id) == [
                tables[seq_id][i // self.block_size] * self.block_size + i % self.block_size for i in range(len(tokens))
            ]

    @invariant()
    def a_shared_block_holds_the_same_tokens_in_every_table(self):
        held: dict[int, tuple] = {}
        for seq_id, tokens in self.tokens.items():
            for i, block_id in enumerate(self.manager.block_table(seq_id)):
                content = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
                other = held.setdefault(block_id, content)
                assert other == content, (
                    f"block {block_id} is shared by sequences that wrote different tokens into it ({other} and "
                    f"{content}): a shared last block must be copied before it is written (copy-on-write)"
                )

    @invariant()
    def cached_hashes_match_the_blocks_contents(self):
        hashes = [self.manager.cached_hash(b) for b in range(self.num_blocks)]
        held = [h for h in hashes if h is not None]
        assert len(held) == len(set(held)), "two blocks are cached under the same hash"
        for block_id, block_hash in enumerate(hashes):
            if block_hash is not None:
                assert self.holds.get(block_id) == block_hash, (
                    f"block {block_id} is cached under a hash that is not the chained hash of the tokens it holds"
                )

    def teardown(self):
        for seq_id in list(self.tokens):
            self.manager.free(seq_id)
        assert self.manager.num_free_blocks == self.num_blocks, (
            f"after freeing every sequence only {self.manager.num_free_blocks} of {self.num_blocks} blocks are free"
        )


@pytest.mark.points(3)
def test_invariants_hold_over_random_workloads(bm):
    BlockManagerMachine.module = bm
    run = settings(max_examples=60, stateful_step_count=25, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck))(BlockManagerMachine)  # fmt: skip
    run.TestCase().runTest()


# --- speed, on the host clock: O(1) per block, whatever the pool ------------------------------------------------


def allocate_and_free(manager, prompt, pairs):
    for _ in range(pairs):
        manager.allocate("timed", prompt)
        manager.free("timed")


def test_allocate_and_free_cost_does_not_grow_with_the_pool(bm, host_speed):
    """1k blocks against 1M blocks: a cache hit taken out of the back of the queue, a new block off the front."""
    prompt = tokens(5000, 4 * 16 + 3)  # 4 full blocks of 16 (cached after the first round) and a partial one
    managers = {}
    for size in (1024, 2**20):
        managers[size] = bm.BlockManager(size, 16)
        manager = managers[size]
        manager.allocate("warm", prompt)
        manager.free("warm")  # its 4 cached blocks now sit at the back of the free queue

    def check(name, result, manager):
        assert manager.num_free_blocks == manager.num_blocks, "allocate + free must give every block back"

    pairs = 50
    timings = host_speed.compare(
        {f"{size} blocks": (allocate_and_free, lambda m=m: ((m, prompt, pairs), {})) for size, m in managers.items()},
        rounds=15, warmup=2, check=lambda name, result, manager, *_: check(name, result, manager),
    )  # fmt: skip
    small, large = timings["1024 blocks"].best, timings[f"{2**20} blocks"].best
    host_speed.judge(
        "large_over_small_pool", large / small,
        detail=f"allocate + free: {small / pairs * 1e6:.1f} us with 1024 blocks, {large / pairs * 1e6:.1f} us with "
        f"{2**20}: a list's pop(0) or remove() walks the whole pool; a doubly linked free queue does not",
    )  # fmt: skip


def bare_minimum(prompt_blocks, free_ids):
    """What any prefix-caching allocator must do per prompt: hash each full block, take and give back its blocks."""
    import hashlib

    taken, parent = [], b""
    for block in prompt_blocks:
        parent = hashlib.sha256(parent + block).digest()
        taken.append(free_ids.popleft())
    for block_id in reversed(taken):
        free_ids.append(block_id)


def test_block_operations_cost_a_small_multiple_of_the_bare_minimum(bm, host_speed):
    """Allocate + free of 64-token prompts (4 blocks of 16, all misses), against hashing 4 blocks + a deque."""
    manager = bm.BlockManager(4096, 16)
    free_ids = deque(range(4096))
    prompts = [tokens(1000 + 64 * i, 64) for i in range(50)]
    raw_blocks = [[bytes(8 * 16)] * 4 for _ in prompts]

    def allocate_and_free_all(manager, prompts):
        for prompt in prompts:
            manager.allocate("timed", prompt)
            manager.free("timed")

    def bare_all(blocks, free_ids):
        for prompt_blocks in blocks:
            bare_minimum(prompt_blocks, free_ids)

    timings = host_speed.compare(
        {"allocator": (allocate_and_free_all, lambda: ((manager, prompts), {})),
         "bare minimum": (bare_all, lambda: ((raw_blocks, free_ids), {}))},
        rounds=15, warmup=2,
    )  # fmt: skip
    ours, floor = timings["allocator"].best, timings["bare minimum"].best
    ops = 8 * len(prompts)  # 4 blocks taken and 4 given back per prompt
    host_speed.judge(
        "over_bare_minimum", ours / floor,
        detail=f"{ops / ours / 1e6:.2f} M block operations/s ({ours / len(prompts) * 1e6:.1f} us per allocate + free "
        f"of 4 blocks), the bare minimum {ops / floor / 1e6:.2f} M/s",
    )  # fmt: skip
