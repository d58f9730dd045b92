"""The engine loop: schedule, run the model (and a draft), sample, account.

    engine = Engine(target, EngineConfig(speculative="ngram"))
    done = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=32))

Each step is either a prefill (new or preempted sequences) or a decode of every running
sequence; with speculative decoding a decode step proposes k tokens per sequence (prompt
lookup, or k steps of a draft model sharing the block tables) and verifies them in one
target forward of 1 + k tokens per sequence, keeping the accepted prefix plus one token
(quantkit.engine.sampler.rejection_sample: the outputs follow the target distribution).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from quantkit.engine.block_manager import BlockManager
from quantkit.engine.config import EngineConfig
from quantkit.engine.runner import ModelRunner, PrefillChunk, Shape
from quantkit.engine.sampler import probs, propose_ngram, rejection_sample, sample
from quantkit.engine.scheduler import Scheduler
from quantkit.engine.sequence import SamplingParams, Sequence, Status
from quantkit.engine.step import DecodeStep, GraphedDecode, StepInputs
from quantkit.models.loader import LoadedModel


@dataclass
class Stats:
    steps_prefill: int = 0
    steps_decode: int = 0
    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted
    verify_rows: int = 0  # sequence-steps of speculative verification
    emitted: int = 0  # tokens those steps emitted
    pipelined: int = 0  # decode steps launched before the previous step's tokens were read (async_decode)
    kv_used: list[int] = field(default_factory=list)  # per decode step: positions holding live tokens
    kv_allocated: list[int] = field(default_factory=list)  # per decode step: positions in used blocks


def kv_blocks_for(config: EngineConfig, shapes: list[Shape], dtype: torch.dtype, device: torch.device) -> int:
    """The KV pool's size in blocks: config.kv_blocks, else a fraction of the free GPU memory
    (on the CPU: max_num_seqs sequences of max_model_len)."""
    if config.kv_blocks is not None:
        return config.kv_blocks
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        per_block = config.block_size * sum(s.kv_bytes_per_slot(dtype) for s in shapes)
        return max(1, int(free * config.kv_memory_fraction) // per_block)
    return config.max_num_seqs * -(-config.max_model_len // config.block_size)


def _attention_window(config) -> int | None:
    """The sliding attention window a config asks for (Mistral, some Qwen2), None for full attention."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


_PLACEHOLDER = -1  # the token of a pipelined step, until its value reaches the host


@dataclass
class _InFlight:
    """A launched decode step: its sequences, the sampled tokens on the device and their host
    copy (with the event that says it arrived). rows: the host copy's rows of these sequences
    (None: all, in order; a subset once some sequences stopped before this step was read)."""

    batch: list[Sequence]
    tokens: torch.Tensor
    host: torch.Tensor
    event: torch.cuda.Event | None
    rows: list[int] | None = None


