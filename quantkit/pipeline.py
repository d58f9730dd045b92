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

Before the walk, a recipe's rotations rewrite the model (quantkit.algorithms.rotation). A lazy
model's block is read from its files when the walk reaches it and given back when it is done
(quantkit.models.lazy); a sink takes each finished block (quantkit.checkpoint.stream writes it and
journals what flows on, so an interrupted run resumes at the next block). With several processes
(quantkit.distributed) each runs its share of the calibration batches, every observer combines
what the ranks saw after each pass, and each stage's rounding is shared out: every group's rows
split over the ranks, or each group rounded whole on one rank and broadcast.

A sparse (mixture-of-experts) layer is walked the same way with its own table
(families.block_family: each expert's linears and groups); quantkit.experts
says how its experts are staged, counted, and rounded when starved.

What it finds per linear goes into LinearResults; the report rows and byte
counts are the checkpoint's business (quantkit.checkpoint.report), progress is
a callback (quantkit.progress), the dtype choice is the hardware's
(quantkit.devices).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from quantkit.algorithms import Chain, Observer, Transform, build_all
from quantkit.algorithms.folding import Target, apply_transforms
from quantkit.algorithms.inputs import InputRanges, input_facts, input_quantizer
from quantkit.distributed import ALONE, Group, assign, rows_beat_jobs
from quantkit.devices import calibration_dtype, gpu_peak_bytes, rss_bytes, start_gpu_peak
from quantkit.experts import FALLBACK, LayerExperts, experts_of, split_stages
from quantkit.formats import ActSpec, FloatSpec, IntSpec, QuantizedWeight, quantize_rtn
from quantkit.heldout import HeldOutResult, nll_of_hidden, perplexity_from
from quantkit.models import LoadedModel
from quantkit.models.families import block_family, layer_types, sparse_layers
from quantkit.models.moe import watching
from quantkit.progress import QuantizeProgress
from quantkit.recipe import Recipe
from quantkit.forwards import BlockInput, blocks_of, capture_block_inputs, check_finite, observe, propagate, replay_cache


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

    def to(self, device) -> LinearResult:
        """The same result with its weight's tensors on `device`."""
        return dataclasses.replace(self, weight=self.weight.to(device))


@dataclass
class Streams:
    """What flows from one block to the next: the calibration batches and the two held-out streams
    (float and quantized), as they leave the last finished block."""

    inputs: list[BlockInput]
    held_float: list[BlockInput]
    held_quant: list[BlockInput]


@dataclass
class ResumePoint:
    """Where an interrupted run continues: the first block still to do and what flows into it."""

    block: int
    streams: Streams


class BlockSink(Protocol):
    """Whoever takes each finished block (quantkit.checkpoint.stream): its linears' results,
    the block itself (its float tensors: norms, biases, a router), what flows on, and its figures."""

    def block_done(self, index: int, block: torch.nn.Module, results: list[LinearResult],
                   input_scales: dict[str, torch.Tensor], streams: Streams, figures: dict) -> None: ...

    def flush(self) -> None:
        """Every block handed over is stored (called once after the last block, on every rank)."""


@dataclass
class QuantizationResult:
    weights: dict[str, QuantizedWeight]  # full linear name -> its quantized weight
    linears: list[LinearResult]  # in the order they were rounded
    seconds: dict[str, float] = field(default_factory=dict)  # where the time went
    actorder: str | None = None  # compressed-tensors label of the rounding's column order
    activations: ActSpec | None = None  # W8A8: how the quantized linears' inputs are quantized
    input_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # static activations: name -> scale [1]
    held_out: HeldOutResult | None = None  # float vs quantized perplexity on held-back windows
    blocks: list[dict] = field(default_factory=list)  # per block done in this run: seconds, memory


def check_finite_parameters(model: torch.nn.Module) -> None:
    """NumericalError naming the first parameter or buffer holding NaN or Inf
    (embeddings and norms too): refused before any calibration runs."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and t.device.type != "meta":  # a lazy model's: checked as they are read
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
    sink: BlockSink | None = None,
    resume: ResumePoint | None = None,
    comm: Group = ALONE,
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
    sink: takes each block as it is finished (quantkit.checkpoint.stream); its
    results are then not kept here (result.weights and result.linears stay empty),
    and a lazy model's block (LoadedModel.weights) gives its memory back.
    resume: continue an interrupted run at resume.block with what flowed into it.
    comm: this process among several (quantkit.distributed): it runs its share of the
    calibration batches and of the held-out windows, the statistics are combined after
    each pass, and each stage's rounding is shared out (_quantize_stage).
    """
    chain = chain if chain is not None else build_all(recipe)
    for rotation in chain.rotations:  # an equal model without outlier channels, before anything observes it
        rotation.prepare(loaded)
    check_finite_parameters(loaded.model)
    progress = progress or QuantizeProgress()
    rounding, transforms = chain.rounding, chain.transforms
    act = recipe.activations
    ranges = InputRanges(act) if act is not None and not act.dynamic else None
    # observers of each input group's inputs: the rounding's, and static activation scales'
    observers: list[Observer] = ([rounding] if rounding.observes else []) + ([ranges] if ranges is not None else [])
    needs_data = bool(transforms or observers)
    family, config = loaded.family, loaded.model.config
    blocks = blocks_of(loaded)
    kinds = layer_types(config)  # each block's attention type: its mask and rotary cos/sin
    sparse = sparse_layers(config, family)
    seconds = {"capture": 0.0, "forward": 0.0, "transform": 0.0, "quantize": 0.0, "journal": 0.0}
    if needs_data and calibration_ids is None:
        users = [s.name for s in chain if isinstance(s, Transform) or s.observes]
        raise ValueError(f"recipe {recipe.name!r} needs calibration data "
                         f"({', '.join(users + (['static activations'] if ranges else []))})")

    model_dtype = next(loaded.model.parameters()).dtype
    fwd_dtype = calibration_dtype(recipe.calibration.dtype, model_dtype, device) if needs_data else model_dtype
    clock = _clock(device)  # GPU work runs ahead of the host: each phase's time includes its own
    t0 = clock()
    batch = recipe.calibration.batch_size
    start = resume.block if resume is not None else 0
    # this rank's share of the held-out windows (all of them alone)
    held_mine = held_out_ids[comm.share(held_out_ids.shape[0])] if held_out_ids is not None else None
    if resume is not None:
        inputs, held_float, held_quant = resume.streams.inputs, resume.streams.held_float, resume.streams.held_quant
    else:
        loaded.materialize(family.embed)
        if needs_data and not comm.alone:  # this rank's batches, cut where one process's batches end
            mine = comm.share(-(-calibration_ids.shape[0] // batch))
            calibration_ids = calibration_ids[mine.start * batch: mine.stop * batch]
        inputs = capture_block_inputs(loaded, calibration_ids, device, batch, fwd_dtype) if needs_data else []
        # the held-out windows: one stream through the float blocks, one through the quantized ones
        held_float = held_quant = []
        if held_mine is not None and len(held_mine):
            held_float = held_quant = capture_block_inputs(loaded, held_mine, device, batch, fwd_dtype)
        loaded.release(family.embed)
    seconds["capture"] = clock() - t0
    per_block: list[dict] = []

    linears: list[LinearResult] = []
    input_scales: dict[str, torch.Tensor] = {}
    use_replay = recipe.calibration.replay if replay is None else replay
    progress.start(len(blocks), f"quantize ({recipe.name})")
    for _ in range(start):
        progress.block_done()
    for i, block in enumerate(blocks):
        if i < start:
            continue
        t_block, done_before = clock(), len(linears)
        start_gpu_peak(torch.device(device))
        loaded.materialize(f"{family.blocks}.{i}")
        if i + 1 < len(blocks):
            loaded.prefetch(f"{family.blocks}.{i + 1}")  # read from the files while this block is worked on
        fam = block_family(family, config, i)  # a sparse layer's: one set of linears per expert
        targets = _targets(block, f"{family.blocks}.{i}", fam.linears, recipe)
        book = LayerExperts(fam, recipe.calibration.moe, rounding.observes) if sparse[i] else None
        block.to(device)
        # the block that runs the calibration data: itself, or a copy in fwd_dtype
        fwd = block if not needs_data or fwd_dtype == model_dtype else copy.deepcopy(block).to(fwd_dtype)
        if held_float:
            t = clock()
            held_float = propagate(fwd, held_float, None, set(), kinds[i])  # before anything changes the block
            seconds["held_out"] = seconds.get("held_out", 0.0) + clock() - t
        groups = _input_groups(targets, fam.shared_inputs)
        if transforms and targets:
            t = clock()
            every = experts_of(fam, groups)  # transforms see every token through every expert (quantkit.experts)
            with watching(fwd, every) as routed:
                observe(fwd, inputs, groups, transforms, None, set(), kinds[i])  # the float block, every group in one pass
            _sync(transforms, groups, comm, device)
            if book is not None:
                book.count(routed if routed is None else comm.sum_(routed), every)
            seconds["forward"] += clock() - t
            t = clock()
            progress.substeps(len(transforms) * (len(fam.mappings) + 1), f"  block {i}: transforms")
            apply_transforms(block, targets, fam, transforms, rounding.trial_rounder(),
                             lambda what, i=i: progress.substep(f"  block {i}: {what}"), config)
            if fwd is not block:
                for p_fwd, p in zip(fwd.parameters(), block.parameters(), strict=True):
                    p_fwd.data.copy_(p.data)
            seconds["transform"] += clock() - t
        # true-sequential: each group is observed after the groups before it
        # were quantized, so it is calibrated on what the quantized block computes
        # (a sparse layer: one stage per expert at least, so one expert's statistics live at a time)
        stages = ([[g] for g in groups] if rounding.observes and rounding.sequential
                  else split_stages(fam, groups) if book is not None else [groups])
        cache = replay_cache(fwd, targets, fam) if needs_data and use_replay else None
        final: set[str] = set()  # target linears (relative names) already quantized
        act_hooks = []  # W8A8: a quantized linear's input is quantized from then on
        for stage in stages if targets else []:
            if observers:
                t = clock()
                _observe_stage(fwd, inputs, stage, observers, cache, final, kinds[i], book, ranges, comm, device)
                seconds["forward"] += clock() - t
            t = clock()
            for group, results in zip(stage, _quantize_stage(stage, chain, book, comm)):
                for target, result in zip(group, results):
                    if book is not None:
                        result.facts.update(book.facts(target))
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
            seconds["quantize"] += clock() - t
        if needs_data and i + 1 < len(blocks):
            t = clock()
            inputs = propagate(fwd, inputs, cache, final, kinds[i])
            seconds["forward"] += clock() - t
        if held_quant:
            t = clock()
            held_quant = propagate(fwd, held_quant, None, set(), kinds[i])  # as the checkpoint computes it
            seconds["held_out"] += clock() - t
        for h in act_hooks:
            h.remove()
        del fwd
        block.to("cpu")
        figures = {"block": i, "seconds": clock() - t_block,
                   "peak_gpu_bytes": gpu_peak_bytes(torch.device(device)), "cpu_rss_bytes": rss_bytes()}
        per_block.append(figures)
        if sink is not None:
            done = linears[done_before:]
            scales = {r.name: input_scales.pop(r.name) for r in done if r.name in input_scales}
            t = clock()
            sink.block_done(i, block, done, scales, Streams(inputs, held_float, held_quant), figures)
            seconds["journal"] += clock() - t
            del linears[done_before:]  # written: the quantized weights are not held to the end
            loaded.release(f"{family.blocks}.{i}")
        progress.block_done()
    if sink is not None:
        t = clock()
        sink.flush()
        seconds["journal"] += clock() - t
    held = None
    if held_out_ids is not None:
        t = clock()
        sums = [(0.0, 0), (0.0, 0)]
        if held_float:  # this rank's share of the windows; the NLL sums added up over the ranks
            loaded.materialize(family.final_norm), loaded.materialize(family.lm_head)
            sums = [nll_of_hidden(loaded, [h.hidden for h in stream], held_mine, device) for stream in (held_float, held_quant)]
            loaded.release(family.final_norm), loaded.release(family.lm_head)
        every = comm.gather(sums)
        held = HeldOutResult(*held_out_ids.shape, held_out_disjoint,
                             *(perplexity_from(sum(r[k][0] for r in every), sum(r[k][1] for r in every)) for k in (0, 1)))
        seconds["held_out"] = seconds.get("held_out", 0.0) + clock() - t
    weights = {r.name: r.weight for r in linears}
    return QuantizationResult(weights, linears, seconds, rounding.actorder(), act, input_scales, held, per_block)


def _clock(device):
    """time.perf_counter, after waiting for `device`'s queued work when it is a GPU (so a phase's
    seconds are its own, not the asynchronous tail of the phase before it)."""
    device = torch.device(device)
    if device.type != "cuda":
        return time.perf_counter

    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return clock


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
            for t in _targets(block, f"{family.blocks}.{i}", block_family(family, model.config, i).linears, recipe)}


def _input_groups(targets: list[Target], shared_inputs: tuple[tuple[str, ...], ...]) -> list[list[Target]]:
    """Targets grouped by the input they share, in execution order."""
    groups = [[t for t in targets if t.rel in shared] for shared in shared_inputs]
    covered = {t.rel for g in groups for t in g}
    groups += [[t] for t in targets if t.rel not in covered]
    return [g for g in groups if g]


def _widths(groups: list[list[Target]]) -> list[tuple[tuple[str, ...], int]]:
    return [(tuple(t.name for t in g), g[0].linear.in_features) for g in groups]


def _sync(observers, groups: list[list[Target]], comm: Group, device) -> None:
    """Several processes: every observer combines what the ranks saw of `groups`."""
    if not comm.alone:
        for observer in observers:
            observer.sync(_widths(groups), comm, device)


def _observe_stage(fwd, inputs, stage, observers: list[Observer], cache, final: set[str], layer_type: str,
                   book: LayerExperts | None, ranges: InputRanges | None, comm: Group = ALONE, device="cpu") -> None:
    """One observation pass of a stage; in a sparse layer, with the stage's experts counted (and run
    on every token when the recipe says observe: all), and for a starved expert under static
    activations one more pass giving its input range every calibration token."""
    if book is None:
        observe(fwd, inputs, stage, observers, cache, final, layer_type)
        _sync(observers, stage, comm, device)
        return
    with watching(fwd, book.observe_all(stage)) as routed:
        observe(fwd, inputs, stage, observers + [book.observed], cache, final, layer_type)
    _sync(observers + [book.observed], stage, comm, device)
    book.count(routed if routed is None else comm.sum_(routed), experts_of(book.family, stage))
    starved = book.starved(stage) - book.observe_all(stage)
    if ranges is not None and starved:
        ranged = [g for g in stage if experts_of(book.family, [g]) <= starved]
        with watching(fwd, starved):
            observe(fwd, inputs, ranged, [ranges], cache, final, layer_type)
        _sync([ranges], ranged, comm, device)
        book.ranged_on_all |= starved


def _quantize_stage(stage: list[list[Target]], chain: Chain, book: LayerExperts | None,
                    comm: Group) -> list[list[LinearResult]]:
    """Each input group of a stage rounded: alone, one after another. With several processes, a
    rounding that solves against statistics (GPTQ) either has every group's rows split over the
    processes, or runs each group whole on one of them (the costliest first, on the least loaded),
    which broadcasts the result: whichever the cost model says finishes first (a dense block's few
    large groups split, a layer of many experts is shared out). Every process then holds it all."""
    fallback = [book is not None and book.falls_back(g) for g in stage]
    if comm.alone or not chain.rounding.observes:
        return [_quantize_group(g, chain, f) for g, f in zip(stage, fallback)]
    costs = [_solve_cost(g) for g in stage]
    if chain.rounding.splits_rows and rows_beat_jobs(costs, comm.world):
        return [_quantize_group(g, chain, f, share=comm) for g, f in zip(stage, fallback)]
    owner = assign([fixed + rows for fixed, rows in costs], comm.world)
    mine = {j: _round_group(g, chain, f) for j, (g, f) in enumerate(zip(stage, fallback)) if owner[j] == comm.rank}
    out = []
    for j, group in enumerate(stage):
        results = mine.get(j)
        shipped = comm.broadcast([_packed(r) for r in results] if results is not None else None, owner[j])
        device = group[0].linear.weight.device
        out.append(_apply_group(group, results or [_unpacked(r, device) for r in shipped], chain))
    return out


# a factorization of an n x n Hessian (Cholesky, inverse, Cholesky again) against the column loop's
# out x n^2 multiply-adds: what one solve costs each process that takes part
FACTOR_COST = 2.0


def _solve_cost(group: list[Target]) -> tuple[float, float]:
    """(fixed, rows) of rounding one input group against its statistics: the factorization every
    process pays, and the column loop that divides by rows (distributed.rows_beat_jobs)."""
    n = group[0].linear.in_features
    return FACTOR_COST * n ** 3, float(sum(t.linear.out_features for t in group) * n ** 2)


def _packed(r: LinearResult) -> tuple:
    """A result to broadcast: on the CPU, FP8 values as bytes (the pickler cannot carry float8)."""
    w = r.weight.to("cpu")
    return dataclasses.replace(r, weight=None), w.q.view(torch.uint8), w.q.dtype, w.scale, w.zero_point, w.spec, w.g_idx


def _unpacked(shipped: tuple, device) -> LinearResult:
    r, q, dtype, scale, zero_point, spec, g_idx = shipped
    return dataclasses.replace(r, weight=QuantizedWeight(q.view(dtype), scale, zero_point, spec, g_idx).to(device))


@torch.inference_mode()
def _quantize_group(group: list[Target], chain: Chain, fallback: bool = False,
                    share: Group = ALONE) -> list[LinearResult]:
    return _apply_group(group, _round_group(group, chain, fallback, share), chain)


@torch.inference_mode()
def _round_group(group: list[Target], chain: Chain, fallback: bool = False,
                 share: Group = ALONE) -> list[LinearResult]:
    """Round the linears of one input group (one call: a rounding may solve
    them together). fallback: round to nearest instead of the chain's rounding
    (an expert that observed too few tokens). share: the processes that split
    the group's rows."""
    for target in group:
        check_finite(target.linear.weight.data, f"the weight of {target.name}")
    clock = _clock(group[0].linear.weight.device)
    t = clock()
    rounding = chain.rounding
    weights, specs = [t.linear.weight.data for t in group], [t.spec for t in group]
    names = [t.name for t in group]
    if fallback:
        qws = [quantize_rtn(w, spec) for w, spec in zip(weights, specs)]
    elif share.alone:  # a rounding that does not split rows need not take `share` at all
        qws = rounding.round_group(names, weights, specs)
    else:
        qws = rounding.round_group(names, weights, specs, share=share)
    seconds = (clock() - t) / len(group)  # a joint solve's time, shared out
    results = []
    for target, qw in zip(group, qws):
        w = target.linear.weight.data
        result = LinearResult(target.name, qw, w.dtype, FALLBACK if fallback else rounding.name,
                              _relative_error(w, qw.dequantize(w.dtype)), seconds)
        for step in chain:
            result.facts.update(step.report(target.name))
        results.append(result)
    return results


@torch.inference_mode()
def _apply_group(group: list[Target], results: list[LinearResult], chain: Chain) -> list[LinearResult]:
    """The rounded weights written back (dequantized) into the group's linears, which the
    algorithms then forget."""
    for target, result in zip(group, results):
        w = target.linear.weight.data
        w.copy_(result.weight.dequantize(w.dtype))
        for step in chain:
            step.free(target.name)
    return results
