"""The engine loop: schedule, run the model (and a draft), sample, hand the tokens back.

    engine = Engine(target, EngineConfig(speculative="ngram"))
    done = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=32))

Each step is either a prefill (new or preempted sequences) or a decode of every running
sequence; with speculative decoding a decode step verifies k proposed tokens per sequence in
one target forward (quantkit.engine.speculative). The engine owns the models, their steps and
the metrics; the scheduler owns the sequences: it picks each step's batch and takes the sampled
tokens back (Scheduler.postprocess), and the engine never edits a sequence or a queue itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from quantkit.engine.block_manager import BlockManager
from quantkit.engine.config import EngineConfig
from quantkit.engine.layers import ModelFacts, model_facts, rope_context_limit
from quantkit.engine.runner import ModelRunner, PrefillChunk, Shape
from quantkit.engine.sampler import probs, sample
from quantkit.engine.scheduler import Scheduler
from quantkit.engine.sequence import SamplingParams, Sequence, Status
from quantkit.engine.speculative import Speculator
from quantkit.engine.step import DecodeStep, GraphedDecode, StepInputs, step_inputs
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


def _check_context(loaded: LoadedModel, facts: ModelFacts, config: EngineConfig) -> None:
    """Refuse a context the engine would compute differently from transformers."""
    window = facts.undeclared_window
    if window is not None and config.max_model_len > window:
        raise ValueError(f"{loaded.source} has a sliding window of {window} tokens that its config class does not "
                         f"declare: its attention does not slide, while transformers' cache keeps only the window, "
                         f"which this engine does not reproduce; set max_model_len <= {window} "
                         f"(got {config.max_model_len})")
    limit = rope_context_limit(loaded.model.config)
    longest = config.max_model_len + config.lookahead  # draft tokens sit past the sequence
    if limit is not None and longest > limit[0]:
        raise ValueError(f"{loaded.source}'s {limit[1]} RoPE changes its frequencies past {limit[0]} positions, by the "
                         f"longest sequence of each forward, which this engine's batches cannot reproduce; set "
                         f"max_model_len <= {limit[0] - config.lookahead} (got {config.max_model_len})")


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

    def read(self) -> list[int]:
        """The sampled tokens, one per sequence of batch; waits for the copy."""
        if self.event is not None:
            self.event.synchronize()
        values = self.host.tolist()
        return values if self.rows is None else [values[i] for i in self.rows]

    def without_finished(self) -> _InFlight | None:
        """This step less the rows of sequences that finished before it was read (None: no row left)."""
        keep = [i for i, s in enumerate(self.batch) if s.status is not Status.FINISHED]
        if not keep:
            return None
        index = torch.tensor(keep, dtype=torch.long, device=self.tokens.device)
        rows = keep if self.rows is None else [self.rows[i] for i in keep]
        return _InFlight([self.batch[i] for i in keep], self.tokens[index], self.host, self.event, rows)


class Engine:
    def __init__(self, target: LoadedModel, config: EngineConfig = EngineConfig(), draft: LoadedModel | None = None):
        if config.speculative == "draft" and draft is None:
            raise ValueError('speculative="draft" needs a draft model')
        if draft is not None and draft.model.config.vocab_size != target.model.config.vocab_size:
            raise ValueError(f"the draft's vocabulary ({draft.model.config.vocab_size}) differs from the target's "
                             f"({target.model.config.vocab_size})")
        self.config = config
        models = [target] + ([draft] if config.speculative == "draft" else [])
        facts = [model_facts(m.model, m.family) for m in models]
        for m, f in zip(models, facts):
            _check_context(m, f, config)
        self.vocab = target.model.config.vocab_size
        device = target.model.get_submodule(target.family.embed).weight.device
        dtype = target.model.get_submodule(target.family.embed).weight.dtype
        kv_dtype = config.kv_dtype(dtype)
        blocks = kv_blocks_for(config, [Shape.of(m.model.config) for m in models], kv_dtype, device)
        slots = (blocks + 1) * config.block_size  # one spare block: the scratch slot padding rows write to
        self.blocks = BlockManager(blocks, config.block_size)
        # KV blocks out of every layer's window can go only when every model sharing the block tables slides
        windows = [f.kv_window for f in facts]
        kv_window = None if None in windows else max(windows)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_batched_tokens, config.lookahead,
                                   kv_window)
        positions = config.max_model_len + config.lookahead  # the rotary rows: draft tokens sit past the sequence
        self.runner = ModelRunner(target.model, target.family, slots, positions, kv_dtype)
        self.device = device
        self.scratch = blocks * config.block_size
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self._inflight: _InFlight | None = None  # the launched decode step not yet read (async_decode)
        self.stats = Stats()
        # the decode step of the target and the draft: graphed on a GPU
        if config.cuda_graphs and device.type == "cuda":
            contexts = tuple(c for c in (128, 256, 512, 1024, 2048, 4096, 8192, 16384) if c < config.max_model_len)
            contexts += (config.max_model_len + config.lookahead + 1,)
            make = lambda runner: (GraphedDecode(runner, self.scratch, contexts) if runner.graphable  # noqa: E731
                                   else DecodeStep(runner, self.scratch))  # MoE layers: eager (quantkit.engine.moe)
        else:
            make = lambda runner: DecodeStep(runner, self.scratch)  # noqa: E731
        self.target_step = make(self.runner)
        self.speculator: Speculator | None = None
        if config.speculative != "none":
            runner = None
            if config.speculative == "draft":
                draft_dtype = draft.model.get_submodule(draft.family.embed).weight.dtype
                runner = ModelRunner(draft.model, draft.family, slots, positions, config.kv_dtype(draft_dtype))
            self.speculator = Speculator(config.num_draft, config.block_size, self.generator, device,
                                         runner, make(runner) if runner is not None else None)

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
            return self._prefill(batch)
        if self.speculator is not None:
            return self._speculative_step(batch)
        self._inflight = self._launch(batch, [[s.last_token] for s in batch])
        return self._advance()

    # ---- steps ---------------------------------------------------------------------------------
    def _prefill(self, batch: list[Sequence]) -> list[Sequence]:
        self.stats.steps_prefill += 1
        chunks = [PrefillChunk(tokens=s.token_ids[s.num_cached:], start=s.num_cached,
                               context_slots=[self.blocks.slot(s, p) for p in range(len(s))]) for s in batch]
        logits = self.runner.prefill(chunks)
        if self.speculator is not None:
            self.speculator.prefill(chunks)
        temps = torch.tensor([s.params.temperature for s in batch], dtype=torch.float32, device=self.device)
        tokens = sample(probs(logits, temps), self.generator).tolist()
        return self.scheduler.postprocess(batch, [[t] for t in tokens], time.perf_counter())

    def _inputs(self, batch: list[Sequence], first: list[int], count: int,
                tokens: list[list[int]] | torch.Tensor) -> StepInputs:
        """Step inputs for `count` positions per sequence starting at first[i]."""
        return step_inputs(batch, first, count, tokens, self.config.block_size)

    def _speculative_step(self, batch: list[Sequence]) -> list[Sequence]:
        self._count_decode_step()
        before = [len(s) for s in batch]
        verified = self.speculator.verify(batch, self.target_step)
        finished = self.scheduler.postprocess(batch, verified, time.perf_counter())
        self.speculator.count(self.stats, verified, [len(s) - n for s, n in zip(batch, before)])
        return finished

    # ---- plain decoding, asynchronous ----------------------------------------------------------
    # A decode step is launched (_launch), then read back and handed to the scheduler (_advance).
    # With async_decode, before step t's tokens are read back, step t + 1 is scheduled and launched
    # with them as input on the device (Scheduler.defer_tokens says when that is safe and holds a
    # placeholder for each unread token); then step t's tokens are read and postprocessed. The
    # host's work for one step thus runs while the GPU computes the next. Rows of step t + 1 whose
    # sequences stopped in step t are dropped: their tokens are never read.
    def _launch(self, batch: list[Sequence], tokens) -> _InFlight:
        self._count_decode_step()
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
        if self.config.async_decode and self.scheduler.defer_tokens(cur.batch):
            following, is_prefill = self.scheduler.schedule()
            assert not is_prefill and following == cur.batch, "a pipelined step is the same decode batch"
            self._inflight = self._launch(cur.batch, cur.tokens[:, None])
            self.stats.pipelined += 1
        tokens = cur.read()
        finished = self.scheduler.postprocess(cur.batch, [[t] for t in tokens], time.perf_counter())
        if self._inflight is not None and finished:
            self._inflight = self._inflight.without_finished()
        return finished

    def _count_decode_step(self) -> None:
        self.stats.steps_decode += 1
        used, allocated = self.scheduler.kv_usage()
        self.stats.kv_used.append(used)
        self.stats.kv_allocated.append(allocated)
