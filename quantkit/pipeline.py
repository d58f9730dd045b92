"""THE block-by-block driver: onload, observe, quantize, propagate. It walks; nothing else.

    capture the inputs of block 0 (only when some step observes activations), and
      the mask and rotary arguments of each attention type's blocks
    for each decoder block:
        move it to the device
        transforms: run the float block, fold their scales in, clip
          (quantkit.algorithms.folding)
        for each input group (all at once, or one after another when the
        rounding is true-sequential): run the calibration batches with the
        observers on the group's linears, round the group, write the
        dequantized weights back (and, W8A8, quantize the linears' inputs from
        then on), so later groups and blocks see what the quantized model computes
        recompute the block's outputs as the next block's inputs
        move it back

What it finds per linear goes into LinearResults; the report rows and byte
counts are the checkpoint's business (quantkit.checkpoint.report), progress is
a callback (quantkit.progress), the dtype choice is the hardware's
(quantkit.devices).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from quantkit.algorithms import Chain, Observer, Transform, build_all
from quantkit.algorithms.folding import Target, apply_transforms
from quantkit.algorithms.inputs import InputRanges, input_facts, input_quantizer
from quantkit.devices import calibration_dtype
from quantkit.formats import ActSpec, FloatSpec, IntSpec, QuantizedWeight
from quantkit.heldout import HeldOutResult, perplexity_of_hidden
from quantkit.models import LoadedModel
from quantkit.models.families import layer_types
from quantkit.progress import QuantizeProgress
from quantkit.recipe import Recipe
from quantkit.forwards import blocks_of, capture_block_inputs, check_finite, observe, propagate, replay_cache


@dataclass
class LinearResult:
    """One quantized linear: its weight and what was measured while rounding it."""

    name: str  # full module name
    weight: QuantizedWeight
    float_dtype: torch.dtype  # of the weight it replaces
    algorithm: str  # the rounding's name
    weight_rel_error: float  # ||W - Q|| / ||W||
    seconds: float  # its share of the rounding's time
    facts: dict = field(default_factory=dict)  # the algorithms' report entries, then the inputs' (W8A8)


@dataclass
class QuantizationResult:
    weights: dict[str, QuantizedWeight]  # full linear name -> its quantized weight
    linears: list[LinearResult]  # in the order they were rounded
    seconds: dict[str, float] = field(default_factory=dict)  # where the time went
    actorder: str | None = None  # compressed-tensors label of the rounding's column order
    activations: ActSpec | None = None  # W8A8: how the quantized linears' inputs are quantized
    input_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # static activations: name -> scale [1]
    held_out: HeldOutResult | None = None  # float vs quantized perplexity on held-back windows


def check_finite_parameters(model: torch.nn.Module) -> None:
    """NumericalError naming the first parameter or buffer holding NaN or Inf
    (embeddings and norms too): refused before any calibration runs."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            check_finite(t.data, name)


def _relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    w, w_hat = w.float(), w_hat.float()
    return float((w - w_hat).norm() / w.norm().clamp_min(1e-30))


def needs_calibration(recipe: Recipe, chain: Chain) -> bool:
    """Whether quantizing with `recipe` runs calibration data: a step observes
    activations, or static activation scales are calibrated."""
    static = recipe.activations is not None and not recipe.activations.dynamic
    return static or chain.observes


