"""Mixed precision under a size budget: one format per linear, chosen from calibration statistics.

One bit width for every layer is a blunt tool: layers differ widely in how much rounding hurts
the model. With `budget: {bits_per_weight: B}` in a recipe, quantkit first measures, then chooses,
then quantizes as usual with the choice written into the recipe as per-layer overrides:

    measure   one walk over the float model (rotated first when the recipe rotates), block by
              block as the driver walks it: each input group's Hessian H = 2/n X^T X observed,
              the block's float output propagated; for each linear and each candidate format,
              the weight rounded the way the recipe's rounding would (GPTQ's trial rounding
              against its own Hessian, else round-to-nearest) and its predicted output error
              tr(dW H dW^T) = n^-1 |X dW^T|^2 / 2 (the squared error it adds to its output,
              summed over the calibration tokens: comparable across layers), and its bytes as
              the checkpoint will hold them (packed values, scales, zero points);
    choose    a multiple-choice knapsack: minimize the summed errors with the summed bytes
              within B bits per weight. Lagrangian relaxation (each linear takes the format
              minimizing error + lambda * bytes, lambda bisected to the smallest that fits),
              then the leftover budget spent greedily on the upgrades with the best error
              saved per byte;
    quantize  the recipe with one override per linear (exact names) and the 16-bit ones in
              `ignore`: a checkpoint with one config group per format, which transformers and
              quantkit read. The recipe copy in the checkpoint holds those overrides, so it
              repeats the run without measuring again.

The errors assume each linear's rounding alone; the transforms of the recipe (AWQ, SmoothQuant)
are not applied while measuring.

An error in one linear's output matters as much as the model's loss responds to it, which the
output error alone does not see (an early layer's error passes through every later block; a
late MLP's mostly reaches one head). With `sensitivity: gradient`, one backward pass of the
float model over `gradient_samples` calibration windows gives each linear's output channels
their mean squared loss gradient G_i = mean_t (dL/dy_ti)^2, and a candidate's error becomes

    sum_i G_i sum_t (dW x_t)_i^2                (a second-order estimate of the loss it adds,
                                                 gradients and rounding errors independent)

as K-FAC factors the curvature (Martens & Grosse 2015), with H in place of the input factor.
That pass holds the whole model on the device, unlike the rest of the walk.

With `sensitivity: measured` the scale of each linear is measured instead of estimated: the
float model runs over `measured_samples` calibration windows; then, one linear at a time, that
linear alone is rounded to the reference candidate (round-to-nearest) and the model runs again.
The mean KL divergence of its next-token distributions from the float model's, divided by the
mean squared error the rounding added to that linear's output on the same tokens, is the
linear's sensitivity c, and a candidate's cost becomes

    c * mean_t |dW x_t|^2                        (the KL divergence it is predicted to add)

The rounding error's size per candidate still comes from the calibration Hessian (and GPTQ's
trial rounding); only how much the model's output moves per unit of it is measured. No
second-order approximation stands between the rounding and the model's output: layers whose
errors the rest of the network amplifies (or absorbs) are seen as such. It costs one forward of
the windows per targeted linear, the whole model on the device.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass

import torch

from quantkit.algorithms import Chain
from quantkit.algorithms.folding import Target
from quantkit.algorithms.statistics import InputStatistics
from quantkit.checkpoint.report import packed_nbytes
from quantkit.formats import IntSpec, quantize_rtn
from quantkit.forwards import blocks_of, capture_block_inputs, observe, propagate
from quantkit.models import LoadedModel
from quantkit.models.families import block_family, final_logit_softcap, layer_types
from quantkit.pipeline import _input_groups
from quantkit.progress import QuantizeProgress
from quantkit.recipe import BudgetConfig, LayerOverride, Recipe


@dataclass
class Costs:
    """One linear's candidates: name -> (predicted output error, bytes)."""

    name: str
    numel: int
    options: dict[str, tuple[float, int]]


