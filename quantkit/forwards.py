"""Running calibration batches through one decoder block: the mechanics under the driver.

    capture_block_inputs   the hidden states (and rotary, mask kwargs) that reach block 0
    observe                the batches through a block, each linear group's input handed
                           to the observers by forward pre-hooks; each forward stops as
                           soon as the last group's input is seen
    propagate              the batches through a block, its outputs kept as the next
                           block's inputs

With a ReplayCache (quantkit.replay), sub-modules whose output is already
final are replayed instead of recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.algorithms import Observer
from quantkit.algorithms.folding import Target
from quantkit.errors import NumericalError
from quantkit.formats.finite import all_finite
from quantkit.models import LoadedModel
from quantkit.replay import ReplayCache


@dataclass
class BlockInput:
    hidden: torch.Tensor  # [batch, seq, hidden]
    kwargs: dict


class _InputsCaptured(Exception):
    """Raised by the block-0 hook to stop the forward once its inputs are saved."""


def block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def blocks_of(loaded: LoadedModel) -> torch.nn.ModuleList:
    return loaded.model.get_submodule(loaded.family.blocks)


def _cast(obj, dtype: torch.dtype):
    """Floating tensors (hidden states, rotary cos/sin, float masks) to `dtype`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


@torch.inference_mode()
def capture_block_inputs(
    loaded: LoadedModel, input_ids: torch.Tensor, device, batch_size: int, dtype: torch.dtype | None = None
) -> list[BlockInput]:
    """Run the model up to block 0 for each batch of `input_ids` [n, seq];
    floating inputs are cast to `dtype` (the calibration forwards' dtype)."""
    model, family = loaded.model, loaded.family
    blocks = blocks_of(loaded)
    captured: list[BlockInput] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        if dtype is not None:
            hidden, kwargs = _cast(hidden, dtype), _cast(kwargs, dtype)
        captured.append(BlockInput(hidden, kwargs))
        raise _InputsCaptured

    outer = [family.embed] + ([family.rotary] if family.rotary else [])
    for name in outer:
        model.get_submodule(name).to(device)
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[start : start + batch_size].to(device), use_cache=False)
            except _InputsCaptured:
                pass
    finally:
        handle.remove()
        for name in outer:
            model.get_submodule(name).to("cpu")
    return captured


def check_finite(t: torch.Tensor, what: str) -> None:
    if not all_finite(t):
        raise NumericalError(f"{what} contains NaN or Inf; refusing to quantize")


class StopBlock(Exception):
    """Raised by an observer hook once the inputs it needs are seen: the rest
    of the block's forward would be wasted work."""


def replay_cache(block, targets: list[Target], family) -> ReplayCache:
    """Candidates: every target linear, and the family's replay modules (norms,
    self_attn, mlp), each with the target linears its output depends on."""
    members = {t.rel: {t.rel} for t in targets}
    for module, prefixes in family.replay_modules:
        members[module] = {t.rel for t in targets if t.rel.startswith(prefixes)} if prefixes else set()
    return ReplayCache(block, members, dict(family.replay_tails))


def run_batches(block, inputs: list[BlockInput], replay: ReplayCache | None, final: set[str], keep: bool) -> list[BlockInput]:
    """One pass of the calibration batches through `block`; outputs kept when `keep`."""
    outputs = []
    if replay is not None:
        replay.start_pass(final)
    try:
        for b, item in enumerate(inputs):
            if replay is not None:
                replay.batch = b
            try:
                out = block(item.hidden, **item.kwargs)
                if keep:
                    outputs.append(BlockInput(block_output(out), item.kwargs))
            except StopBlock:
                pass
    finally:
        if replay is not None:
            replay.end_pass(len(inputs))
    return outputs


@torch.inference_mode()
def observe(block, inputs: list[BlockInput], groups: list[list[Target]], observers: list[Observer],
             replay: ReplayCache | None, final: set[str]) -> None:
    """Run the calibration batches through `block`, handing each group's input
    to the observers; each forward ends once the last group's input is seen."""
    last = groups[-1][0].name
    # end the forward at the last group's input, or, where the replay cache can
    # then rebuild the module around it from its recorded input, after that module
    stop_after = replay.stop_after(groups[-1][0].rel, final) if replay is not None else None

    def make_hook(group: list[Target]):  # hooks go on `block`'s own linears (it may be a copy)
        names = tuple(t.name for t in group)

        def hook(_module, args):
            x = args[0]
            check_finite(x, f"the calibration input of {names[0]}")
            x = x.reshape(-1, x.shape[-1])
            for observer in observers:
                observer.observe(names, x)
            if names[0] == last and stop_after is None:
                raise StopBlock

        return hook

    def stop(*_):
        raise StopBlock

    handles = [block.get_submodule(g[0].rel).register_forward_pre_hook(make_hook(g)) for g in groups]
    if stop_after is not None:
        handles.append(block.get_submodule(stop_after).register_forward_hook(stop))
    try:
        run_batches(block, inputs, replay, final, keep=False)
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def propagate(block, inputs: list[BlockInput], replay: ReplayCache | None, final: set[str]) -> list[BlockInput]:
    return run_batches(block, inputs, replay, final, keep=True)
