"""BlockManager and Scheduler on the CPU: unit cases. The scheduler's protocol under random
request streams is tests/test_engine_scheduler.py."""

from __future__ import annotations

import pytest

from quantkit.engine import block_manager as block_manager_module
from quantkit.engine.block_manager import BlockManager
from quantkit.engine.scheduler import Scheduler
from quantkit.engine.sequence import SamplingParams, Sequence, Status

VOCAB = 50


def next_token(tokens: list[int]) -> int:
    """The fake model: the next token is a fixed function of the whole sequence."""
    return hash(tuple(tokens)) % VOCAB


def prefill(bm: BlockManager, seq: Sequence) -> None:
    """A prefill as the block manager sees it (Scheduler.postprocess does this): one new token, K/V of
    all old positions, then commit."""
    seq.token_ids.append(next_token(seq.token_ids))
    seq.num_cached = len(seq) - 1
    bm.commit(seq)


# --- BlockManager ---


def test_bad_construction():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)
    bm = BlockManager(4, 4)
    with pytest.raises(ValueError, match="max_num_seqs"):
        Scheduler(bm, max_num_seqs=0)
    with pytest.raises(ValueError, match="max_batched_tokens"):
        Scheduler(bm, max_batched_tokens=0)
    with pytest.raises(ValueError, match="lookahead"):
        Scheduler(bm, lookahead=-1)
    # 10 prompt + 8 new - 1 + 2 lookahead = 19 positions = 5 blocks > 4
    with pytest.raises(ValueError, match="5 KV blocks"):
        Scheduler(bm, lookahead=2).add(Sequence(list(range(10)), SamplingParams(max_tokens=8)))


def test_allocate_append_free_round_trip():
    bm = BlockManager(8, 4)
    seq = Sequence([1, 2, 3, 4, 5, 6])
    assert bm.blocks_needed(seq) == 2 and bm.can_allocate(seq)
    bm.allocate(seq)
    assert len(seq.block_table) == 2 and seq.num_cached == 0
    assert bm.num_free == 6 and bm.num_used == 2
    assert bm.slot(seq, 5) == seq.block_table[1] * 4 + 1
    with pytest.raises(ValueError, match="already holds 2"):
        bm.allocate(seq)
    prefill(bm, seq)  # 7 tokens; the decode step writes position 6: no new block
    assert bm.can_append(seq)
    bm.append_slots(seq)
    assert len(seq.block_table) == 2
    for _ in range(2):  # 9 tokens: position 8 opens a third block
        seq.token_ids.append(9)
        seq.num_cached = len(seq) - 1
    bm.append_slots(seq, 1)
    assert len(seq.block_table) == 3 and bm.num_free == 5
    bm.check_invariants([seq])
    bm.free(seq)
    assert seq.block_table == [] and seq.num_cached == 0
    assert bm.num_free == 8 and bm.num_used == 0
    bm.check_invariants([seq])


def test_over_allocation_raises():
    bm = BlockManager(4, 4)
    big = Sequence(list(range(17)))  # 5 blocks
    assert bm.blocks_needed(big) == 5 and not bm.can_allocate(big)
    with pytest.raises(RuntimeError, match="needs 5 free KV blocks, only 4"):
        bm.allocate(big)
    seq = Sequence(list(range(16)))
    bm.allocate(seq)
    prefill(bm, seq)
    assert not bm.can_append(seq, 2)  # positions 16, 17 need a fifth block
    with pytest.raises(RuntimeError, match="only 0 are free"):
        bm.append_slots(seq, 2)
    with pytest.raises(ValueError, match="n must be"):
        bm.can_append(seq, 0)
    bm.check_invariants([seq])


def test_prefix_sharing_and_cached_free_blocks():
    bm = BlockManager(16, 4)
    prefix = list(range(100, 112))  # 3 full blocks
    a = Sequence(prefix + [1, 2])
    bm.allocate(a)
    prefill(bm, a)
    b = Sequence(prefix + [7, 8, 9])
    assert bm.blocks_needed(b) == 1 and bm.cached_prefix(b) == 12
    bm.allocate(b)
    assert b.block_table[:3] == a.block_table[:3] and b.block_table[3] != a.block_table[3]
    assert [bm.ref_count(x) for x in b.block_table] == [2, 2, 2, 1]
    assert b.num_cached == 12 and bm.hits_tokens == 12 and bm.queried_tokens == 14 + 15
    # the whole sequence cached: the last position is still computed
    c = Sequence(list(prefix))
    bm.allocate(c)
    assert c.block_table == a.block_table[:3] and c.num_cached == 11
    assert bm.ref_count(a.block_table[0]) == 3
    bm.check_invariants([a, b, c])
    shared = a.block_table[:3]
    for s in (a, b, c):
        bm.free(s)
    assert bm.num_used == 0 and all(bm.ref_count(x) == 0 for x in shared)
    # freed but still cached: a hit takes those free-list entries
    d = Sequence(prefix + [5])
    assert bm.blocks_needed(d) == 4 and bm.cached_prefix(d) == 12
    bm.allocate(d)
    assert d.block_table[:3] == shared and d.num_cached == 12
    bm.check_invariants([d])
    bm.free(d)
    # new content takes the unregistered free blocks first, then the least recently freed
    fillers = [Sequence([200 + i] * 4) for i in range(16 - 3)]
    for f in fillers:
        bm.allocate(f)
        prefill(bm, f)  # registered, so freed behind the prefix
    assert not set(shared) & {f.block_table[0] for f in fillers}
    assert bm.cached_prefix(Sequence(prefix + [5])) == 12
    for f in fillers:
        bm.free(f)
    bm.allocate(Sequence([300] * 4))  # evicts the prefix's tail first
    assert bm.cached_prefix(Sequence(prefix + [5])) == 8
    bm.allocate(Sequence([301] * 8))
    assert bm.cached_prefix(Sequence(prefix + [5])) == 0
    assert bm.cached_prefix(Sequence([200] * 4 + [5])) == 4  # the fillers are still cached