def _candidate_spec(recipe: Recipe, spec: IntSpec | None, name: str, in_features: int) -> IntSpec | None:
    """A candidate's spec for this linear, through the recipe's partial_groups policy."""
    if spec is None:
        return None
    fields = tuple(sorted({"bits": spec.bits, "group_size": spec.group_size}.items()))
    probe = dataclasses.replace(recipe, overrides=(LayerOverride(".*", fields),), ignore=(), targets=(r".*",),
                                budget=None)
    return probe.spec_for(name, in_features)


@torch.inference_mode()
def measure(loaded: LoadedModel, recipe: Recipe, chain: Chain, calibration_ids: torch.Tensor, device,
            dtype: torch.dtype, progress: QuantizeProgress | None = None) -> list[Costs]:
    """Every targeted linear's candidates (module docstring), one block at a time."""
    progress = progress or QuantizeProgress()
    family, config = loaded.family, loaded.model.config
    candidates = recipe.budget.specs(recipe.weights)
    for rotation in chain.rotations:
        rotation.prepare(loaded)
    rounder = chain.rounding.trial_rounder()
    equalize = getattr(chain.rounding.options, "equalize_tokens", True)
    weights, measured = None, None
    if recipe.budget.sensitivity == "gradient":
        n = min(recipe.budget.gradient_samples, calibration_ids.shape[0])
        weights = output_sensitivities(loaded, calibration_ids[:n], device, recipe)
        typical = float(torch.cat([g.flatten() for g in weights.values()]).mean()) if weights else 1.0
    elif recipe.budget.sensitivity == "measured":
        n = min(recipe.budget.measured_samples, calibration_ids.shape[0])
        reference = recipe.budget.reference_candidate()
        measured = measured_sensitivities(loaded, calibration_ids[:n], device, recipe, reference, progress)
        typical = sum(measured.values()) / len(measured) if measured else 1.0
    loaded.materialize(family.embed)
    inputs = capture_block_inputs(loaded, calibration_ids, device, recipe.calibration.batch_size, dtype)
    loaded.release(family.embed)
    blocks, kinds = blocks_of(loaded), layer_types(config)
    costs: list[Costs] = []
    progress.start(len(blocks), f"measure ({recipe.name}: {len(candidates)} formats per linear)")
    for i, block in enumerate(blocks):
        prefix = f"{family.blocks}.{i}"
        loaded.materialize(prefix)
        fam = block_family(family, config, i)
        block.to(device)
        fwd = block if dtype == next(block.parameters()).dtype else copy.deepcopy(block).to(dtype)
        targets = [Target(rel, f"{prefix}.{rel}", block.get_submodule(rel), None) for rel in fam.linears
                   if recipe.spec_for(f"{prefix}.{rel}", block.get_submodule(rel).in_features) is not None]
        groups = _input_groups(targets, fam.shared_inputs)
        plain = InputStatistics("budget", hessian=True, equalize=False)
        own = InputStatistics("budget", hessian=True, equalize=equalize) if rounder is not None else None
        observers = [plain] + ([own] if own is not None else [])
        if groups:
            observe(fwd, inputs, groups, observers, None, set(), kinds[i])
        for group in groups:
            for t in group:
                if t.name not in plain:  # an expert no calibration token reached: rounding is all it gets
                    H = torch.zeros(t.linear.in_features, t.linear.in_features, device=device)
                else:
                    H = plain[t.name].hessian
                w = t.linear.weight.data.to(torch.float32)
                options = {}
                for cname, cspec in candidates.items():
                    spec = _candidate_spec(recipe, cspec, t.name, t.linear.in_features)
                    if spec is None:  # kept as it is: the model's dtype
                        options[cname] = (0.0, w.numel() * t.linear.weight.element_size())
                        continue
                    if rounder is not None and t.name in own:
                        w_hat = rounder([w], own[t.name].hessian, [spec])[0]
                    else:
                        w_hat = quantize_rtn(w, spec).dequantize(torch.float32)
                    dw = (w - w_hat).to(H.dtype)
                    rows = ((dw @ H) * dw).sum(dim=1)  # per output channel: mean over tokens of 2 (dW x)_i^2
                    if weights is not None:  # an expert no token reached in that pass: a typical channel's weight
                        rows = rows * (weights[t.name].to(rows) if t.name in weights else typical)
                    if measured is not None:  # the KL divergence it is predicted to add (module docstring)
                        error = float(rows.sum()) / 2 * measured.get(t.name, typical) if t.name in plain else 0.0
                    else:
                        error = float(rows.sum()) * plain[t.name].tokens / 2 if t.name in plain else 0.0
                    options[cname] = (max(error, 0.0), packed_nbytes(quantize_rtn(t.linear.weight.data, spec)))
                costs.append(Costs(t.name, w.numel(), options))
        for t in targets:
            plain.free(t.name)
            if own is not None:
                own.free(t.name)
        if i + 1 < len(blocks):
            inputs = propagate(fwd, inputs, None, set(), kinds[i])
        del fwd
        block.to("cpu")
        loaded.release(prefix)
        progress.block_done()
    return costs


