"""GPTQ rounding driven by the block-by-block pipeline (math in gptq_math.py, statistics in statistics.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from quantkit.algorithms.base import Rounder, Rounding, register
from quantkit.algorithms.gptq_math import gptq_quantize
from quantkit.algorithms.statistics import InputStatistics
from quantkit.distributed import ALONE, Group
from quantkit.errors import NumericalError
from quantkit.formats import FloatSpec, IntSpec, QuantizedWeight, per_tensor
from quantkit.parsing import shown
from quantkit.recipe import Recipe, RecipeError


@dataclass(frozen=True)
class GPTQOptions:
    dampening: float = 0.01  # lambda as a fraction of mean(diag H); grows 10x while H is not positive definite
    block_size: int = 128  # columns per lazy batch update
    actorder: Literal["group", "weight"] | None = None  # compressed-tensors semantics
    static_groups: bool = False
    true_sequential: bool = True  # calibrate later sub-layers on the quantized earlier ones
    # every calibration token weighs the same in H (rows scaled to unit norm), so
    # attention-sink tokens with massive activations do not dominate it;
    # false: plain GPTQ, each token weighted by its squared norm
    equalize_tokens: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.dampening < 1:  # NaN fails too
            raise ValueError(f"dampening must be in (0, 1), got {self.dampening}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {shown(self.block_size)}")


@register
class GPTQ(Rounding):
    name = "gptq"
    Options = GPTQOptions
    weight_specs = (IntSpec, FloatSpec)
    observes = True
    splits_rows = True

    def __init__(self, options: GPTQOptions, activations=None) -> None:
        super().__init__(options, activations)
        self._stats = InputStatistics("GPTQ", hessian=True, equalize=options.equalize_tokens)
        self._reports: dict[str, dict] = {}

    def check(self, recipe: Recipe) -> None:
        super().check(recipe)
        if self.options.actorder == "group" and recipe.activations is not None and recipe.weights.group_size is not None:
            raise RecipeError(f"recipe {shown(recipe.name)}: gptq actorder: group records each column's group "
                              f"(g_idx), which compressed-tensors' int-quantized format ({recipe.scheme}) has no "
                              f"tensor for; use actorder: weight (the same column order, contiguous groups)")

    @property
    def sequential(self) -> bool:
        return self.options.true_sequential

    def observe(self, names: tuple[str, ...], x: torch.Tensor) -> None:
        self._stats.observe(names, x)

    def round_group(self, names: list[str], weights: list[torch.Tensor], specs: list[IntSpec],
                    share: Group = ALONE) -> list[QuantizedWeight]:
        """Linears that share a Hessian and a spec are rounded in one solve:
        GPTQ treats output rows independently given H, so stacking q/k/v (or
        gate/up) row-wise gives each the same result as its own solve, with
        one factorization and one column loop instead of three. For the same
        reason several processes (share) can each solve a share of the stacked
        rows and gather the rest; a per-tensor scale, which needs every row,
        is solved whole on each."""
        out: dict[str, QuantizedWeight] = {}
        batches: dict[tuple, list[int]] = {}
        for i, (name, weight, spec) in enumerate(zip(names, weights, specs)):
            key = (id(self._stats[name]), spec, weight.shape[1], weight.dtype, weight.device)
            if per_tensor(spec):
                key += (name,)  # one scale per linear: stacked rows would share it
            batches.setdefault(key, []).append(i)
        for members in batches.values():
            self._solve([names[i] for i in members], [weights[i] for i in members], specs[members[0]], share, out)
        return [out[name] for name in names]

    def _solve(self, names: list[str], weights: list[torch.Tensor], spec: IntSpec, share: Group, out: dict) -> None:
        H = self._stats[names[0]].hessian
        o = self.options
        W = torch.cat(weights) if len(weights) > 1 else weights[0]
        if per_tensor(spec) or W.shape[0] < share.world:  # one scale from every row; fewer rows than processes
            share = ALONE
        mine = share.share(W.shape[0])
        try:
            result = gptq_quantize(W[mine], H, spec, o.dampening, o.block_size, o.actorder, o.static_groups)
        except torch.linalg.LinAlgError as e:
            raise NumericalError(f"GPTQ failed on {', '.join(names)}: {e}") from e
        qw, row_loss = result.weight, result.row_loss
        if not share.alone:  # every process's rows, in order (the factorization, hence g_idx, is the same on each)
            n = W.shape[0]
            qw = QuantizedWeight(q=share.gather_rows(qw.q, n), scale=share.gather_rows(qw.scale, n),
                                 zero_point=share.gather_rows(qw.zero_point, n), spec=spec, g_idx=qw.g_idx)
            row_loss = share.gather_rows(row_loss, n)
        start = 0
        for name, weight in zip(names, weights):
            rows = slice(start, start + weight.shape[0])
            start = rows.stop
            part = QuantizedWeight(q=qw.q[rows].clone(), scale=qw.scale[rows].clone(), zero_point=qw.zero_point[rows].clone(),
                                   spec=spec, g_idx=None if qw.g_idx is None else qw.g_idx.clone())
            out[name] = part
            W = weight.to(torch.float32)
            dW = W - part.dequantize(torch.float32)
            # relative output error ||X dW^T|| / ||X W^T|| from H = 2/n X^T X
            num = float(((dW @ H) * dW).sum())
            den = float(((W @ H) * W).sum())
            self._reports[name] = {
                "gptq_loss": float(row_loss[rows].sum()),
                "damping": result.damping,
                "damping_raised": result.damping > o.dampening,  # H was not positive definite at first
                "dead_columns": result.dead_columns,
                "output_rel_error": math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0,
            }

    def trial_rounder(self) -> Rounder:
        return self.trial_round

    def trial_round(self, weights: list[torch.Tensor], H: torch.Tensor, specs: list[IntSpec]) -> list[torch.Tensor]:
        """GPTQ against the given H (one solve per spec; rows are independent)."""
        o = self.options
        out: list[torch.Tensor | None] = [None] * len(weights)
        # one solve per spec; a per-tensor FP8 scale belongs to one linear, so those solve alone
        keys = [(s, i if per_tensor(s) else None) for i, s in enumerate(specs)]
        for key in dict.fromkeys(keys):
            idx = [i for i, k in enumerate(keys) if k == key]
            spec = key[0]
            W = torch.cat([weights[i] for i in idx])
            try:
                deq = gptq_quantize(W, H, spec, o.dampening, o.block_size, o.actorder, o.static_groups).weight.dequantize(torch.float32)
            except torch.linalg.LinAlgError as e:
                raise NumericalError(f"GPTQ trial rounding failed: {e}") from e
            for i, part in zip(idx, deq.split([weights[i].shape[0] for i in idx])):
                out[i] = part
        return out

    def actorder(self) -> str | None:
        return self.options.actorder

    def report(self, name: str) -> dict:
        return self._reports.get(name, {})

    def free(self, name: str) -> None:
        self._stats.free(name)
        self._reports.pop(name, None)

    @classmethod
    def summarize(cls, rows: list[dict]) -> list[tuple[str, str]]:
        lines = []
        errors = [r for r in rows if "output_rel_error" in r]
        if errors:
            worst = max(errors, key=lambda r: r["output_rel_error"])
            mean = sum(r["output_rel_error"] for r in errors) / len(errors)
            lines.append(("output rel. error", f"mean {mean:.4f}, worst {worst['output_rel_error']:.4f} ({worst['name']})"))
        raised = [r["name"] for r in rows if r.get("damping_raised")]
        if raised:
            lines.append(("damping raised", ", ".join(raised)))
        return lines