def quantize_model(
    loaded: LoadedModel,
    recipe: Recipe,
    calibration_ids: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    progress: QuantizeProgress | None = None,
    replay: bool | None = None,
    held_out_ids: torch.Tensor | None = None,
    held_out_disjoint: bool = True,
    chain: Chain | None = None,
) -> QuantizationResult:
    """Quantize `loaded.model` in place (its linears end up holding the
    dequantized weights) and return the quantized weights and what was measured.

    chain: the recipe's algorithms, built once by the caller (build_all(recipe)
    when None). Calibration forwards run in recipe.calibration.dtype on a copy
    of each block; the weights are always rounded from the model's own tensors.
    replay=False recomputes every sub-module in every pass (same result, slower,
    less memory); None follows recipe.calibration.replay.
    held_out_ids [n, seq]: windows to compute the float and the quantized model's
    perplexity on (quantkit.heldout), carried through the blocks beside the
    calibration data; `held_out_disjoint` says whether they avoid the calibration
    windows (recorded with the result).
    """
    check_finite_parameters(loaded.model)
    chain = chain if chain is not None else build_all(recipe)
    progress = progress or QuantizeProgress()
    rounding, transforms = chain.rounding, chain.transforms
    act = recipe.activations
    ranges = InputRanges(act) if act is not None and not act.dynamic else None
    # observers of each input group's inputs: the rounding's, and static activation scales'
    observers: list[Observer] = ([rounding] if rounding.observes else []) + ([ranges] if ranges is not None else [])
    needs_data = bool(transforms or observers)
    family = loaded.family
    blocks = blocks_of(loaded)
    kinds = layer_types(loaded.model.config)  # each block's attention type: its mask and rotary cos/sin
    seconds = {"capture": 0.0, "forward": 0.0, "transform": 0.0, "quantize": 0.0}
    if needs_data and calibration_ids is None:
        users = [s.name for s in chain if isinstance(s, Transform) or s.observes]
        raise ValueError(f"recipe {recipe.name!r} needs calibration data "
                         f"({', '.join(users + (['static activations'] if ranges else []))})")

    model_dtype = next(loaded.model.parameters()).dtype
    fwd_dtype = calibration_dtype(recipe.calibration.dtype, model_dtype, device) if needs_data else model_dtype
    t0 = time.perf_counter()
    batch = recipe.calibration.batch_size
    inputs = capture_block_inputs(loaded, calibration_ids, device, batch, fwd_dtype) if needs_data else []
    # the held-out windows: one stream through the float blocks, one through the quantized ones
    held_float = held_quant = []
    if held_out_ids is not None:
        held_float = held_quant = capture_block_inputs(loaded, held_out_ids, device, batch, fwd_dtype)
    seconds["capture"] = time.perf_counter() - t0

    linears: list[LinearResult] = []
    input_scales: dict[str, torch.Tensor] = {}
    use_replay = recipe.calibration.replay if replay is None else replay
    progress.start(len(blocks), f"quantize ({recipe.name})")
    for i, block in enumerate(blocks):
        targets = _targets(block, f"{family.blocks}.{i}", family.linears, recipe)
        block.to(device)
        # the block that runs the calibration data: itself, or a copy in fwd_dtype
        fwd = block if not needs_data or fwd_dtype == model_dtype else copy.deepcopy(block).to(fwd_dtype)
        if held_float:
            t = time.perf_counter()
            held_float = propagate(fwd, held_float, None, set(), kinds[i])  # before anything changes the block
            seconds["held_out"] = seconds.get("held_out", 0.0) + time.perf_counter() - t
        groups = _input_groups(targets, family.shared_inputs)
        if transforms and targets:
            t = time.perf_counter()
            observe(fwd, inputs, groups, transforms, None, set(), kinds[i])  # the float block, every group in one pass
            seconds["forward"] += time.perf_counter() - t
            t = time.perf_counter()
            progress.substeps(len(transforms) * (len(family.mappings) + 1), f"  block {i}: transforms")
            apply_transforms(block, targets, family, transforms, rounding.trial_rounder(),
                             lambda what, i=i: progress.substep(f"  block {i}: {what}"), loaded.model.config)
            if fwd is not block:
                for p_fwd, p in zip(fwd.parameters(), block.parameters(), strict=True):
                    p_fwd.data.copy_(p.data)
            seconds["transform"] += time.perf_counter() - t
        # true-sequential: each group is observed after the groups before it
        # were quantized, so it is calibrated on what the quantized block computes
        stages = [[g] for g in groups] if rounding.observes and rounding.sequential else [groups]
        cache = replay_cache(fwd, targets, family) if needs_data and use_replay else None
        final: set[str] = set()  # target linears (relative names) already quantized
        act_hooks = []  # W8A8: a quantized linear's input is quantized from then on
        for stage in stages if targets else []:
            if observers:
                t = time.perf_counter()
                observe(fwd, inputs, stage, observers, cache, final, kinds[i])
                seconds["forward"] += time.perf_counter() - t
            t = time.perf_counter()
            for group in stage:
                for target, result in zip(group, _quantize_group(group, chain)):
                    if act is not None:
                        scale = None
                        if ranges is not None:
                            scale = input_scales[target.name] = ranges.scale(target.name)
                        result.facts.update(input_facts(act, scale, ranges, target.name))
                        act_hooks.append(fwd.get_submodule(target.rel).register_forward_pre_hook(
                            input_quantizer(act, scale)))
                    linears.append(result)
                    if fwd is not block:
                        fwd.get_submodule(target.rel).weight.data.copy_(target.linear.weight.data)
                    final.add(target.rel)
            seconds["quantize"] += time.perf_counter() - t
        if needs_data and i + 1 < len(blocks):
            t = time.perf_counter()
            inputs = propagate(fwd, inputs, cache, final, kinds[i])
            seconds["forward"] += time.perf_counter() - t
        if held_quant:
            t = time.perf_counter()
            held_quant = propagate(fwd, held_quant, None, set(), kinds[i])  # as the checkpoint computes it
            seconds["held_out"] += time.perf_counter() - t
        for h in act_hooks:
            h.remove()
        del fwd
        block.to("cpu")
        progress.block_done()
    held = None
    if held_out_ids is not None:
        t = time.perf_counter()
        held = HeldOutResult(*held_out_ids.shape, held_out_disjoint,
                             perplexity_of_hidden(loaded, [h.hidden for h in held_float], held_out_ids, device),
                             perplexity_of_hidden(loaded, [h.hidden for h in held_quant], held_out_ids, device))
        seconds["held_out"] += time.perf_counter() - t
    weights = {r.name: r.weight for r in linears}
    return QuantizationResult(weights, linears, seconds, rounding.actorder(), act, input_scales, held)