def output_sensitivities(loaded: LoadedModel, ids: torch.Tensor, device, recipe: Recipe) -> dict[str, torch.Tensor]:
    """Linear name -> [out] float32: the mean over `ids`' tokens of the squared gradient of the
    model's next-token loss (summed over tokens) with respect to each output channel, for every
    linear the recipe targets, in the model's own dtype. The whole model is read and moved to
    `device` for the pass (and put back on the CPU, and a lazy model's weights given back, after it)."""
    model, family = loaded.model, loaded.family
    with torch.inference_mode(False):  # read outside inference mode: autograd saves these tensors
        parts = _whole_model(loaded, device)
        for m in model.modules():  # tensors made in inference mode (a model loaded in it) as normal ones
            for key, t in list(m._parameters.items()):
                if t is not None and t.is_inference():
                    m._parameters[key] = torch.nn.Parameter(t.clone(), requires_grad=False)
            for key, t in list(m._buffers.items()):
                if t is not None and t.is_inference():
                    m._buffers[key] = t.clone()
    found: dict[str, torch.Tensor] = {}
    hooks = []

    def watch(name: str):
        def forward_hook(_module, _args, out):
            def grad_hook(g):
                sq = g.detach().to(torch.float32).pow(2).flatten(0, -2).sum(dim=0)
                found[name] = sq if name not in found else found[name] + sq
            if out.requires_grad:
                out.register_hook(grad_hook)
        return forward_hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith(f"{family.blocks}.") and \
                recipe.spec_for(name, module.in_features) is not None:
            hooks.append(module.register_forward_hook(watch(name)))
    # the parameters need no gradient: the graph starts at the embeddings' output
    hooks.append(model.get_submodule(family.embed).register_forward_hook(lambda _m, _a, out: out.requires_grad_()))
    tokens = 0
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for batch in ids.split(max(1, min(recipe.calibration.batch_size, 4))):
                batch = batch.to(device)
                logits = model(input_ids=batch).logits[:, :-1].to(torch.float32)
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         batch[:, 1:].reshape(-1), reduction="sum")
                loss.backward()
                tokens += batch.numel()
                del logits, loss
    finally:
        for h in hooks:
            h.remove()
        _give_back(loaded, parts)
    return {name: g / max(tokens, 1) for name, g in found.items()}


def _whole_model(loaded: LoadedModel, device) -> list[str]:
    """Read every part of the model and move it to `device` (a lazy model's parts as the walk
    reads them: a rotation rewrites each as it is read); the parts, for _give_back."""
    family = loaded.family
    parts = [family.embed, *(f"{family.blocks}.{i}" for i in range(len(blocks_of(loaded)))), family.final_norm,
             family.lm_head]
    for part in parts:
        loaded.materialize(part)
    loaded.model.to(device)
    return parts


