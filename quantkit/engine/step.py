"""The decode step: the model forward of S tokens for each of B sequences, the distributions
to sample from and one sampled token per position, eager or as a CUDA graph.

    step = GraphedDecode(runner, scratch_slot, context_buckets)   # or DecodeStep(runner, scratch_slot)
    p, tokens = step(StepInputs(...), generator, draw=True)       # [B, S, V], [B, S]

A step's host inputs (token ids, positions, cache slots, the context's slots, temperatures) are
packed into one pinned buffer and reach the GPU in one copy. The graphed step captures the
forward, the temperature (quantkit.engine.sampler.probs) and the exponential race that samples
(quantkit.engine.sampler.race) once per (batch bucket, S, context bucket); only the race's
random numbers are drawn outside it, by the caller's generator, and only when asked to (`draw`)
and a row samples (temperature > 0: a greedy row's race needs none). A step launched from Python
is some 30 small kernels besides the model; in the graph they cost what they compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from quantkit.engine.block_manager import DROPPED
from quantkit.engine.sampler import probs, race
from quantkit.engine.sequence import Sequence

if TYPE_CHECKING:
    from quantkit.engine.runner import ModelRunner

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def bucket(n: int, buckets) -> int | None:
    """The smallest bucket that holds n, None past the largest."""
    for b in buckets:
        if b >= n:
            return b
    return None


@dataclass
class StepInputs:
    """One decode step's inputs for B sequences of S tokens: tokens [B, S] (host ids, or a tensor
    on the model's device, e.g. a draft model's previous samples), positions and cache slots
    [B, S], context [B, C] (the slots of positions 0 .. C - 1 of each sequence; entries past a
    sequence's length are never read), temperature [B]."""

    tokens: np.ndarray | torch.Tensor
    positions: np.ndarray
    slots: np.ndarray
    context: np.ndarray
    temperature: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.positions.shape, self.context.shape[1])

    def samples(self) -> bool:
        return bool((self.temperature > 0).any())


