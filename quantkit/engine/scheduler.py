"""Continuous batching: which sequences run each step, and every change to a sequence's state.

The engine drives; the scheduler alone edits sequences (their tokens, num_cached, status),
its queues and, through the block manager, their KV blocks. One step:

    batch, is_prefill = scheduler.schedule()
    # prefill: compute positions seq.num_cached .. len(seq) - 1 of each seq (all blocks
    #   allocated), sample one token from the last position's logits
    # decode: feed each seq's last token (position len(seq) - 1) and up to `lookahead`
    #   draft tokens after it; slots are reserved for all of them
    finished = scheduler.postprocess(batch, tokens)   # tokens[i]: 1 token, or in speculation
                                                      # the accepted drafts + 1
Asynchronous decoding adds one call between a decode step's launch and its postprocess:

    if scheduler.defer_tokens(batch):    # each seq holds a placeholder for the unread token
        following, _ = scheduler.schedule()   # the same batch's next decode step, launched now
    finished = scheduler.postprocess(batch, tokens)   # the placeholders take the tokens read

postprocess() appends tokens up to max_tokens and the first stop token, then sets num_cached
to len(seq) - 1: the newest token's K/V is written by the next step. commit() shares only
blocks within num_cached, and the next step writes from there. With lookahead, the slots of
rejected drafts are released (blocks.truncate). Finished sequences free their blocks and
leave the running list.

With a kv_window (every layer of the model slides), a running sequence's blocks that lie wholly
before its last len(seq) - 1 - kv_window positions are released after each step
(BlockManager.drop_before): no later step reads them (a draft model re-reads from len - 2).

Prefill runs first whenever a waiting sequence fits (FIFO, no skipping ahead). When a
decode step cannot get slots, the most recently started sequence is preempted: its
blocks are freed and it goes back to the front of the waiting queue with all its tokens,
so a later prefill recomputes its K/V (often hitting its own still-cached blocks) and
nothing generated is lost.
"""

from __future__ import annotations

import time
from collections import deque

from quantkit.engine.block_manager import BlockManager
from quantkit.engine.sequence import Sequence, Status

PLACEHOLDER = -1  # the token of a deferred step (defer_tokens) until postprocess gets its value


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int = 64,
        max_batched_tokens: int = 4096,
        lookahead: int = 0,
        kv_window: int | None = None,
    ) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {max_num_seqs}")
        if max_batched_tokens < 1:
            raise ValueError(f"max_batched_tokens must be at least 1, got {max_batched_tokens}")
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        if kv_window is not None and kv_window < 1:
            raise ValueError(f"kv_window must be at least 1, got {kv_window}")
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.lookahead = lookahead  # draft tokens verified per decode step (slots reserved)
        self.kv_window = kv_window  # every layer attends within this many positions: older blocks go
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

    def postprocess(self, batch: list[Sequence], tokens: list[list[int]], now: float | None = None) -> list[Sequence]:
        """Account the step just run on batch: tokens[i] are batch[i]'s new tokens (the
        sampled one, or the accepted drafts and the token after them), `now` their time
        (default: now). Returns the sequences that finished, their blocks freed."""
        if len(tokens) != len(batch):
            raise ValueError(f"{len(tokens)} rows of tokens for a batch of {len(batch)}")
        now = time.perf_counter() if now is None else now
        for seq, new in zip(batch, tokens):
            assert seq.status is Status.RUNNING, (seq.seq_id, seq.status)
            if seq.token_ids[-1] == PLACEHOLDER:  # deferred: defer_tokens made room for exactly this token
                assert len(new) == 1, (seq.seq_id, new)
                seq.token_ids[-1] = int(new[0])
                seq.token_times.append(now)
            else:
                for t in new:
                    if seq.is_done():
                        break
                    seq.token_ids.append(int(t))
                    seq.token_times.append(now)
            seq.num_cached = len(seq) - 1
            if self.lookahead:  # the slots of rejected drafts (a no-op after a prefill)
                self.blocks.truncate(seq, len(seq))
        # committing after every truncation keeps the free list's order what it always was
        return self._finish(batch)

    def defer_tokens(self, batch: list[Sequence]) -> bool:
        """Asynchronous decoding: batch's decode step was launched and its tokens are not read
        yet. If the next step is certain to be a decode step of exactly these sequences that
        needs no preemption (nothing waits, batch is everything running, none reaches
        max_tokens with the pending token, the free blocks cover every next position), give
        each sequence a placeholder for its pending token, so that schedule() can reserve the
        next step's slots now, and return True; else change nothing and return False.

        A sequence whose pending token turns out to be a stop token then has had its next step
        computed for nothing: postprocess finishes it, and the K/V that step wrote lands in a
        block just freed, at a position no committed (shareable) block holds."""
        if self.lookahead:
            raise RuntimeError("a speculative step's token count is known only once verified: it cannot be deferred")
        if self.waiting or len(batch) != len(self.running):
            return False
        if any(s.num_output + 1 >= s.params.max_tokens for s in batch):
            return False
        # two positions from len - 1: the pending token's and the one after it
        if not self.blocks.can_append_all(batch, 2):
            return False
        for seq in batch:
            seq.token_ids.append(PLACEHOLDER)
            seq.num_cached = len(seq) - 1
        return True

    def kv_usage(self) -> tuple[int, int]:
        """(positions holding live tokens, positions allocated = used blocks * block_size).
        A block shared by several sequences counts once. O(running sequences): every position
        below len(seq) is live but those of dropped blocks, and shared blocks are full committed
        blocks, so each reference beyond a block's first (references minus blocks in use; only
        running sequences hold blocks) counts block_size positions twice."""
        bs = self.blocks.block_size
        dropped = [self.blocks.num_dropped(seq) for seq in self.running]
        references = sum(len(seq.block_table) for seq in self.running) - sum(dropped)
        live = sum(len(seq) for seq in self.running) - bs * sum(dropped) - bs * (references - self.blocks.num_used)
        return live, self.blocks.num_used * bs

    def _finish(self, batch: list[Sequence]) -> list[Sequence]:
        """Commit the new cached blocks of each sequence of the step just run; free and
        return the finished ones."""
        finished = []
        for seq in batch:
            self.blocks.commit(seq)
            if seq.is_done():
                seq.status = Status.FINISHED
                self.blocks.free(seq)
                finished.append(seq)
            elif self.kv_window is not None:
                self.blocks.drop_before(seq, len(seq) - 1 - self.kv_window)
        if finished:
            self.running = [s for s in self.running if s.status is Status.RUNNING]
        return finished

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