def _give_back(loaded: LoadedModel, parts: list[str]) -> None:
    loaded.model.to("cpu")
    for part in parts:
        loaded.release(part)


@torch.inference_mode()
def measured_sensitivities(loaded: LoadedModel, ids: torch.Tensor, device, recipe: Recipe, reference: str,
                           progress: QuantizeProgress | None = None) -> dict[str, float]:
    """Linear name -> KL divergence per unit of mean squared output error (module docstring), for
    every linear the recipe targets, each rounded alone to candidate `reference` (round-to-nearest)."""
    progress = progress or QuantizeProgress()
    model, family = loaded.model, loaded.family
    spec = recipe.budget.specs(recipe.weights)[reference]
    parts = _whole_model(loaded, device)
    head = model.get_submodule(family.lm_head)
    # the float model's last hidden states, from which its logits are computed again for each KL (far
    # smaller than the logits); where the model's logits are not its head's (a scaling this module does
    # not know), the float logits themselves, in bfloat16
    finals: list[torch.Tensor] = []
    grab = head.register_forward_pre_hook(lambda _m, args: finals.append(args[0][:, :-1].detach().clone()))
    batches = ids.split(max(1, min(recipe.calibration.batch_size, 4)))
    try:
        kept, own_head = [], None
        try:
            for batch in batches:
                logits = model(input_ids=batch.to(device), use_cache=False).logits[:, :-1].to(torch.float32)
                if own_head is None:  # asked of the first batch, the head called directly (not through the hook)
                    own_head = torch.allclose(_logits(loaded, head.forward, finals[0]), logits, rtol=1e-3, atol=1e-3)
                if not own_head:
                    kept.append(logits.to(torch.bfloat16))
                del logits
        finally:
            grab.remove()
        if not own_head:
            finals = kept
        targets = [(name, m) for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and name.startswith(f"{family.blocks}.")
                   and recipe.spec_for(name, m.in_features) is not None]
        found: dict[str, float] = {}
        progress.start(len(targets), f"measure sensitivities ({len(targets)} linears rounded to {reference} one at a time)")
        for name, linear in targets:
            w = linear.weight.data.clone()
            w_hat = quantize_rtn(w, _candidate_spec(recipe, spec, name, linear.in_features)).dequantize(w.dtype)
            dw = (w - w_hat).to(torch.float32)
            err = [0.0, 0]

            def added(_m, args, dw=dw, err=err):
                x = args[0].detach().flatten(0, -2).to(torch.float32)
                err[0] += float((x @ dw.T).pow(2).sum())
                err[1] += x.shape[0]

            hook = linear.register_forward_pre_hook(added)
            linear.weight.data.copy_(w_hat)
            kl, tokens = 0.0, 0
            try:
                for batch, final in zip(batches, finals):
                    logits = model(input_ids=batch.to(device), use_cache=False).logits[:, :-1].to(torch.float32)
                    ours = torch.log_softmax(logits, dim=-1)
                    ref = torch.log_softmax(_logits(loaded, head, final) if own_head else final.to(torch.float32), dim=-1)
                    kl += float((ref.exp() * (ref - ours)).sum())
                    tokens += ref.shape[0] * ref.shape[1]
                    del logits, ours, ref
            finally:
                hook.remove()
                linear.weight.data.copy_(w)
            mean_err = err[0] / max(err[1], 1)
            if err[1]:  # an expert no token reached has nothing measured: the typical value stands in
                found[name] = max(kl / max(tokens, 1), 0.0) / mean_err if mean_err > 0 else 0.0
            progress.block_done()
    finally:
        _give_back(loaded, parts)
    return found