def test_different_content_never_shares(monkeypatch):
    # every key hashes alike: only the stored key (parent block, its epoch, tokens) can
    # tell blocks apart. Blocks 0 and 1 of `a` hold the same tokens at different positions.
    monkeypatch.setattr(block_manager_module, "block_hash", lambda key: 0)
    bm = BlockManager(16, 4)
    a = Sequence([1] * 8 + [2])
    bm.allocate(a)
    prefill(bm, a)
    b = Sequence([1] * 8 + [3])
    assert bm.cached_prefix(b) == 4  # block 0 hits; block 1's key collides with block 0's
    bm.allocate(b)
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]
    for tokens in ([2] * 8, [1, 1, 1, 2, 1, 1, 1, 1], [9] + [1] * 7):
        assert bm.cached_prefix(Sequence(tokens + [0])) == 0
    bm.check_invariants([a, b])


def test_same_block_content_after_different_prefix_is_not_shared():
    bm = BlockManager(16, 4)
    a = Sequence([1, 2, 3, 4, 5, 6, 7, 8, 0])
    bm.allocate(a)
    prefill(bm, a)
    # block 1 holds the same tokens as a's block 1, but after a different block 0
    b = Sequence([9, 9, 9, 9, 5, 6, 7, 8, 0])
    assert bm.cached_prefix(b) == 0
    bm.allocate(b)
    assert not set(a.block_table) & set(b.block_table)


def test_reused_parent_block_does_not_revive_old_children():
    bm = BlockManager(8, 2)
    a, d = Sequence([1, 1, 2, 2, 9]), Sequence([1, 1, 3, 3, 9])
    bm.allocate(a)
    bm.allocate(d)  # before a commits: d computes its own copy of block [1, 1]
    prefill(bm, a)
    prefill(bm, d)  # d's block [3, 3] is registered as the child of a's block [1, 1]
    parent = a.block_table[0]
    bm.free(a)
    bm.free(d)
    e = Sequence([4] * 14)  # takes every free block but d's [3, 3], a's [1, 1] included
    bm.allocate(e)
    prefill(bm, e)
    j = e.block_table.index(parent)
    # the block that was [1, 1] now holds e's tokens: d's old child must not follow it
    assert bm.cached_prefix(Sequence([4] * (2 * j + 2) + [3, 3, 9])) == 2 * j + 2


def test_truncate_frees_exactly_the_blocks_beyond():
    bm = BlockManager(8, 4)
    seq = Sequence([1, 2, 3, 4, 5])
    bm.allocate(seq)
    prefill(bm, seq)  # 6 tokens, 5 cached
    bm.append_slots(seq, 1 + 6)  # positions 5..11: 3 blocks
    assert len(seq.block_table) == 3 and bm.num_free == 5
    kept, dropped = seq.block_table[:2], seq.block_table[2]
    seq.token_ids += [7, 7]  # one accepted draft and the bonus token: 8 tokens
    bm.truncate(seq, len(seq))
    seq.num_cached = len(seq) - 1
    assert seq.block_table == kept and bm.ref_count(dropped) == 0 and bm.num_free == 6
    with pytest.raises(ValueError, match="num_tokens=3"):
        bm.truncate(seq, 3)
    bm.check_invariants([seq])
    # the dropped block held nothing reusable: it is the next one handed out
    other = Sequence([5])
    bm.allocate(other)
    assert other.block_table == [dropped]


# --- Scheduler ---


def test_prefill_budget_and_max_num_seqs():
    bm = BlockManager(32, 4)
    sched = Scheduler(bm, max_num_seqs=2, max_batched_tokens=10)
    one = SamplingParams(max_tokens=1)
    s1, s2, s3, s4 = (Sequence([i] * n, one) for i, n in ((1, 6), (2, 3), (3, 20), (4, 1)))
    for s in (s1, s2, s3, s4):
        sched.add(s)
    batch, is_prefill = sched.schedule()
    assert is_prefill and batch == [s1, s2]  # 9 tokens; s3 would exceed 10 and 2 seqs
    assert sched.postprocess(batch, [[next_token(s.token_ids)] for s in batch]) == [s1, s2]
    assert s1.status is Status.FINISHED and s1.block_table == [] and sched.running == []
    batch, is_prefill = sched.schedule()
    assert is_prefill and batch == [s3]  # over the budget alone, rather than never
    assert list(sched.waiting) == [s4]


def test_preempts_most_recent_and_requeues_it_first():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_num_seqs=3)
    a, b, c, d = (Sequence([i] * 4, SamplingParams(max_tokens=8)) for i in (1, 2, 3, 4))
    for s in (a, b, c, d):
        sched.add(s)
    batch, is_prefill = sched.schedule()
    assert is_prefill and batch == [a, b, c] and list(sched.waiting) == [d]
    assert sched.postprocess(batch, [[next_token(s.token_ids)] for s in batch]) == []
    assert all(len(s) == 5 and s.num_cached == 4 for s in batch)
    # each now writes position 4 in a second block; 1 free: c (last started) yields to b
    batch, is_prefill = sched.schedule()
    assert not is_prefill and batch == [a, b] and sched.running == [a, b]
    assert list(sched.waiting) == [c, d] and c.status is Status.WAITING
    assert c.num_preemptions == 1 and len(c) == 5 and c.block_table == [] and c.num_cached == 0
    bm.check_invariants([a, b, c])
    used, allocated = sched.kv_usage()
    assert (used, allocated) == (10, 16)
