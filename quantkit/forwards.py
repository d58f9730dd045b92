"""Running calibration batches through one decoder block: the mechanics under the driver.

    capture_block_inputs   the hidden states that reach block 0, and the keyword arguments
                           (attention mask, rotary cos/sin) of each attention type's blocks
    observe                the batches through a block, each linear group's input handed
                           to the observers by forward pre-hooks; each forward stops as
                           soon as the last group's input is seen
    propagate              the batches through a block, its outputs kept as the next
                           block's inputs

With a ReplayCache (quantkit.replay), sub-modules whose output is already
final are replayed instead of recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quantkit.algorithms import Observer
from quantkit.algorithms.folding import Target
from quantkit.errors import NumericalError
from quantkit.experts import expert_index
from quantkit.formats.finite import all_finite
from quantkit.models import LoadedModel
from quantkit.models.families import layer_types
from quantkit.replay import ReplayCache


@dataclass
class BlockInput:
    """One calibration batch on its way through the blocks.

    The model computes the attention masks and rotary cos/sin once, before its
    first block, and hands each block those of its attention type: a sliding-window
    layer gets the windowed mask (Gemma 2 / 3, Qwen2 with max_window_layers) and,
    in Gemma 3, the cos/sin of its own rotary base. So they are captured per type
    (config.layer_types) and each block is given its type's."""

    hidden: torch.Tensor  # [batch, seq, hidden]
    kwargs: dict  # block 0's keyword arguments
    by_type: dict[str, dict] = field(default_factory=dict)  # attention type -> its blocks' keyword arguments

    def kwargs_for(self, layer_type: str | None) -> dict:
        return self.by_type.get(layer_type, self.kwargs) if layer_type is not None else self.kwargs


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


def _pass_through(hidden_states, *args, **kwargs):
    return hidden_states


@torch.inference_mode()
def capture_block_inputs(
    loaded: LoadedModel, input_ids: torch.Tensor, device, batch_size: int, dtype: torch.dtype | None = None
) -> list[BlockInput]:
    """Run the model up to block 0 for each batch of `input_ids` [n, seq], and on
    to the first block of every other attention type for that type's keyword
    arguments (the blocks in between pass their input through unchanged, without
    computing: only the arguments the model prepared before its first block are
    wanted); floating inputs are cast to `dtype` (the calibration forwards' dtype)."""
    model, family = loaded.model, loaded.family
    blocks = blocks_of(loaded)
    types = layer_types(model.config)
    firsts = {t: types.index(t) for t in dict.fromkeys(types)}  # attention type -> its first block
    last = max(firsts.values())
    captured: list[BlockInput] = []
    batch: dict = {}

    def make_hook(index: int, layer_type: str):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if dtype is not None:
                hidden, kwargs = _cast(hidden, dtype), _cast(kwargs, dtype)
            if index == 0:
                batch["hidden"], batch["kwargs"] = hidden, kwargs
            batch.setdefault("by_type", {})[layer_type] = kwargs
            if index == last:
                captured.append(BlockInput(batch["hidden"], batch["kwargs"], batch["by_type"]))
                batch.clear()
                raise _InputsCaptured

        return hook

    outer = [family.embed] + ([family.rotary] if family.rotary else [])
    for name in outer:
        model.get_submodule(name).to(device)
    handles = [blocks[i].register_forward_pre_hook(make_hook(i, t), with_kwargs=True) for t, i in firsts.items()]
    for i in range(last):  # an instance attribute shadows the class's forward
        blocks[i].forward = _pass_through
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[start : start + batch_size].to(device), use_cache=False)
            except _InputsCaptured:
                pass
    finally:
        for handle in handles:
            handle.remove()
        for i in range(last):
            blocks[i].__dict__.pop("forward", None)
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
    self_attn, mlp, each expert), each with the target linears its output depends on.
    An expert's linears are replayed with their expert, never alone: while their
    expert's stage is observed on every token (quantkit.experts) they run on other
    rows than when routed, and a recording of one would not fit the other."""
    members = {t.rel: {t.rel} for t in targets if expert_index(family, t.rel) is None}
    for module, prefixes in family.replay_modules:
        members[module] = {t.rel for t in targets if t.rel.startswith(prefixes)} if prefixes else set()
    return ReplayCache(block, members, dict(family.replay_tails))


def run_batches(block, inputs: list[BlockInput], replay: ReplayCache | None, final: set[str], keep: bool,
                layer_type: str | None = None) -> list[BlockInput]:
    """One pass of the calibration batches through `block` (of attention type
    `layer_type`; None: block 0's); outputs kept when `keep`."""
    outputs = []
    if replay is not None:
        replay.start_pass(final)
    try:
        for b, item in enumerate(inputs):
            if replay is not None:
                replay.batch = b
            try:
                out = block(item.hidden, **item.kwargs_for(layer_type))
                if keep:
                    outputs.append(BlockInput(block_output(out), item.kwargs, item.by_type))
            except StopBlock:
                pass
    finally:
        if replay is not None:
            replay.end_pass(len(inputs))
    return outputs


@torch.inference_mode()
def observe(block, inputs: list[BlockInput], groups: list[list[Target]], observers: list[Observer],
            replay: ReplayCache | None, final: set[str], layer_type: str | None = None) -> None:
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
        run_batches(block, inputs, replay, final, keep=False, layer_type=layer_type)
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def propagate(block, inputs: list[BlockInput], replay: ReplayCache | None, final: set[str],
              layer_type: str | None = None) -> list[BlockInput]:
    return run_batches(block, inputs, replay, final, keep=True, layer_type=layer_type)
