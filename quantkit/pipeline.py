"""THE block-by-block driver: onload, observe, quantize, propagate.

    capture the inputs of block 0 (only when some algorithm needs activations)
    for each decoder block:
        move it to the device
        run the calibration batches through it with observers on its linears
        round each targeted linear with the recipe's algorithms
        write the dequantized weights back (and, W8A8, quantize the linear's
        inputs from then on), so the next block is calibrated on what the
        quantized model really produces
        recompute the block's outputs as the next block's inputs
        move it back

Only this module walks the model; algorithms see one layer at a time.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from quantkit.algorithms import Algorithm, build_all
from quantkit.algorithms.awq_math import fold_into_previous, scale_columns
from quantkit.errors import NumericalError
from quantkit.formats import ActSpec, FloatSpec, IntSpec, QuantizedWeight, packed_shape
from quantkit.formats.activation import fake_quantize as fake_quantize_input
from quantkit.formats.activation import scale_for
from quantkit.heldout import HeldOutResult, perplexity_of_hidden
from quantkit.models import LoadedModel
from quantkit.recipe import Recipe
from quantkit.replay import ReplayCache


@dataclass
class QuantizationResult:
    weights: dict[str, QuantizedWeight]  # full linear name -> its quantized weight
    layers: list[dict]  # one report row per quantized linear
    seconds: dict[str, float] = field(default_factory=dict)  # where the time went
    actorder: str | None = None  # compressed-tensors label of the rounding's column order
    activations: ActSpec | None = None  # W8A8: how the quantized linears' inputs are quantized
    input_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # static activations: name -> scale [1]
    held_out: HeldOutResult | None = None  # float vs quantized perplexity on held-back windows


@dataclass
class _BlockInput:
    hidden: torch.Tensor  # [batch, seq, hidden]
    kwargs: dict


class _InputsCaptured(Exception):
    """Raised by the block-0 hook to stop the forward once its inputs are saved."""


def _block_output(out) -> torch.Tensor:
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


@functools.cache
def _cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively: AVX512-BF16 or AMX on x86, the
    BF16 extension on Arm. Read from the CPU's flags, never timed, so that the
    same machine always picks the same dtype and a run can be repeated bit for
    bit (oneDNN reports bf16 "supported" without these too, where it is
    emulated and runs about 4x slower than float32)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to tell without timing; stay in the model's dtype
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def calibration_dtype(choice: str, model_dtype: torch.dtype, device) -> torch.dtype:
    """The dtype of the calibration forwards for a CalibrationConfig.dtype choice.
    auto: the model's own dtype unless it is float32 and the hardware multiplies
    bf16 natively (a CUDA GPU with bf16, a CPU with bf16 instructions)."""
    if choice == "model":
        return model_dtype
    if choice != "auto":
        return getattr(torch, choice)
    if model_dtype != torch.float32:
        return model_dtype
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else model_dtype
    return torch.bfloat16 if _cpu_has_native_bf16() else model_dtype


@torch.inference_mode()
def capture_block_inputs(
    loaded: LoadedModel, input_ids: torch.Tensor, device, batch_size: int, dtype: torch.dtype | None = None
) -> list[_BlockInput]:
    """Run the model up to block 0 for each batch of `input_ids` [n, seq];
    floating inputs are cast to `dtype` (the calibration forwards' dtype)."""
    model, family = loaded.model, loaded.family
    blocks = blocks_of(loaded)
    captured: list[_BlockInput] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        if dtype is not None:
            hidden, kwargs = _cast(hidden, dtype), _cast(kwargs, dtype)
        captured.append(_BlockInput(hidden, kwargs))
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


def check_finite_parameters(model: torch.nn.Module) -> None:
    """NumericalError naming the first parameter or buffer holding NaN or Inf
    (embeddings and norms too): refused before any calibration runs."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            _check_finite(t.data, name)


def _check_finite(t: torch.Tensor, what: str) -> None:
    # one reduction: a NaN or an Inf anywhere makes max |t| non-finite
    if t.numel() and not torch.isfinite(t.abs().amax()):
        raise NumericalError(f"{what} contains NaN or Inf; refusing to quantize")


def _relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    w, w_hat = w.float(), w_hat.float()
    return float((w - w_hat).norm() / w.norm().clamp_min(1e-30))


class _InputRange:
    """Observer of the static activation scales: max |x| of each linear's
    calibration input (one value per input group, shared by its linears)."""

    needs_activations = True
    sequential = False

    def __init__(self) -> None:
        self.absmax: dict[str, torch.Tensor] = {}

    def observe(self, names: tuple[str, ...], x: torch.Tensor) -> None:
        m = x.detach().abs().amax().to(torch.float32)
        seen = self.absmax.get(names[0])
        value = m if seen is None else torch.maximum(seen, m)
        for name in names:
            self.absmax[name] = value


def _packed_nbytes(qw: QuantizedWeight) -> int:
    """Bytes on disk: packed values, scales and (asymmetric) packed zero points."""
    out_f, in_f = qw.q.shape
    if isinstance(qw.spec, FloatSpec):
        return qw.q.numel() + qw.scale.numel() * qw.scale.element_size()  # one byte per value
    n = 4 * math.prod(packed_shape((out_f, in_f), qw.spec.bits, 1)) + qw.scale.numel() * qw.scale.element_size()
    if not qw.spec.symmetric:
        n += 4 * math.prod(packed_shape(tuple(qw.zero_point.shape), qw.spec.bits, 0))
    if qw.g_idx is not None:
        n += 4 * in_f
    return n


def needs_calibration(recipe: Recipe, algorithms: list[Algorithm]) -> bool:
    """Whether quantizing with `recipe` runs calibration data: an algorithm
    observes activations, or static activation scales are calibrated."""
    static = recipe.activations is not None and not recipe.activations.dynamic
    return static or any(a.needs_activations for a in algorithms)


def quantize_model(
    loaded: LoadedModel,
    recipe: Recipe,
    calibration_ids: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    show_progress: bool = True,
    replay: bool | None = None,
    held_out_ids: torch.Tensor | None = None,
    held_out_disjoint: bool = True,
) -> QuantizationResult:
    """Quantize `loaded.model` in place (its linears end up holding the
    dequantized weights) and return the quantized weights and a report.

    Calibration forwards run in recipe.calibration.dtype on a copy of each
    block; the weights are always rounded from the model's own tensors.
    replay=False recomputes every sub-module in every pass (same result, slower,
    less memory); None follows recipe.calibration.replay.
    held_out_ids [n, seq]: windows to compute the float and the quantized model's
    perplexity on (quantkit.heldout), carried through the blocks beside the
    calibration data; `held_out_disjoint` says whether they avoid the calibration
    windows (recorded with the result).
    """
    check_finite_parameters(loaded.model)
    algorithms = build_all(recipe)
    rounding = algorithms[-1]
    transforms = [a for a in algorithms if a.transforms]  # observe the float block, change it
    observers = [a for a in algorithms if a.needs_activations and not a.transforms]  # observe, then round
    act = recipe.activations
    input_range = _InputRange() if act is not None and not act.dynamic else None
    if input_range is not None:  # static activation scales come from the calibration inputs
        observers.append(input_range)
    needs_data = bool(transforms or observers)
    family = loaded.family
    blocks = blocks_of(loaded)
    seconds = {"capture": 0.0, "forward": 0.0, "transform": 0.0, "quantize": 0.0}
    if needs_data and calibration_ids is None:
        users = [a.name for a in algorithms if a.needs_activations] + (["static activations"] if input_range else [])
        raise ValueError(f"recipe {recipe.name!r} needs calibration data ({', '.join(users)})")

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

    weights: dict[str, QuantizedWeight] = {}
    input_scales: dict[str, torch.Tensor] = {}
    rows: list[dict] = []
    console = Console(stderr=True)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not show_progress, transient=False) as progress:
        task = progress.add_task(escape(f"quantize ({recipe.name})"), total=len(blocks))  # user text, not markup
        # the transforms' searches take most of a block's time: a bar of their own, per mapping
        steps = progress.add_task("", total=1, visible=False)
        for i, block in enumerate(blocks):
            prefix = f"{family.blocks}.{i}"
            targets = _targets(block, prefix, family.linears, recipe)
            block.to(device)
            # the block that runs the calibration data: itself, or a copy in fwd_dtype
            fwd = block if not needs_data or fwd_dtype == model_dtype else copy.deepcopy(block).to(fwd_dtype)
            if held_float:
                t = time.perf_counter()
                held_float = _propagate(fwd, held_float, None, set())  # before anything changes the block
                seconds["held_out"] = seconds.get("held_out", 0.0) + time.perf_counter() - t
            groups = _input_groups(targets, family.shared_inputs)
            if transforms and targets:
                t = time.perf_counter()
                _observe(fwd, inputs, groups, transforms, None, set())  # the float block, every group in one pass
                seconds["forward"] += time.perf_counter() - t
                t = time.perf_counter()
                n_steps = len(transforms) * (len(family.mappings) + 1)
                progress.reset(steps, total=n_steps, description=f"  block {i}: transforms", visible=True)

                def step(what: str) -> None:
                    progress.update(steps, advance=1, description=escape(f"  block {i}: {what}"))

                _apply_transforms(block, targets, family, transforms, rounding, step)
                if fwd is not block:
                    for p_fwd, p in zip(fwd.parameters(), block.parameters(), strict=True):
                        p_fwd.data.copy_(p.data)
                seconds["transform"] += time.perf_counter() - t
            # true-sequential: each group is observed after the groups before it
            # were quantized, so it is calibrated on what the quantized block computes
            stages = [[g] for g in groups] if any(a.sequential for a in observers) else [groups]
            use_replay = recipe.calibration.replay if replay is None else replay
            cache = _replay_cache(fwd, targets, family) if needs_data and use_replay else None
            final: set[str] = set()  # target linears (relative names) already quantized
            act_hooks = []  # W8A8: a quantized linear's input is quantized from then on
            for stage in stages if targets else []:
                if observers:
                    t = time.perf_counter()
                    _observe(fwd, inputs, stage, observers, cache, final)
                    seconds["forward"] += time.perf_counter() - t
                t = time.perf_counter()
                for group in stage:
                    for target, (qw, row) in zip(group, _quantize_group(group, rounding, algorithms)):
                        weights[target.name] = qw
                        if act is not None:
                            scale = None
                            if input_range is not None:
                                scale = input_scales[target.name] = _static_scale(input_range, target.name, act)
                            row.update(_act_report(act, scale, input_range, target.name))
                            act_hooks.append(fwd.get_submodule(target.rel).register_forward_pre_hook(
                                _input_quantizer(act, scale)))
                        rows.append(row)
                        if fwd is not block:
                            fwd.get_submodule(target.rel).weight.data.copy_(target.linear.weight.data)
                        final.add(target.rel)
                seconds["quantize"] += time.perf_counter() - t
            if needs_data and i + 1 < len(blocks):
                t = time.perf_counter()
                inputs = _propagate(fwd, inputs, cache, final)
                seconds["forward"] += time.perf_counter() - t
            if held_quant:
                t = time.perf_counter()
                held_quant = _propagate(fwd, held_quant, None, set())  # as the checkpoint computes it
                seconds["held_out"] += time.perf_counter() - t
            for h in act_hooks:
                h.remove()
            del fwd
            block.to("cpu")
            progress.advance(task)
    held = None
    if held_out_ids is not None:
        t = time.perf_counter()
        held = HeldOutResult(*held_out_ids.shape, held_out_disjoint,
                             perplexity_of_hidden(loaded, [h.hidden for h in held_float], held_out_ids, device),
                             perplexity_of_hidden(loaded, [h.hidden for h in held_quant], held_out_ids, device))
        seconds["held_out"] += time.perf_counter() - t
    return QuantizationResult(weights, rows, seconds, rounding.actorder(), act, input_scales, held)


def _static_scale(observed: _InputRange, name: str, act: ActSpec) -> torch.Tensor:
    """The per-tensor input scale [1] (float32) from the calibration inputs' max |x|."""
    if name not in observed.absmax:
        raise RuntimeError(f"no calibration input reached {name}: cannot calibrate its static activation scale")
    absmax = observed.absmax[name]
    if not torch.isfinite(absmax):
        raise NumericalError(f"the calibration inputs of {name} are not finite")
    return scale_for(absmax, act).reshape(1).cpu()


def _act_report(act: ActSpec, scale: torch.Tensor | None, observed: _InputRange | None, name: str) -> dict:
    row = {"activations": f"{act.type} {'dynamic per-token' if act.dynamic else 'static per-tensor'}"}
    if scale is not None:
        row |= {"input_scale": float(scale), "input_absmax": float(observed.absmax[name])}
    return row


def _input_quantizer(act: ActSpec, scale: torch.Tensor | None):
    """A forward pre-hook quantizing a linear's input as the checkpoint's kernel will."""

    def hook(_module, args):
        return (fake_quantize_input(args[0], act, scale), *args[1:])

    return hook


def _apply_transforms(block, targets: list["_Target"], family, transforms: list[Algorithm], rounding: Algorithm,
                      step: Callable[[str], None] = lambda what: None) -> None:
    """Scale each family mapping the transforms can fold (previous op / s,
    linears' columns * s), then clip; a mapping that cannot apply is recorded
    in the report with the reason, never silently dropped. A rounding with
    error feedback (GPTQ) confirms the transforms' choices by trial rounding.
    step(what) is called after each mapping and after the clipping."""
    by_rel = {t.rel: t for t in targets}
    rounder = rounding.trial_round if rounding.error_feedback else None
    for algorithm in transforms:
        for mapping in family.mappings:
            _scale_mapping(block, mapping, by_rel, algorithm, rounder)
            step(f"{algorithm.name} {mapping.prev} -> {', '.join(rel.rsplit('.', 1)[-1] for rel in mapping.linears)}")
        for t in targets:
            if t.rel not in family.score_linears:
                t.linear.weight.data.copy_(algorithm.clip(t.name, t.linear.weight.data, t.spec, rounder))
        step(f"{algorithm.name} clipping")


def _scale_mapping(block, mapping, by_rel: dict[str, "_Target"], algorithm: Algorithm, rounder) -> None:
    members = [by_rel[rel] for rel in mapping.linears if rel in by_rel]
    names = [m.name for m in members]
    missing = [rel for rel in mapping.linears if rel not in by_rel]
    if missing:
        algorithm.skip(names, f"{', '.join(missing)} not quantized")
        return
    prev = block.get_submodule(mapping.prev)
    width = members[0].linear.in_features
    if isinstance(prev, torch.nn.Linear):
        weight, bias = prev.weight.data, None if prev.bias is None else prev.bias.data
        if prev.out_features != width:
            algorithm.skip(names, f"{mapping.prev} has {prev.out_features} outputs, its linears take {width} inputs "
                                  f"(grouped-query attention)")
            return
    else:
        weight, bias = getattr(prev, "weight", None), getattr(prev, "bias", None)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (width,):
            algorithm.skip(names, f"{mapping.prev} ({type(prev).__name__}) has no per-channel weight of width {width}")
            return
        weight, bias = weight.data, None if bias is None else bias.data
    found = algorithm.search_scales(names, [m.linear.weight.data for m in members], [m.spec for m in members], rounder)
    if found.alpha is None:
        return  # the unscaled weights rounded best: nothing to fold
    fold_into_previous(weight, bias, found.scales)
    for m in members:
        scale_columns(m.linear.weight.data, found.scales)
    algorithm.scaled(names, found.scales)


@dataclass
class _Target:
    rel: str  # name inside the block, e.g. "self_attn.q_proj"
    name: str  # full module name
    linear: torch.nn.Linear
    spec: IntSpec


def _targets(block, prefix: str, linears: tuple[str, ...], recipe: Recipe) -> list[_Target]:
    out = []
    for rel in linears:
        name = f"{prefix}.{rel}"
        linear = block.get_submodule(rel)
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, expected torch.nn.Linear")
        spec = recipe.spec_for(name, linear.in_features)
        if spec is not None:
            out.append(_Target(rel, name, linear, spec))
    return out


def plan_targets(model: torch.nn.Module, family, recipe: Recipe) -> dict[str, IntSpec | FloatSpec]:
    """Linear name -> the spec `recipe` quantizes it with, for every linear it
    selects in `model`'s blocks. Only shapes are read, so a skeleton on the meta
    device answers before any weight is loaded (group sizes, empty selections)."""
    blocks = model.get_submodule(family.blocks)
    return {t.name: t.spec for i, block in enumerate(blocks)
            for t in _targets(block, f"{family.blocks}.{i}", family.linears, recipe)}


def _input_groups(targets: list[_Target], shared_inputs: tuple[tuple[str, ...], ...]) -> list[list[_Target]]:
    """Targets grouped by the input they share, in execution order."""
    groups = [[t for t in targets if t.rel in shared] for shared in shared_inputs]
    covered = {t.rel for g in groups for t in g}
    groups += [[t] for t in targets if t.rel not in covered]
    return [g for g in groups if g]


class _StopBlock(Exception):
    """Raised by an observer hook once the inputs it needs are seen: the rest
    of the block's forward would be wasted work."""


def _replay_cache(block, targets: list[_Target], family) -> ReplayCache:
    """Candidates: every target linear, and the family's replay modules (norms,
    self_attn, mlp), each with the target linears its output depends on."""
    members = {t.rel: {t.rel} for t in targets}
    for module, prefixes in family.replay_modules:
        members[module] = {t.rel for t in targets if t.rel.startswith(prefixes)} if prefixes else set()
    return ReplayCache(block, members, dict(family.replay_tails))


def _run_batches(block, inputs: list[_BlockInput], replay: ReplayCache | None, final: set[str], keep: bool) -> list[_BlockInput]:
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
                    outputs.append(_BlockInput(_block_output(out), item.kwargs))
            except _StopBlock:
                pass
    finally:
        if replay is not None:
            replay.end_pass(len(inputs))
    return outputs


@torch.inference_mode()
def _observe(block, inputs: list[_BlockInput], groups: list[list[_Target]], observers: list[Algorithm],
             replay: ReplayCache | None, final: set[str]) -> None:
    """Run the calibration batches through `block`, handing each group's input
    to the observers; each forward ends once the last group's input is seen."""
    last = groups[-1][0].name
    # end the forward at the last group's input, or, where the replay cache can
    # then rebuild the module around it from its recorded input, after that module
    stop_after = replay.stop_after(groups[-1][0].rel, final) if replay is not None else None

    def make_hook(group: list[_Target]):  # hooks go on `block`'s own linears (it may be a copy)
        names = tuple(t.name for t in group)

        def hook(_module, args):
            x = args[0]
            _check_finite(x, f"the calibration input of {names[0]}")
            x = x.reshape(-1, x.shape[-1])
            for algorithm in observers:
                algorithm.observe(names, x)
            if names[0] == last and stop_after is None:
                raise _StopBlock

        return hook

    def stop(*_):
        raise _StopBlock

    handles = [block.get_submodule(g[0].rel).register_forward_pre_hook(make_hook(g)) for g in groups]
    if stop_after is not None:
        handles.append(block.get_submodule(stop_after).register_forward_hook(stop))
    try:
        _run_batches(block, inputs, replay, final, keep=False)
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def _propagate(block, inputs: list[_BlockInput], replay: ReplayCache | None, final: set[str]) -> list[_BlockInput]:
    return _run_batches(block, inputs, replay, final, keep=True)


@torch.inference_mode()
def _quantize_group(group: list[_Target], rounding: Algorithm, algorithms: list[Algorithm]) -> list[tuple[QuantizedWeight, dict]]:
    """Round the linears of one input group (one call: an algorithm may solve
    them together) and write the dequantized weights back; one report row each."""
    for target in group:
        _check_finite(target.linear.weight.data, f"the weight of {target.name}")
    t = time.perf_counter()
    qws = rounding.quantize_group([t.name for t in group], [t.linear.weight.data for t in group], [t.spec for t in group])
    seconds = (time.perf_counter() - t) / len(group)  # a joint solve's time, shared out
    results = []
    for target, qw in zip(group, qws):
        w, spec = target.linear.weight.data, target.spec
        w_hat = qw.dequantize(w.dtype)
        row = {
            "name": target.name,
            "shape": list(w.shape),
            "bits": spec.bits,
            "group_size": spec.group_size,
            "symmetric": spec.symmetric,
            "algorithm": rounding.name,
            "weight_rel_error": _relative_error(w, w_hat),
            "bytes_float": w.numel() * w.element_size(),
            "bytes_quantized": _packed_nbytes(qw),
            "seconds": seconds,
        }
        if isinstance(spec, FloatSpec):
            row["weight_type"] = f"fp8 e4m3 per-{spec.strategy}"
        for algorithm in algorithms:
            row.update(algorithm.layer_report(target.name))
            algorithm.free(target.name)
        w.copy_(w_hat)
        results.append((qw, row))
    return results
