"""The scheduler's protocol with the engine (schedule -> model -> postprocess, defer_tokens for
asynchronous decoding, accepted drafts for speculation): unit cases, then a fake engine that
drives random request streams through it. The fake model's next token and each position's K/V
are functions of the whole prefix, and the fake KV cache checks every read, so a lost token,
a stale block or a wrong slot shows up as a wrong output or a failed read."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from quantkit.engine.block_manager import BlockManager
from quantkit.engine.scheduler import PLACEHOLDER, Scheduler
from quantkit.engine.sequence import SamplingParams, Sequence, Status

VOCAB = 50
STOP = 0


def next_token(tokens: list[int]) -> int:
    """The fake model: the next token is a fixed function of the whole sequence."""
    return hash(tuple(tokens)) % VOCAB


def kv_values(tokens: list[int]) -> list[int]:
    """The fake K/V of each position: a hash chain, so it depends on the whole prefix."""
    out, h = [], None
    for t in tokens:
        h = hash((h, t))
        out.append(h)
    return out


def reference(prompt: list[int], params: SamplingParams) -> list[int]:
    """What plain stepping generates, one token at a time with no memory pressure."""
    tokens = list(prompt)
    while True:
        tokens.append(next_token(tokens))
        out = tokens[len(prompt):]
        if len(out) >= params.max_tokens or out[-1] in params.stop_token_ids:
            return out


def prefilled(sched: Scheduler, *seqs: Sequence) -> list[Sequence]:
    for s in seqs:
        sched.add(s)
    batch, is_prefill = sched.schedule()
    assert is_prefill and batch == list(seqs)
    assert sched.postprocess(batch, [[next_token(s.token_ids)] for s in batch]) == []
    return batch


# --- postprocess and defer_tokens ---


def test_postprocess_stops_at_max_tokens_and_stop_tokens_and_releases_rejected_slots():
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, lookahead=3)
    a = Sequence([1, 2, 3, 4, 5], SamplingParams(max_tokens=3, stop_token_ids=(STOP,)))
    b = Sequence([6, 7, 8, 9, 10], SamplingParams(max_tokens=9, stop_token_ids=(STOP,)))
    c = Sequence([11, 12, 13, 14, 15], SamplingParams(max_tokens=9, stop_token_ids=(STOP,)))
    prefilled(sched, a, b, c)
    batch, is_prefill = sched.schedule()
    assert not is_prefill and batch == [a, b, c]
    assert [len(s.block_table) for s in batch] == [3, 3, 3]  # positions 5 .. 9 reserved
    # a: 4 tokens offered, 2 fit max_tokens; b: a stop token after one accepted draft; c: 1 token
    finished = sched.postprocess(batch, [[21, 22, 23, 24], [31, STOP, 33], [41]])
    assert finished == [a, b] and sched.running == [c]
    assert a.output_ids[1:] == [21, 22] and b.output_ids[1:] == [31, STOP]
    assert a.status is b.status is Status.FINISHED and a.block_table == b.block_table == []
    assert len(c) == 7 and c.num_cached == 6 and len(c.block_table) == 2  # the third block released
    assert len(c.token_times) == 2
    bm.check_invariants([a, b, c])
    with pytest.raises(ValueError, match="2 rows of tokens for a batch of 1"):
        sched.postprocess([c], [[1], [2]])


def test_defer_tokens_only_when_the_next_step_is_certain():
    bm = BlockManager(6, 4)
    sched = Scheduler(bm)
    a = Sequence([1, 2, 3], SamplingParams(max_tokens=4))
    b = Sequence([4, 5, 6], SamplingParams(max_tokens=8))
    prefilled(sched, a, b)  # 4 tokens each, one block each
    batch, _ = sched.schedule()
    assert not sched.defer_tokens(batch[:1]), "the batch is not everything running"
    waiting = Sequence([9] * 4)
    sched.waiting.append(waiting)
    assert not sched.defer_tokens(batch), "a waiting sequence may be prefilled next"
    sched.waiting.clear()
    before = [(list(s.token_ids), s.num_cached, list(s.block_table)) for s in batch]
    assert sched.defer_tokens(batch)
    assert [s.token_ids[-1] for s in batch] == [PLACEHOLDER] * 2 and [s.num_cached for s in batch] == [4, 4]
    following, is_prefill = sched.schedule()  # positions 5: a second block each
    assert following == batch and not is_prefill and bm.num_free == 2
    assert sched.postprocess(batch, [[7], [8]]) == []
    assert [s.output_ids for s in batch] == [[before[0][0][-1], 7], [before[1][0][-1], 8]]
    assert [s.num_cached for s in batch] == [4, 4] and [len(s.token_times) for s in batch] == [2, 2]
    bm.check_invariants(batch)
    # a has 2 of 4 tokens: the pending one makes 3, so deferring is still safe; then it is not
    assert sched.defer_tokens(batch)
    sched.schedule()
    sched.postprocess(batch, [[1], [2]])
    assert not sched.defer_tokens(batch), "a's pending token would be its last"
    assert [len(s) for s in batch] == [6, 6], "a refusal changes nothing"
    sched.postprocess(batch, [[3], [4]])
    # b alone, 7 tokens in 2 blocks, 4 blocks free: deferring needs none
    assert sched.running == [b] and sched.defer_tokens([b])
    with pytest.raises(RuntimeError, match="cannot be deferred"):
        Scheduler(BlockManager(4, 4), lookahead=2).defer_tokens([])


def test_defer_tokens_refuses_when_the_pool_runs_short():
    bm = BlockManager(3, 4)
    sched = Scheduler(bm)
    a, b = Sequence([1, 2, 3], SamplingParams(max_tokens=8)), Sequence([4, 5, 6], SamplingParams(max_tokens=8))
    prefilled(sched, a, b)
    batch, _ = sched.schedule()  # position 3 of each: no new block
    # the next step writes position 4 of each: 2 blocks, 1 free
    assert not sched.defer_tokens(batch) and len(a) == len(b) == 4
    sched.postprocess(batch, [[7], [8]])
    batch, _ = sched.schedule()
    assert batch == [a] and b.num_preemptions == 1  # what the step after a refusal does instead


# --- a fake engine over random request streams ---


@dataclass
class InFlight:
    batch: list[Sequence]
    tokens: list[int]


class FakeEngine:
    """Drives the scheduler as quantkit.engine.engine.Engine does: prefill, speculative verification
    with random acceptance (lookahead > 0), or plain decode steps, deferred while defer_tokens
    allows (asynchronous decoding: a step's input is the previous step's token, not yet read)."""

    def __init__(self, sched: Scheduler, rng: random.Random, defer: bool) -> None:
        self.sched, self.bm, self.rng, self.defer = sched, sched.blocks, rng, defer
        self.kv: list[int | None] = [None] * (self.bm.num_blocks * self.bm.block_size)
        self.inflight: InFlight | None = None
        self.deferred = self.dropped = self.cut = 0

    def write(self, seq: Sequence, pos: int, value: int) -> None:
        slot = self.bm.slot(seq, pos)
        if self.bm.ref_count(seq.block_table[pos // self.bm.block_size]) > 1:
            assert self.kv[slot] == value, "a shared block was overwritten with other K/V"
        self.kv[slot] = value

    def read(self, seq: Sequence, tokens: list[int], upto: int) -> None:
        """Attention reads positions 0 .. upto - 1: each holds the K/V of this prefix."""
        exp = kv_values(tokens)
        for p in range(upto):
            assert self.kv[self.bm.slot(seq, p)] == exp[p], (seq.seq_id, p)

    def step(self) -> list[Sequence]:
        if self.inflight is not None:
            return self.advance()
        batch, is_prefill = self.sched.schedule()
        assert len(self.sched.running) <= self.sched.max_num_seqs and len({id(s) for s in batch}) == len(batch)
        assert batch or not self.sched.running
        if not batch:
            return []
        if is_prefill:
            computed = sum(len(s) - s.num_cached for s in batch)
            assert computed <= self.sched.max_batched_tokens or len(batch) == 1
            for seq in batch:
                self.read(seq, seq.token_ids, seq.num_cached)
                exp = kv_values(seq.token_ids)
                for p in range(seq.num_cached, len(seq)):
                    self.write(seq, p, exp[p])
            return self.sched.postprocess(batch, [[next_token(s.token_ids)] for s in batch])
        assert self.sched.kv_usage() == kv_usage_by_block(self.sched)  # where the engine samples it
        if self.sched.lookahead:
            return self.sched.postprocess(batch, [self.verify(s) for s in batch])
        self.inflight = self.launch(batch, [s.last_token for s in batch])
        return self.advance()

    def verify(self, seq: Sequence) -> list[int]:
        """The last token and k drafts, of which the first `accepted` are the model's own tokens."""
        k = self.sched.lookahead
        accepted = self.rng.randint(0, k)
        tokens = list(seq.token_ids)
        for _ in range(accepted + 1):
            tokens.append(next_token(tokens))
        true = tokens[len(seq):]
        drafts = true[:accepted] + [(true[-1] + 1) % VOCAB] * (k - accepted)
        self.read(seq, seq.token_ids, len(seq) - 1)
        value = kv_values(seq.token_ids)[-1]
        self.write(seq, len(seq) - 1, value)
        for j, d in enumerate(drafts, start=len(seq)):
            value = hash((value, d))
            self.write(seq, j, value)
        self.cut += STOP in true[:-1] or len(true) > seq.params.max_tokens - seq.num_output
        return true

    def launch(self, batch: list[Sequence], inputs: list[int]) -> InFlight:
        """A decode step whose input token may still be a placeholder on the host side."""
        out = []
        for seq, t in zip(batch, inputs):
            tokens = seq.token_ids[:-1] + [t]
            assert seq.num_cached == len(seq) - 1
            assert seq.num_output < seq.params.max_tokens, "a step computed a token past max_tokens"
            self.read(seq, tokens, len(seq) - 1)
            self.write(seq, len(seq) - 1, kv_values(tokens)[-1])
            out.append(next_token(tokens))
        return InFlight(batch, out)

    def advance(self) -> list[Sequence]:
        cur, self.inflight = self.inflight, None
        if self.defer and self.sched.defer_tokens(cur.batch):
            following, is_prefill = self.sched.schedule()
            assert following == cur.batch and not is_prefill
            self.inflight = self.launch(cur.batch, cur.tokens)
            self.deferred += 1
        finished = self.sched.postprocess(cur.batch, [[t] for t in cur.tokens])
        if self.inflight is not None and finished:
            keep = [i for i, s in enumerate(self.inflight.batch) if s.status is not Status.FINISHED]
            self.dropped += len(self.inflight.batch) - len(keep)
            nxt = self.inflight
            self.inflight = InFlight([nxt.batch[i] for i in keep], [nxt.tokens[i] for i in keep]) if keep else None
        return finished


