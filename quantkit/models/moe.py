"""Mixture-of-experts layers as ordinary linears: transformers 5's fused experts module, replaced at load.

transformers 5 keeps a sparse layer's experts as two 3D parameters:

    experts.gate_up_proj  [E, 2I, H]   expert e's gate rows (0..I-1), then its up rows (I..2I-1)
    experts.down_proj     [E, H, I]

Every quantkit pass works on nn.Linear modules (the observers' hooks, GPTQ, AWQ's folding, the
writer, the reader's quantized modules, the engine), so `unfuse_experts` replaces each such module
by `Experts`: a ModuleList of `Expert`, each holding its three nn.Linear under the family's names
(quantkit.models.families.MoE.expert_linears). The sparse block around it (the router, the shared
expert) stays transformers' own, so the routing is the model's by construction; Experts.forward
takes the arguments of the module it replaces and computes what transformers' eager loop computes,
in the same order and dtypes:

    out = 0;  for each expert e, in order:   out[t] += (w[t, j] * down_e(act(gate_e(x_t)) * up_e(x_t))).to(out.dtype)
                                             for every token t whose j-th choice is e

Two switches serve calibration (quantkit.experts, set through `watching`):
  observe_all  the experts in this set run on every token, so observer hooks on their linears see
               every calibration token; their output keeps the routed rows only, so the block
               still computes its routed output;
  routed       a tensor [E]: the tokens routed to each expert are added to it, every forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from quantkit.errors import UnsupportedModelError
from quantkit.models.families import Family, sparse_layers


class Expert(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), its linears under the family's names."""

    def __init__(self, names: tuple[str, str, str], hidden: int, width: int, act_fn: nn.Module,
                 dtype: torch.dtype, device: torch.device | str | None) -> None:
        super().__init__()
        self.names = names
        gate, up, down = names
        for name, (n_in, n_out) in ((gate, (hidden, width)), (up, (hidden, width)), (down, (width, hidden))):
            setattr(self, name, nn.Linear(n_in, n_out, bias=False, dtype=dtype, device=device))
        self.act_fn = act_fn

    def linears(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(gate, up, down): nn.Linear, or the reader's quantized modules in their place."""
        return tuple(getattr(self, n) for n in self.names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.linears()
        return down(self.act_fn(gate(x)) * up(x))


class Experts(nn.ModuleList):
    """The routed experts of one sparse layer, in place of transformers' fused module."""

    def __init__(self, experts: Iterable[Expert]) -> None:
        super().__init__(experts)
        self.observe_all: frozenset[int] = frozenset()  # calibration: run these on every token
        self.routed: torch.Tensor | None = None  # calibration: [E] int64, tokens routed to each expert

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H]; top_k_index [T, k] the experts each token goes to; top_k_weights
        [T, k] their weights (float32 for Mixtral, the model's dtype for Qwen). Returns [T, H]."""
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)  # the tokens routed to e, and which of their k choices e is
            if self.routed is not None:
                self.routed[e] += token.numel()
            if e in self.observe_all:
                y = expert(hidden_states)[token]  # every token seen, the routed rows kept
            elif token.numel():
                y = expert(hidden_states[token])
            else:
                continue
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def _fused_weights(fused: nn.Module, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up_proj [E, 2I, H], down_proj [E, H, I]) of transformers' fused experts module, checked."""
    gate_up, down = getattr(fused, "gate_up_proj", None), getattr(fused, "down_proj", None)
    layout_flags = [f for f in ("is_transposed", "has_bias") if getattr(fused, f, False)]
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or layout_flags \
            or not getattr(fused, "is_concatenated", True):
        raise UnsupportedModelError(
            f"{where} ({type(fused).__name__}) is not transformers' fused experts layout quantkit reads "
            f"(gate_up_proj [E, 2I, H] with gate rows then up rows, down_proj [E, H, I], no bias)")
    e, two_i, h = gate_up.shape
    if two_i % 2 or tuple(down.shape) != (e, h, two_i // 2):
        raise UnsupportedModelError(f"{where}: gate_up_proj {list(gate_up.shape)} and down_proj {list(down.shape)} "
                                    f"are not [E, 2I, H] and [E, H, I]")
    return gate_up, down


def unfuse(fused: nn.Module, names: tuple[str, str, str], where: str) -> Experts:
    """An Experts module computing what `fused` computes, each expert's weights copied out of it."""
    gate_up, down = _fused_weights(fused, where)
    n, two_i, hidden = gate_up.shape
    width = two_i // 2
    meta = gate_up.device.type == "meta"
    experts = []
    for e in range(n):
        expert = Expert(names, hidden, width, fused.act_fn, gate_up.dtype, gate_up.device)
        if not meta:
            gate, up, down_proj = expert.linears()
            with torch.no_grad():
                gate.weight.copy_(gate_up[e, :width])
                up.weight.copy_(gate_up[e, width:])
                down_proj.weight.copy_(down[e])
        experts.append(expert.requires_grad_(gate_up.requires_grad))
    return Experts(experts)


def unfuse_experts(model: nn.Module, family: Family) -> nn.Module:
    """Replace every sparse layer's fused experts module (family.moe.experts) by an Experts of
    per-expert linears, in place (a model already unfused is left as it is). Returns the model."""
    if family.moe is None:
        return model
    blocks = model.get_submodule(family.blocks)
    parent_name, _, child = family.moe.experts.rpartition(".")
    for i, sparse in enumerate(sparse_layers(model.config, family)):
        if not sparse:
            continue
        parent = blocks[i].get_submodule(parent_name)
        fused = getattr(parent, child)
        if not isinstance(fused, Experts):
            setattr(parent, child, unfuse(fused, family.moe.expert_linears, f"{family.blocks}.{i}.{family.moe.experts}"))
    return model


def experts_in(module: nn.Module) -> list[Experts]:
    return [m for m in module.modules() if isinstance(m, Experts)]


@contextlib.contextmanager
def watching(block: nn.Module, observe_all: Iterable[int] = ()) -> Iterator[torch.Tensor | None]:
    """Within: the experts of `block` in `observe_all` run on every token, and the tokens routed to
    each expert are counted into the tensor yielded ([E] int64; None for a block without experts)."""
    found = experts_in(block)
    if not found:
        yield None
        return
    (experts,) = found  # one sparse MLP per block
    routed = torch.zeros(len(experts), dtype=torch.int64)
    experts.observe_all, experts.routed = frozenset(observe_all), routed
    try:
        yield routed
    finally:
        experts.observe_all, experts.routed = frozenset(), None
