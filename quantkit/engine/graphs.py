"""CUDA graphs for the decode step: one graph per (batch bucket, tokens per row, context bucket).

A decode step is dozens of small kernels per layer; launched one by one from Python they cost
more than they compute at small batch. Each graph is captured once on static input buffers;
a step copies its inputs into the buffers of the smallest bucket that holds it (padding rows
write to a scratch slot and are ignored) and replays.
"""

from __future__ import annotations

import torch

from quantkit.engine.runner import ModelRunner

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def bucket(n: int, buckets) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} is past the largest bucket {buckets[-1]}")


class GraphedDecode:
    def __init__(self, runner: ModelRunner, scratch_slot: int, context_buckets: tuple[int, ...]):
        self.runner = runner
        self.scratch = scratch_slot
        self.context_buckets = context_buckets
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def _capture(self, b: int, s: int, c: int):
        dev = self.runner.device
        tokens = torch.zeros(b, s, dtype=torch.long, device=dev)
        positions = torch.zeros(b, s, dtype=torch.long, device=dev)
        slots = torch.full((b, s), self.scratch, dtype=torch.long, device=dev)
        context = torch.full((b, c), self.scratch, dtype=torch.long, device=dev)
        inputs = (tokens, positions, slots, context)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: lazy initialisation, kernel compilation, allocator
                self.runner.decode(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.runner.decode(*inputs)
        return graph, inputs, out

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 context: torch.Tensor) -> torch.Tensor:
        n, s = tokens.shape
        b = bucket(n, BATCH_BUCKETS)
        c = bucket(context.shape[1], self.context_buckets)
        key = (b, s, c)
        if key not in self.graphs:
            self.graphs[key] = self._capture(b, s, c)
        graph, (tk, ps, sl, cx), out = self.graphs[key]
        tk.zero_()
        ps.zero_()
        sl.fill_(self.scratch)
        cx.fill_(self.scratch)
        tk[:n], ps[:n], sl[:n] = tokens, positions, slots
        cx[:n, :context.shape[1]] = context
        graph.replay()
        return out[:n]