def kv_usage_by_block(sched: Scheduler) -> tuple[int, int]:
    """kv_usage the slow way: the live positions of each distinct block, a shared one counted once."""
    bs = sched.blocks.block_size
    filled: dict[int, int] = {}
    for seq in sched.running:
        for i, b in enumerate(seq.block_table):
            filled[b] = max(filled.get(b, 0), min(bs, max(0, len(seq) - i * bs)))
    return sum(filled.values()), sched.blocks.num_used * bs


def make_requests(rng: random.Random, n: int) -> list[tuple[int, Sequence]]:
    """(arrival step, request): prompts of 1-60 tokens, most starting with a shared prefix."""
    prefixes = [[rng.randint(1, VOCAB - 1) for _ in range(rng.randint(8, 40))] for _ in range(3)]
    out = []
    for _ in range(n):
        length = rng.randint(1, 60)
        head = rng.choice(prefixes) if rng.random() < 0.7 else []
        prompt = (head + [rng.randint(1, VOCAB - 1) for _ in range(length)])[:length]
        params = SamplingParams(max_tokens=rng.randint(1, 40), stop_token_ids=(STOP,))
        out.append((rng.randint(0, 40), Sequence(prompt, params)))
    return out


def run_stream(seed: int, block_size: int, lookahead: int, small_pool: bool, defer: bool):
    rng = random.Random(seed)
    requests = make_requests(rng, 24)
    expected = {s.seq_id: reference(s.token_ids, s.params) for _, s in requests}
    worst = -(-(60 + 40 - 1 + lookahead) // block_size)  # blocks the longest request needs
    bm = BlockManager(worst + rng.randint(0, 2) if small_pool else worst * len(requests), block_size)
    sched = Scheduler(bm, max_num_seqs=rng.randint(2, 16), max_batched_tokens=rng.randint(16, 128), lookahead=lookahead)
    engine = FakeEngine(sched, rng, defer)
    pending = sorted(requests, key=lambda r: r[0])
    finished: list[Sequence] = []
    for step in range(5000):
        while pending and pending[0][0] <= step:
            sched.add(pending.pop(0)[1])
        if not sched.has_work():
            assert engine.inflight is None
            if not pending:
                break
            continue
        finished += engine.step()
        live = sched.running + list(sched.waiting)
        bm.check_invariants(live)
        assert all(PLACEHOLDER not in s.token_ids for s in live), "a placeholder outlived its step"
        # no slot is held past the next step's (rejected drafts' slots are released)
        ahead = engine.inflight is not None
        assert all(len(s.block_table) <= -(-(len(s) + ahead) // block_size) for s in sched.running)
        ids = [s.seq_id for s in live + finished]
        assert len(ids) == len(set(ids)) == len(requests) - len(pending), "a request was lost or duplicated"
    else:
        pytest.fail("the stream did not finish in 5000 steps")
    assert len(finished) == len(requests) and all(s.status is Status.FINISHED for s in finished)
    for seq in finished:
        assert seq.output_ids == expected[seq.seq_id], seq.seq_id
        assert len(seq.token_times) == seq.num_output
    assert bm.num_used == 0 and bm.num_free == bm.num_blocks and sched.kv_usage() == (0, 0)
    return engine, sum(s.num_preemptions for s in finished), bm.hits_tokens


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("mode", ["plain", "deferred", "speculative"])
@pytest.mark.parametrize("small_pool", [True, False], ids=["small_pool", "large_pool"])
def test_random_streams_keep_the_books_and_equal_plain_stepping(block_size, mode, small_pool):
    preemptions = hits = deferred = dropped = cut = 0
    for seed in range(4):
        lookahead = 3 if mode == "speculative" else 0
        engine, p, h = run_stream(seed * 1000 + block_size * 10 + lookahead, block_size, lookahead, small_pool,
                                  defer=mode == "deferred")
        preemptions, hits = preemptions + p, hits + h
        deferred, dropped, cut = deferred + engine.deferred, dropped + engine.dropped, cut + engine.cut
    assert (preemptions > 0) == small_pool and hits > 0
    assert (deferred > 0) == (mode == "deferred") and (dropped > 0) == (mode == "deferred")
    assert (cut > 0) == (mode == "speculative"), "some verified tokens ran past a stop or max_tokens"
