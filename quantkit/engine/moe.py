"""The sparse MLP step of a mixture-of-experts layer: the model's router, then one matmul per expert
on the tokens routed to it (a grouped matmul in torch; no fused MoE kernel yet).

    _, w, idx = router(h)                     h [T, H]; w, idx [T, k]: each token's k experts and weights
    order = argsort(idx.flatten())            the T * k (token, choice) pairs, grouped by expert
    for each expert e with n_e > 0 pairs:     its slice of `order`: the tokens t and choices j routed to e
        y[t] += (w[t, j] * down_e(act(gate_e(h[t])) * up_e(h[t]))).to(y.dtype)
    y += sigmoid(shared_gate(h)) * shared(h)  (Qwen2-MoE's shared expert)

Experts are added in expert order for every token, as transformers' eager loop adds them, so a
float model's output is transformers' own. Each expert's gate and up run as one linear where they
can be fused (quantkit.engine.fusion), quantized or not. The slices' sizes are read on the host,
so a step with an MoE layer runs eagerly, never in a CUDA graph (Engine); `PATH` names this path
for `quantkit eval --speed`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from quantkit.engine.fusion import fuse
from quantkit.models.families import Family
from quantkit.models.moe import Experts

PATH = "torch grouped path (one matmul per expert on its routed tokens, sized on the host: no CUDA graph), no fused kernel"


@dataclass
class ExpertMLP:
    """One expert (or the shared expert) as the step calls it: gate/up fused when they can be."""

    module: nn.Module  # the expert's own module: its forward is down(act(gate(x)) * up(x))
    gate: nn.Module
    up: nn.Module
    down: nn.Module
    gate_up: tuple[nn.Module, list[int]] | None  # (gate and up fused, [I, I]), or None: they run apart


@dataclass
class MoEParts:
    """A sparse layer's modules as the step calls them."""

    router: nn.Module  # transformers' router: h [T, H] -> (logits, weights [T, k], experts [T, k])
    experts: list[ExpertMLP]
    shared: ExpertMLP | None
    shared_gate: nn.Module | None  # Linear [1, H]


def _expert_mlp(module: nn.Module, names: tuple[str, str, str]) -> ExpertMLP:
    gate, up, down = (module.get_submodule(n) for n in names)
    fused = fuse([gate, up])
    return ExpertMLP(module, gate, up, down, None if fused is None else (fused, [gate.out_features, up.out_features]))


def moe_parts(block: nn.Module, family: Family) -> MoEParts | None:
    """The block's sparse MLP (None for a dense block: Llama's MLP, or a Qwen-MoE dense layer)."""
    moe = family.moe
    try:
        experts = block.get_submodule(moe.experts) if moe is not None else None
    except AttributeError:  # a dense layer of an MoE model
        experts = None
    if not isinstance(experts, Experts):
        return None
    experts = [_expert_mlp(e, moe.expert_linears) for e in experts]
    shared = (_expert_mlp(block.get_submodule(moe.shared_expert), ("gate_proj", "up_proj", "down_proj"))
              if moe.shared_expert else None)
    shared_gate = block.get_submodule(moe.shared_expert_gate) if moe.shared_expert_gate else None
    return MoEParts(block.get_submodule(moe.router), experts, shared, shared_gate)


def _expert(e: ExpertMLP, x: torch.Tensor, act_mul: Callable | None) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) for x [n, H]."""
    if act_mul is None:  # an activation without an op: the expert's own forward
        return e.module(x)
    if e.gate_up is not None:
        module, sizes = e.gate_up
        return e.down(act_mul(*module(x).split(sizes, dim=-1)))
    return e.down(act_mul(e.gate(x), e.up(x)))


def moe_mlp(h: torch.Tensor, parts: MoEParts, act_mul: Callable | None) -> torch.Tensor:
    """The sparse MLP's output [T, H] for h [T, H] (the normed hidden states)."""
    _, weights, index = parts.router(h)  # [T, k] each
    k = index.shape[-1]
    order = index.reshape(-1).argsort(stable=True)  # (token, choice) pairs, by expert
    counts = torch.bincount(index.reshape(-1), minlength=len(parts.experts)).tolist()  # one host sync
    flat_weights = weights.reshape(-1)
    out = torch.zeros_like(h)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        token = pairs // k
        y = _expert(parts.experts[e], h[token], act_mul)
        out.index_add_(0, token, (y * flat_weights[pairs, None]).to(out.dtype))
    if parts.shared is not None:
        shared = _expert(parts.shared, h, act_mul)
        if parts.shared_gate is not None:
            shared = torch.sigmoid(parts.shared_gate(h)) * shared
        out = out + shared
    return out