def _logits(loaded: LoadedModel, head, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from its last hidden states through `head` (the output head, or its forward:
    no hooks), with its final soft-capping where it has one."""
    logits = head(hidden).to(torch.float32)
    cap = final_logit_softcap(loaded.model.config)
    return logits if not cap else torch.tanh(logits / cap) * cap


def target_bits(costs: list[Costs], budget: BudgetConfig) -> float:
    """The budget in bits per weight: as given, or (size_of) what that candidate takes on every linear."""
    if budget.bits_per_weight is not None:
        return budget.bits_per_weight
    return 8 * sum(c.options[budget.size_of][1] for c in costs) / sum(c.numel for c in costs)


def choose(costs: list[Costs], bits_per_weight: float) -> dict[str, str]:
    """Linear name -> candidate: the least total error within the budget (module docstring).
    ValueError when even the smallest format of every linear does not fit."""
    budget = bits_per_weight * sum(c.numel for c in costs) / 8
    smallest = sum(min(b for _, b in c.options.values()) for c in costs)
    if smallest > budget:
        raise ValueError(f"budget: {bits_per_weight:g} bits per weight is below what the smallest candidate of every "
                         f"linear takes ({8 * smallest / sum(c.numel for c in costs):.3f}); raise it or add smaller candidates")

    def pick(lam: float) -> dict[str, str]:
        return {c.name: min(c.options, key=lambda k: (c.options[k][0] + lam * c.options[k][1], c.options[k][1]))
                for c in costs}

    def size(choice: dict[str, str]) -> int:
        return sum(c.options[choice[c.name]][1] for c in costs)

    lo, hi = 0.0, 1.0
    while size(pick(hi)) > budget:
        hi *= 4
    if size(pick(lo)) <= budget:
        hi = lo
    for _ in range(100):  # the smallest lambda whose choice fits
        if hi - lo <= 1e-12 * max(hi, 1e-300):
            break
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if size(pick(mid)) <= budget else (mid, hi)
    choice = pick(hi)
    left = budget - size(choice)
    by_name = {c.name: c for c in costs}
    while True:  # spend what is left on the upgrades saving the most error per byte
        best, ratio = None, 0.0
        for name, current in choice.items():
            err0, bytes0 = by_name[name].options[current]
            for cand, (err, nbytes) in by_name[name].options.items():
                extra = nbytes - bytes0
                if err < err0 and 0 < extra <= left and (err0 - err) / extra > ratio:
                    best, ratio = (name, cand, extra), (err0 - err) / extra
        if best is None:
            return choice
        choice[best[0]] = best[1]
        left -= best[2]


def budget_recipe(recipe: Recipe, choice: dict[str, str]) -> Recipe:
    """The recipe with the choice as per-layer overrides (exact names) and 16-bit layers ignored;
    no budget left in it, so it repeats the run without measuring."""
    specs = recipe.budget.specs(recipe.weights)
    overrides, ignore = list(recipe.overrides), list(recipe.ignore)
    for name, cand in sorted(choice.items()):
        pattern = f"^{re.escape(name)}$"
        if specs[cand] is None:
            ignore.append(pattern)
        else:
            fields = {"bits": specs[cand].bits, "group_size": specs[cand].group_size}
            overrides.append(LayerOverride(pattern, tuple(sorted(fields.items(), key=lambda kv: kv[0]))))
    return dataclasses.replace(recipe, overrides=tuple(overrides), ignore=tuple(ignore), budget=None)


def summary(costs: list[Costs], choice: dict[str, str]) -> dict:
    """What the report keeps of the choice: per candidate how many linears, and the bits per weight."""
    numel = sum(c.numel for c in costs)
    nbytes = sum(c.options[choice[c.name]][1] for c in costs)
    counts: dict[str, int] = {}
    for cand in choice.values():
        counts[cand] = counts.get(cand, 0) + 1
    return {"bits_per_weight": 8 * nbytes / numel, "linears_per_format": counts,
            "predicted_error": sum(c.options[choice[c.name]][0] for c in costs),
            "choice": {c.name: {"format": choice[c.name], "predicted_error": c.options[choice[c.name]][0],
                                "candidates": {k: {"error": e, "bytes": b} for k, (e, b) in c.options.items()}}
                       for c in costs}}
