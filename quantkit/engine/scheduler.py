"""Continuous batching: which sequences run each step, with preemption by recompute.

The protocol with the engine, one step at a time:

    batch, is_prefill = scheduler.schedule()
    # prefill: compute positions seq.num_cached .. len(seq) - 1 of each seq (all blocks
    #   allocated), sample one token from the last position's logits
    # decode: feed each seq's last token (position len(seq) - 1) and up to `lookahead`
    #   draft tokens after it; slots are reserved for all of them
    for seq in batch:
        seq.token_ids += new_tokens          # 1 token, or accepted drafts + 1 in speculation
        blocks.truncate(seq, len(seq))       # speculation only: free rejected drafts' blocks
        seq.num_cached = len(seq) - 1        # positions whose K/V the engine wrote
    finished = scheduler.finish_step(batch)

The engine must set seq.num_cached to the number of leading positions whose K/V it has
written (len(seq) - 1 after a step: the newest token's K/V is written by the next step):
commit() shares only blocks within num_cached, and the next step writes from there.

Prefill runs first whenever a waiting sequence fits (FIFO, no skipping ahead). When a
decode step cannot get slots, the most recently started sequence is preempted: its
blocks are freed and it goes back to the front of the waiting queue with all its tokens,
so a later prefill recomputes its K/V (often hitting its own still-cached blocks) and
nothing generated is lost.
"""

from __future__ import annotations

from collections import deque

from quantkit.engine.block_manager import BlockManager
from quantkit.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int = 64,
        max_batched_tokens: int = 4096,
        lookahead: int = 0,
    ) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {max_num_seqs}")
        if max_batched_tokens < 1:
            raise ValueError(f"max_batched_tokens must be at least 1, got {max_batched_tokens}")
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.lookahead = lookahead  # draft tokens verified per decode step (slots reserved)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in the order they (re)started

    def add(self, seq: Sequence) -> None:
        if seq.status is not Status.WAITING or seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} is {seq.status.value}, not a new request")
        # the most positions it can ever hold: the last decode step runs at
        # len = num_prompt + max_tokens - 1 and reserves 1 + lookahead slots from len - 1
        positions = max(len(seq), seq.num_prompt + seq.params.max_tokens - 1 + self.lookahead)
        need = -(-positions // self.blocks.block_size)
        if need > self.blocks.num_blocks:
            raise ValueError(
                f"sequence {seq.seq_id} may need {need} KV blocks ({positions} positions) but "
                f"the cache has only {self.blocks.num_blocks}; lower max_tokens or grow the cache"
            )
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """(batch, is_prefill). A decode batch is empty only when nothing is running."""
        batch = self._schedule_prefill()
        if batch:
            return batch, True
        assert self.running or not self.waiting, "a waiting sequence cannot fit an empty cache"
        return self._schedule_decode(), False

    def finish_step(self, batch: list[Sequence]) -> list[Sequence]:
        """Commit the new cached blocks of each sequence of the step just run; free and
        return the finished ones."""
        finished = []
        for seq in batch:
            assert seq.status is Status.RUNNING, (seq.seq_id, seq.status)
            self.blocks.commit(seq)
            if seq.is_done():
                seq.status = Status.FINISHED
                self.blocks.free(seq)
                finished.append(seq)
        if finished:
            self.running = [s for s in self.running if s.status is Status.RUNNING]
        return finished

    def kv_usage(self) -> tuple[int, int]:
        """(positions holding live tokens, positions allocated = used blocks * block_size).
        A block shared by several sequences counts once. O(running sequences): every position
        below len(seq) is live, and shared blocks are full committed blocks, so each reference
        beyond a block's first (references minus blocks in use; only running sequences hold
        blocks) counts block_size positions twice."""
        bs = self.blocks.block_size
        references = sum(len(seq.block_table) for seq in self.running)
        live = sum(len(seq) for seq in self.running) - bs * (references - self.blocks.num_used)
        return live, self.blocks.num_used * bs

    def _schedule_prefill(self) -> list[Sequence]:
        batch: list[Sequence] = []
        tokens = 0  # positions to compute in this batch
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq):
                break
            compute = len(seq) - self.blocks.cached_prefix(seq)
            if batch and tokens + compute > self.max_batched_tokens:
                break  # (a sequence over the whole budget still runs, alone)
            self.waiting.popleft()
            self.blocks.allocate(seq)
            assert len(seq) - seq.num_cached == compute, (seq.seq_id, compute)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append(seq)
            tokens += compute
        return batch

    def _schedule_decode(self) -> list[Sequence]:
        n = 1 + self.lookahead
        batch: list[Sequence] = []  # always running[:len(batch)]
        while len(batch) < len(self.running):
            seq = self.running[len(batch)]
            if self.blocks.can_append(seq, n):  # the common case, checked once
                self.blocks.append_slots(seq, n)
                batch.append(seq)
                continue
            while not self.blocks.can_append(seq, n) and self.running[-1] is not seq:
                self._preempt(self.running.pop())
            if self.blocks.can_append(seq, n):
                self.blocks.append_slots(seq, n)
                batch.append(seq)
            else:  # seq is the most recent one left: it yields too
                self._preempt(self.running.pop())
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        # several preempted in one step: the later-started one is pushed first, so the
        # queue front keeps their start order
        self.waiting.appendleft(seq)