def _targets(block, prefix: str, linears: tuple[str, ...], recipe: Recipe) -> list[Target]:
    out = []
    for rel in linears:
        name = f"{prefix}.{rel}"
        linear = block.get_submodule(rel)
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, expected torch.nn.Linear")
        spec = recipe.spec_for(name, linear.in_features)
        if spec is not None:
            out.append(Target(rel, name, linear, spec))
    return out


def plan_targets(model: torch.nn.Module, family, recipe: Recipe) -> dict[str, IntSpec | FloatSpec]:
    """Linear name -> the spec `recipe` quantizes it with, for every linear it
    selects in `model`'s blocks. Only shapes are read, so a skeleton on the meta
    device answers before any weight is loaded (group sizes, empty selections)."""
    blocks = model.get_submodule(family.blocks)
    return {t.name: t.spec for i, block in enumerate(blocks)
            for t in _targets(block, f"{family.blocks}.{i}", family.linears, recipe)}


def _input_groups(targets: list[Target], shared_inputs: tuple[tuple[str, ...], ...]) -> list[list[Target]]:
    """Targets grouped by the input they share, in execution order."""
    groups = [[t for t in targets if t.rel in shared] for shared in shared_inputs]
    covered = {t.rel for g in groups for t in g}
    groups += [[t] for t in targets if t.rel not in covered]
    return [g for g in groups if g]


@torch.inference_mode()
def _quantize_group(group: list[Target], chain: Chain) -> list[LinearResult]:
    """Round the linears of one input group (one call: a rounding may solve
    them together) and write the dequantized weights back."""
    for target in group:
        check_finite(target.linear.weight.data, f"the weight of {target.name}")
    t = time.perf_counter()
    rounding = chain.rounding
    qws = rounding.round_group([t.name for t in group], [t.linear.weight.data for t in group], [t.spec for t in group])
    seconds = (time.perf_counter() - t) / len(group)  # a joint solve's time, shared out
    results = []
    for target, qw in zip(group, qws):
        w = target.linear.weight.data
        w_hat = qw.dequantize(w.dtype)
        result = LinearResult(target.name, qw, w.dtype, rounding.name, _relative_error(w, w_hat), seconds)
        for step in chain:
            result.facts.update(step.report(target.name))
            step.free(target.name)
        w.copy_(w_hat)
        results.append(result)
    return results
