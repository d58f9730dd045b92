"""Paged KV cache bookkeeping: which physical block holds which positions of which sequence.

The cache is num_blocks blocks of block_size positions; position p of a sequence lives in
flat slot block_table[p // block_size] * block_size + p % block_size. A sequence's
num_cached leading positions have their K/V in the cache; a step writes positions from
num_cached on.

Prefix sharing. Once a block is full and all its positions are cached, commit() registers
it under the key (parent block, parent epoch, its token ids), parent being the registered
block before it (ROOT for block 0). A later sequence walks its own full blocks from the
start and reuses every block whose key matches, stopping at the first miss. Because the
key names the parent block itself, a match means the whole prefix up to and including the
block is equal, token for token, by induction from block 0; the hash only finds the
candidate. A block's epoch grows each time it is handed out for new content, which makes
keys naming its old content unreachable.

Only full committed blocks are ever shared or registered, so every position a step writes
(at or beyond num_cached) lies in a block its sequence holds alone. The one exception:
when every block of a new sequence hits, its last position is still computed (the model
needs its logits), rewriting identical K/V into a shared block.

Eviction order. Blocks with refcount 0 sit in the free list and are handed out from its
front. A freed block holding registered K/V goes to the back and keeps its key, so a
later request can still hit it until it reaches the front: cached prefixes are evicted
least recently freed first. A sequence frees its blocks last to first, so its tail is
evicted before its head (a block is only reachable through the blocks before it). A
freed block holding nothing reusable goes to the front.

Sliding windows. A block is kept while some layer can still read it. In a model whose
every layer attends only inside a window of W positions (Mistral-style sliding_window),
no later step reads a position more than W behind the newest: drop_before() releases a
running sequence's blocks that lie wholly before that (its table entry becomes DROPPED,
so later positions keep their index), and the scheduler calls it after every step. A
dropped block was committed first, so it stays cached like a freed one (its sequence's
head is then freed before its tail, so the prefix beyond it is unreachable once it is
evicted: sliding-window prefixes are cached less well). Where global layers are
interleaved with sliding ones (Gemma 2 / 3), the global layers read every position of
the sequence, so every block stays until the sequence ends.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from quantkit.engine.sequence import Sequence

# (parent block id, parent epoch, the block's token ids)
BlockKey = tuple[int, int, tuple[int, ...]]
ROOT = (-1, 0)  # the parent of block 0
DROPPED = -1  # a block_table entry released by drop_before: no layer reads its positions any more


def block_hash(key: BlockKey) -> int:
    """Lookup hash of a block key; a module function so tests can force collisions."""
    return hash(key)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self._ref = [0] * num_blocks  # live sequences whose block_table holds the block
        # refcount-0 blocks in eviction order (front handed out first); an OrderedDict so a
        # prefix hit can take a block out of the middle in O(1)
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._epoch = [0] * num_blocks
        self._key: list[BlockKey | None] = [None] * num_blocks  # set while registered
        self._hash: list[int | None] = [None] * num_blocks
        self._by_hash: dict[int, int] = {}  # block_hash(key) -> registered block
        # seq_id -> (full blocks already committed, parent of the next one; None once a
        # hash collision stopped the chain)
        self._progress: dict[int, tuple[int, tuple[int, int] | None]] = {}
        self._dropped: dict[int, int] = {}  # seq_id -> leading block_table entries that are DROPPED
        self.hits_tokens = 0  # positions found cached by allocate()
        self.queried_tokens = 0  # positions allocate() was asked for

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self._num_blocks - len(self._free)

    @property
    def hit_rate(self) -> float:
        return self.hits_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def slot(self, seq: Sequence, pos: int) -> int:
        """The flat KV slot of position pos of seq (not in a dropped block)."""
        block = seq.block_table[pos // self._block_size]
        assert block != DROPPED, (seq.seq_id, pos)
        return block * self._block_size + pos % self._block_size

    def num_dropped(self, seq: Sequence) -> int:
        """The leading entries of seq's block_table that drop_before released."""
        return self._dropped.get(seq.seq_id, 0)

    # --- allocation of a waiting sequence ---

    def blocks_needed(self, seq: Sequence) -> int:
        """Free-list entries allocate(seq) would take now. A hit on a block in use costs
        nothing; a hit on a cached block in the free list still takes that entry."""
        self._check_unallocated(seq)
        hits = self._match(seq)
        misses = _ceil_div(len(seq), self._block_size) - len(hits)
        return misses + sum(1 for b in hits if self._ref[b] == 0)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_needed(seq) <= self.num_free

    def cached_prefix(self, seq: Sequence) -> int:
        """The num_cached allocate(seq) would set now: the cached positions it would reuse."""
        self._check_unallocated(seq)
        return min(len(self._match(seq)) * self._block_size, len(seq) - 1)

    def allocate(self, seq: Sequence) -> None:
        """Give seq a block_table covering all len(seq) positions, reusing the cached blocks
        of its longest matching prefix, and set seq.num_cached. At least the last position
        stays uncached so the model computes its logits."""
        self._check_unallocated(seq)
        hits = self._match(seq)
        total = _ceil_div(len(seq), self._block_size)
        need = total - len(hits) + sum(1 for b in hits if self._ref[b] == 0)
        if need > self.num_free:
            raise RuntimeError(
                f"sequence {seq.seq_id} needs {need} free KV blocks, only {self.num_free} are free"
            )
        for b in hits:  # take the hits out of the free list before _take() can hand them out
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1
        seq.block_table = hits + [self._take() for _ in range(total - len(hits))]
        seq.num_cached = min(len(hits) * self._block_size, len(seq) - 1)
        parent = (hits[-1], self._epoch[hits[-1]]) if hits else ROOT
        self._progress[seq.seq_id] = (len(hits), parent)
        self.queried_tokens += len(seq)
        self.hits_tokens += seq.num_cached

    # --- growth, commit, rollback, release of a running sequence ---

    def can_append(self, seq: Sequence, n: int = 1) -> bool:
        return self._blocks_to_append(seq, n) <= self.num_free

    def can_append_all(self, seqs: list[Sequence], n: int = 1) -> bool:
        """Whether append_slots(seq, n) succeeds for every one of seqs, one after another."""
        return sum(self._blocks_to_append(seq, n) for seq in seqs) <= self.num_free

    def append_slots(self, seq: Sequence, n: int = 1) -> None:
        """Make the table cover the n positions a step writes from the last token on:
        len(seq) - 1 .. len(seq) + n - 2 (n = 1 for decode, 1 + drafts for speculation)."""
        need = self._blocks_to_append(seq, n)
        if need > self.num_free:
            raise RuntimeError(
                f"sequence {seq.seq_id} needs {need} free KV blocks, only {self.num_free} are free"
            )
        # the step writes positions >= num_cached: their blocks must be this sequence's alone
        for b in seq.block_table[seq.num_cached // self._block_size:]:
            assert self._ref[b] == 1 and self._key[b] is None, (seq.seq_id, b, self._ref[b])
        seq.block_table.extend(self._take() for _ in range(need))

    def commit(self, seq: Sequence) -> None:
        """Register the full blocks whose K/V are all in the cache (the first
        min(len(seq), num_cached) positions) so later requests can share them."""
        bs = self._block_size
        done, parent = self._progress[seq.seq_id]
        full = min(len(seq), seq.num_cached) // bs
        for i in range(done, full):
            if parent is None:
                break
            b = seq.block_table[i]
            key = (*parent, tuple(seq.token_ids[i * bs:(i + 1) * bs]))
            h = block_hash(key)
            owner = self._by_hash.get(h)
            if owner is None:
                assert self._key[b] is None, (seq.seq_id, b)
                self._by_hash[h] = b
                self._key[b], self._hash[b] = key, h
                parent = (b, self._epoch[b])
            elif self._key[owner] == key:
                # the same prefix was computed twice (requests prefilled in one batch): keep
                # the registered block and chain the rest of this sequence onto it
                parent = (owner, self._epoch[owner])
            else:
                parent = None  # a hash collision: this chain is not registered past here
        self._progress[seq.seq_id] = (max(done, full), parent)

    def drop_before(self, seq: Sequence, position: int) -> int:
        """Release seq's blocks that lie wholly before `position`, a position no later step of
        seq reads (every layer slides, and the window ends after it), and mark their entries
        DROPPED. Only committed blocks go (so they stay cached like freed ones); returns how
        many were released now."""
        done, _ = self._progress[seq.seq_id]
        first = self._dropped.get(seq.seq_id, 0)
        last = min(max(position, 0) // self._block_size, done)  # committed blocks are full and cached
        for i in range(first, last):
            self._release(seq.block_table[i])
            seq.block_table[i] = DROPPED
        if last > first:
            self._dropped[seq.seq_id] = last
        return max(0, last - first)

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Speculative rollback: keep only the blocks num_tokens positions need, freeing the
        rest (slots of rejected drafts, never committed)."""
        done, _ = self._progress[seq.seq_id]
        if num_tokens < max(seq.num_cached, done * self._block_size):
            raise ValueError(
                f"truncate(num_tokens={num_tokens}) would drop cached positions of sequence "
                f"{seq.seq_id} (num_cached={seq.num_cached}, committed blocks={done})"
            )
        keep = _ceil_div(num_tokens, self._block_size)
        for b in reversed(seq.block_table[keep:]):
            assert b != DROPPED and self._ref[b] == 1 and self._key[b] is None, (seq.seq_id, b)
            self._release(b)
        del seq.block_table[keep:]

    def free(self, seq: Sequence) -> None:
        """Release all of seq's blocks (finished or preempted); registered ones stay cached."""
        for b in reversed(seq.block_table):
            if b != DROPPED:
                self._release(b)
        seq.block_table = []
        seq.num_cached = 0
        self._progress.pop(seq.seq_id, None)
        self._dropped.pop(seq.seq_id, None)

    def check_invariants(self, seqs: Iterable[Sequence]) -> None:
        """For tests: refcounts match the live tables in seqs (every sequence holding
        blocks), the free list holds exactly the refcount-0 blocks, the hash index matches
        the registered blocks, each table covers its sequence, and its DROPPED entries are
        exactly its leading num_dropped committed ones."""
        bs = self._block_size
        counts = [0] * self._num_blocks
        ids = set()
        for s in seqs:
            assert s.seq_id not in ids, f"sequence {s.seq_id} listed twice"
            ids.add(s.seq_id)
            dropped = self._dropped.get(s.seq_id, 0)
            assert all(b == DROPPED for b in s.block_table[:dropped]), (s.seq_id, dropped)
            assert dropped <= self._progress.get(s.seq_id, (0, None))[0], (s.seq_id, dropped)
            t = s.block_table[dropped:]
            assert len(set(t)) == len(t), f"sequence {s.seq_id} holds a block twice: {t}"
            for b in t:
                assert b != DROPPED, (s.seq_id, s.block_table)
                counts[b] += 1
            if s.block_table:
                # every cached position and every token but the newest (its K/V is written
                # by the next step, which first calls append_slots)
                assert 0 <= s.num_cached < len(s), (s.seq_id, s.num_cached, len(s))
                assert len(s.block_table) * bs >= len(s) - 1, (s.seq_id, len(s.block_table), len(s))
                assert s.seq_id in self._progress, s.seq_id
            else:
                assert s.num_cached == 0, (s.seq_id, s.num_cached)
        assert counts == self._ref, "refcounts differ from the live block tables"
        zero = {b for b in range(self._num_blocks) if self._ref[b] == 0}
        assert set(self._free) == zero, "the free list differs from the refcount-0 blocks"
        for h, b in self._by_hash.items():
            assert self._hash[b] == h and self._key[b] is not None, (h, b)
        registered = sum(1 for h in self._hash if h is not None)
        assert registered == len(self._by_hash), "registered blocks missing from the hash index"

    # --- internals ---

    def _check_unallocated(self, seq: Sequence) -> None:
        if seq.block_table:
            held = len(seq.block_table)
            raise ValueError(f"sequence {seq.seq_id} already holds {held} KV blocks; free it first")

    def _match(self, seq: Sequence) -> list[int]:
        """The registered blocks of seq's longest cached prefix of full blocks."""
        bs = self._block_size
        hits: list[int] = []
        parent = ROOT
        for i in range(len(seq) // bs):
            key = (*parent, tuple(seq.token_ids[i * bs:(i + 1) * bs]))
            b = self._by_hash.get(block_hash(key))
            if b is None or self._key[b] != key:  # a miss, or a hash collision
                break
            hits.append(b)
            parent = (b, self._epoch[b])
        return hits

    def _blocks_to_append(self, seq: Sequence, n: int) -> int:
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if not seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} holds no KV blocks; allocate it first")
        return max(0, _ceil_div(len(seq) - 1 + n, self._block_size) - len(seq.block_table))

    def _take(self) -> int:
        """Hand out the front free block for new content, dropping what it cached."""
        b, _ = self._free.popitem(last=False)
        assert self._ref[b] == 0, b
        if self._key[b] is not None:
            h = self._hash[b]
            assert self._by_hash[h] == b, (h, b)
            del self._by_hash[h]
            self._key[b] = self._hash[b] = None
        self._epoch[b] += 1
        self._ref[b] = 1
        return b

    def _release(self, b: int) -> None:
        assert self._ref[b] > 0, b
        self._ref[b] -= 1
        if self._ref[b] == 0:
            self._free[b] = None
            if self._key[b] is None:  # holds nothing reusable: hand it out first
                self._free.move_to_end(b, last=False)