class Engine:
    def __init__(self, target: LoadedModel, config: EngineConfig = EngineConfig(), draft: LoadedModel | None = None):
        if config.speculative == "draft" and draft is None:
            raise ValueError('speculative="draft" needs a draft model')
        if draft is not None and draft.model.config.vocab_size != target.model.config.vocab_size:
            raise ValueError(f"the draft's vocabulary ({draft.model.config.vocab_size}) differs from the target's "
                             f"({target.model.config.vocab_size})")
        self.config = config
        for m in [target] + ([draft] if draft is not None else []):
            window = _attention_window(m.model.config)
            if window is not None and config.max_model_len > window:
                raise ValueError(f"{m.source} attends within a sliding window of {window} tokens, which this engine "
                                 f"does not implement; set max_model_len <= {window} (got {config.max_model_len})")
        self.vocab = target.model.config.vocab_size
        device = target.model.get_submodule(target.family.embed).weight.device
        dtype = target.model.get_submodule(target.family.embed).weight.dtype
        models = [target] + ([draft] if config.speculative == "draft" else [])
        blocks = kv_blocks_for(config, [Shape.of(m.model.config) for m in models], dtype, device)
        slots = (blocks + 1) * config.block_size  # one spare block: the scratch slot padding rows write to
        self.blocks = BlockManager(blocks, config.block_size)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_batched_tokens, config.lookahead)
        self.runner = ModelRunner(target.model, target.family, slots)
        self.draft = ModelRunner(draft.model, draft.family, slots) if config.speculative == "draft" else None
        self.device = device
        self.scratch = blocks * config.block_size
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self._inflight: _InFlight | None = None  # the launched decode step not yet read (async_decode)
        self.stats = Stats()
        # the decode step of the target and the draft: graphed on a GPU
        if config.cuda_graphs and device.type == "cuda":
            contexts = tuple(c for c in (128, 256, 512, 1024, 2048, 4096, 8192, 16384) if c < config.max_model_len)
            contexts += (config.max_model_len + config.lookahead + 1,)
            make = lambda runner: GraphedDecode(runner, self.scratch, contexts)  # noqa: E731
        else:
            make = lambda runner: DecodeStep(runner, self.scratch)  # noqa: E731
        self.target_step = make(self.runner)
        self.draft_step = make(self.draft) if self.draft is not None else None

    # ---- public --------------------------------------------------------------------------------
    def add(self, prompt: list[int], params: SamplingParams) -> Sequence:
        bad = [t for t in prompt if not 0 <= t < self.vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the model's vocabulary (0 .. {self.vocab - 1})")
        if len(prompt) + params.max_tokens > self.config.max_model_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"max_model_len ({self.config.max_model_len})")
        seq = Sequence(list(prompt), params)
        seq.arrival = time.perf_counter()
        self.scheduler.add(seq)
        return seq

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        """Run the prompts to completion; the sequences in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add(p, sp) for p, sp in zip(prompts, plist)]
        while self.scheduler.has_work():
            self.step()
        return seqs

    def step(self) -> list[Sequence]:
        """One scheduler step; returns the sequences that finished in it."""
        if self._inflight is not None:
            return self._advance()
        batch, is_prefill = self.scheduler.schedule()
        if not batch:
            return []
        if is_prefill:
            self._prefill(batch)
        elif self.config.speculative != "none":
            self._speculative_step(batch)
        else:
            self._inflight = self._launch(batch, [[s.last_token] for s in batch])
            return self._advance()
        return self.scheduler.finish_step(batch)

    # ---- steps ---------------------------------------------------------------------------------
    def _append(self, seq: Sequence, tokens: list[int], now: float) -> None:
        """Append generated tokens up to max_tokens and the first stop token; K/V is now in the
        cache for every position but the last."""
        for t in tokens:
            if seq.is_done():
                break
            seq.token_ids.append(int(t))
            seq.token_times.append(now)
        seq.num_cached = len(seq) - 1

    def _prefill(self, batch: list[Sequence]) -> None:
        self.stats.steps_prefill += 1
        chunks = [PrefillChunk(tokens=s.token_ids[s.num_cached:], start=s.num_cached,
                               context_slots=[self.blocks.slot(s, p) for p in range(len(s))]) for s in batch]
        logits = self.runner.prefill(chunks)
        if self.draft is not None:
            self.draft.prefill(chunks)
        temps = torch.tensor([s.params.temperature for s in batch], dtype=torch.float32, device=self.device)
        tokens = sample(probs(logits, temps), self.generator).tolist()
        now = time.perf_counter()
        for s, t in zip(batch, tokens):
            self._append(s, [t], now)

    def _inputs(self, batch: list[Sequence], first: list[int], count: int,
                tokens: list[list[int]] | torch.Tensor) -> StepInputs:
        """Step inputs for `count` positions per sequence starting at first[i]."""
        bs = self.config.block_size
        positions = np.asarray(first, dtype=np.int64)[:, None] + np.arange(count)
        c = int(positions.max()) + 1
        width = -(-c // bs)
        for s, f in zip(batch, first):
            if len(s.block_table) * bs < f + count:
                raise RuntimeError(f"internal: positions up to {f + count - 1} of a sequence with "
                                   f"{len(s.block_table)} blocks")
        table = np.array([(s.block_table + [s.block_table[-1]] * width)[:width] for s in batch], dtype=np.int64)
        context = (table[:, :, None] * bs + np.arange(bs)).reshape(len(batch), -1)[:, :c]
        slots = np.take_along_axis(context, positions, axis=1)
        temps = np.array([s.params.temperature for s in batch], dtype=np.float32)
        if not isinstance(tokens, torch.Tensor):
            tokens = np.array(tokens, dtype=np.int64).reshape(len(batch), count)
        return StepInputs(tokens, positions, slots, context, temps)

    # ---- decoding -----------------------------------------------------------------------------
    # A decode step is launched (_launch), then read back and accounted (_advance). With
    # async_decode, before step t's tokens are read back, step t + 1 is scheduled and launched
    # with them as input on the device (each sequence holds a placeholder for the unknown token
    # meanwhile); then step t's tokens are read and accounted. The host's work for one step thus
    # runs while the GPU computes the next. Step t + 1 is launched only when it is certain to
    # be a decode step of the same sequences that needs no preemption: nothing is waiting, no
    # sequence reaches max_tokens with step t's token and the free blocks cover every next
    # position. A sequence that stops on a stop token in step t has had step t + 1 computed for
    # nothing: its token is dropped, and the K/V that step wrote went to a block it just freed,
    # at a position no committed (shareable) block holds.
    def _launch(self, batch: list[Sequence], tokens) -> _InFlight:
        self.stats.steps_decode += 1
        self._account_kv()
        x = self._inputs(batch, [len(s) - 1 for s in batch], 1, tokens)
        _, new = self.target_step(x, self.generator)
        new = new[:, 0]
        if new.is_cuda:
            host = torch.empty(new.shape, dtype=new.dtype, pin_memory=True)
            host.copy_(new, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = new, None
        return _InFlight(batch, new, host, event)

    def _advance(self) -> list[Sequence]:
        cur, self._inflight = self._inflight, None
        batch = cur.batch
        pipelined = (self.config.async_decode and not self.scheduler.waiting
                     and len(batch) == len(self.scheduler.running)
                     and all(s.num_output + 1 < s.params.max_tokens for s in batch))
        if pipelined:
            for s in batch:
                s.token_ids.append(_PLACEHOLDER)
                s.num_cached = len(s) - 1
            if self.blocks.can_append_all(batch, 1):
                following, is_prefill = self.scheduler.schedule()
                assert not is_prefill and following == batch, "a pipelined step is the same decode batch"
                self._inflight = self._launch(batch, cur.tokens[:, None])
                self.stats.pipelined += 1
            else:
                for s in batch:
                    s.token_ids.pop()
                    s.num_cached = len(s) - 1
                pipelined = False
        if cur.event is not None:
            cur.event.synchronize()
        now = time.perf_counter()
        values = cur.host.tolist()
        if cur.rows is not None:
            values = [values[i] for i in cur.rows]
        for s, t in zip(batch, values):
            if pipelined:
                s.token_ids[-1] = int(t)
                s.token_times.append(now)
            else:
                self._append(s, [t], now)
        finished = self.scheduler.finish_step(batch)
        if self._inflight is not None and finished:
            # sequences that stopped in step t: step t + 1's rows for them are dropped
            keep = [i for i, s in enumerate(batch) if s.status is not Status.FINISHED]
            nxt = self._inflight
            index = torch.tensor(keep, dtype=torch.long, device=nxt.tokens.device)
            self._inflight = _InFlight([batch[i] for i in keep], nxt.tokens[index], nxt.host, nxt.event,
                                       keep) if keep else None
        return finished

    def _speculative_step(self, batch: list[Sequence]) -> None:
        self.stats.steps_decode += 1
        self._account_kv()
        k = self.config.num_draft
        if self.draft is None:
            drafts = []
            for s in batch:  # prompt lookup; a short proposal is padded (any token is a valid guess)
                d = propose_ngram(s.token_ids, k)
                drafts.append(d + [s.last_token] * (k - len(d)))
            draft_tokens, draft_p = torch.tensor(drafts, device=self.device), None
            tokens = [[s.last_token] + d for s, d in zip(batch, drafts)]
        else:
            draft_tokens, draft_p = self._draft(batch, k)
            tokens = torch.cat([torch.tensor([[s.last_token] for s in batch], device=self.device), draft_tokens], dim=1)
        x = self._inputs(batch, [len(s) - 1 for s in batch], k + 1, tokens)
        p, _ = self.target_step(x, draw=False)  # [B, k + 1, V]
        out, emitted = rejection_sample(p, draft_p, draft_tokens, self.generator)
        out, emitted = out.tolist(), emitted.tolist()
        now = time.perf_counter()
        for s, row, n in zip(batch, out, emitted):
            before = len(s)
            self._append(s, row[:n], now)
            self.blocks.truncate(s, len(s))
            self.stats.proposed += k
            self.stats.accepted += n - 1
            self.stats.verify_rows += 1
            self.stats.emitted += len(s) - before

    def _draft(self, batch: list[Sequence], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k draft tokens per sequence from the draft model and the distributions they were
        drawn from. Its first step re-reads the last two tokens: when the previous step accepted
        every draft, the draft model never saw the last one. (Position len - 2 may sit in a block
        shared through a common prefix; rewriting it touches only the draft's own cache, where a
        rounding difference can change a proposal but never an output.)"""
        # len >= 2 after prefill
        x = self._inputs(batch, [len(s) - 2 for s in batch], 2, [s.token_ids[-2:] for s in batch])
        p, d = self.draft_step(x, self.generator)
        # copies: a graphed step returns its graph's own outputs, which the next replay overwrites
        ps, ds = [p[:, 1].clone()], [d[:, 1].clone()]
        for i in range(1, k):
            x = self._inputs(batch, [len(s) + i - 1 for s in batch], 1, ds[-1][:, None])
            p, d = self.draft_step(x, self.generator)
            ps.append(p[:, 0].clone())
            ds.append(d[:, 0].clone())
        return torch.stack(ds, dim=1), torch.stack(ps, dim=1)

    def _account_kv(self) -> None:
        used, allocated = self.scheduler.kv_usage()
        self.stats.kv_used.append(used)
        self.stats.kv_allocated.append(allocated)