def step_inputs(batch: list[Sequence], first: list[int], count: int, tokens: list[list[int]] | torch.Tensor,
                block_size: int) -> StepInputs:
    """The inputs of a step over `count` positions per sequence, first[i] .. first[i] + count - 1
    for batch[i], whose block tables must cover them. tokens: [B][count] host ids, or a [B, count]
    tensor on the model's device."""
    bs = block_size
    positions = np.asarray(first, dtype=np.int64)[:, None] + np.arange(count)
    c = int(positions.max()) + 1
    width = -(-c // bs)
    for s, f in zip(batch, first):
        if len(s.block_table) * bs < f + count:
            raise RuntimeError(f"internal: positions up to {f + count - 1} of a sequence with "
                               f"{len(s.block_table)} blocks")
    # a table shorter than the widest is padded with its last block: those context entries lie
    # past the sequence's length and are never read; a dropped block (BlockManager.drop_before:
    # outside every layer's window) reads block 0, which the window masks
    table = np.array([(s.block_table + [s.block_table[-1]] * width)[:width] for s in batch], dtype=np.int64)
    table[table == DROPPED] = 0
    context = (table[:, :, None] * bs + np.arange(bs)).reshape(len(batch), -1)[:, :c]
    slots = np.take_along_axis(context, positions, axis=1)
    temps = np.array([s.params.temperature for s in batch], dtype=np.float32)
    if not isinstance(tokens, torch.Tensor):
        tokens = np.array(tokens, dtype=np.int64).reshape(len(batch), count)
    return StepInputs(tokens, positions, slots, context, temps)


class InputBuffers:
    """The device tensors of one step shape (B, S, C): views of one int64 buffer, filled from a
    host twin in one copy. Rows past the step's own (padding up to a graph's bucket) read and
    write only the scratch slot."""

    def __init__(self, b: int, s: int, c: int, device: torch.device, scratch: int):
        self.shape, self.scratch, self.device = (b, s, c), scratch, device
        self.size = 3 * b * s + b * c + b
        self.dev = torch.empty(self.size, dtype=torch.int64, device=device)
        self.tokens, self.positions, self.slots, self.context, self.temperature = self._views(self.dev, torch)

    def _views(self, buf, lib):
        b, s, c = self.shape
        n = b * s
        parts = [buf[i * n:(i + 1) * n].reshape(b, s) for i in range(3)]
        parts.append(buf[3 * n:3 * n + b * c].reshape(b, c))
        parts.append(buf[3 * n + b * c:].view(lib.float32)[:b])  # [b] float32 inside b int64 entries
        return parts

    def fill(self, x: StepInputs) -> None:
        on_gpu = self.device.type == "cuda"
        # a fresh pinned twin per fill: PyTorch's host allocator reuses it only after its copy ran
        host = torch.empty(self.size, dtype=torch.int64, pin_memory=True) if on_gpu else self.dev
        tokens, positions, slots, context, temperature = self._views(host.numpy(), np)
        n, s, c = x.shape
        host_tokens = isinstance(x.tokens, np.ndarray)
        tokens[:n] = x.tokens if host_tokens else 0
        positions[:n], slots[:n] = x.positions, x.slots
        context[:n, :c] = x.context
        context[:n, c:] = self.scratch
        temperature[:n] = x.temperature
        tokens[n:], positions[n:], slots[n:], context[n:], temperature[n:] = 0, 0, self.scratch, self.scratch, 0.0
        if on_gpu:
            self.dev.copy_(host, non_blocking=True)
        if not host_tokens:
            self.tokens[:n].copy_(x.tokens)


def _sample_step(runner: ModelRunner, buf: InputBuffers, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = runner.decode(buf.tokens, buf.positions, buf.slots, buf.context)
    p = probs(logits, buf.temperature)
    return p, race(p, noise)


class DecodeStep:
    """The step run eagerly (CPU, or a GPU without graphs)."""

    def __init__(self, runner: ModelRunner, scratch_slot: int):
        self.runner, self.scratch = runner, scratch_slot

    def __call__(self, x: StepInputs, generator: torch.Generator | None = None,
                 draw: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(distributions [B, S, V] float32, sampled tokens [B, S] int64); without `draw` (the
        caller samples from the distributions itself) the tokens are the argmax."""
        buf = InputBuffers(*x.shape, self.runner.device, self.scratch)
        buf.fill(x)
        noise = torch.ones(*x.shape[:2], self.runner.config.vocab_size, device=self.runner.device)
        if draw and x.samples():
            noise.exponential_(generator=generator)
        return _sample_step(self.runner, buf, noise)


class GraphedDecode(DecodeStep):
    """The step as CUDA graphs, one per (batch bucket, S, context bucket); larger batches than the
    largest bucket run eagerly. The tensors a call returns are the graph's own outputs: the next
    replay of the same graph overwrites them (a caller keeping them across steps copies them)."""

    def __init__(self, runner: ModelRunner, scratch_slot: int, context_buckets: tuple[int, ...]):
        super().__init__(runner, scratch_slot)
        self.context_buckets = context_buckets
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, InputBuffers, torch.Tensor, tuple]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def _capture(self, b: int, s: int, c: int):
        buf = InputBuffers(b, s, c, self.runner.device, self.scratch)
        buf.fill(StepInputs(np.zeros((0, s), np.int64), np.zeros((0, s), np.int64), np.zeros((0, s), np.int64),
                            np.zeros((0, c), np.int64), np.zeros(0, np.float32)))
        noise = torch.ones(b, s, self.runner.config.vocab_size, device=self.runner.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: lazy initialisation, kernel compilation, allocator
                _sample_step(self.runner, buf, noise)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = _sample_step(self.runner, buf, noise)
        return graph, buf, noise, out

    def __call__(self, x: StepInputs, generator: torch.Generator | None = None,
                 draw: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        n, s, c = x.shape
        b, cb = bucket(n, BATCH_BUCKETS), bucket(c, self.context_buckets)
        if b is None or cb is None:
            return super().__call__(x, generator, draw)
        key = (b, s, cb)
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        graph, buf, noise, (p, tokens) = self.graphs[key]
        buf.fill(x)
        if draw and x.samples():
            noise[:n].exponential_(generator=generator)
        graph.replay()
        return p[:n], tokens[:n]
