"""How large are the activation outliers SmoothQuant has to deal with, and what does it make of them?

Quantizes the model with a SmoothQuant recipe (default: the shipped
w8a8-int8-smoothquant) through the library's own driver and summarizes its
report per linear type: the outlier ratio of each linear's input (max over
channels / median over channels of the per-channel calibration max |x|) before
and after smoothing, and the migration strengths the search chose. The
perplexities of the W8A8 recipes come from scripts/bench_quality.py, which
evaluates the written checkpoints.

    python scripts/bench_smoothquant.py --num-samples 32 --json-out runs/sq-outliers.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from quantkit.algorithms import build_all
from quantkit.calibration import calibration_batch
from quantkit.checkpoint.report import layer_rows
from quantkit.models import load_model
from quantkit.pipeline import quantize_model
from quantkit.recipe import load_recipe


def summarize(layers: list[dict]) -> dict[str, dict]:
    by_kind: dict[str, list[dict]] = {}
    for row in layers:
        if "act_outlier_ratio" in row or "smooth_skipped" in row:
            by_kind.setdefault(row["name"].rsplit(".", 1)[-1], []).append(row)
    out = {}
    for kind, rows in by_kind.items():
        before = [r["act_outlier_ratio"] for r in rows if "act_outlier_ratio" in r]
        after = [r["act_outlier_ratio_smoothed"] for r in rows if "act_outlier_ratio_smoothed" in r]
        alphas = [r["smooth_alpha"] for r in rows if "smooth_alpha" in r]
        out[kind] = {
            "linears": len(rows),
            "outlier_ratio_before": {"median": statistics.median(before), "max": max(before)} if before else None,
            "outlier_ratio_after": {"median": statistics.median(after), "max": max(after)} if after else None,
            "alpha": {"median": statistics.median([a for a in alphas if a is not None] or [0.0]),
                      "none": sum(a is None for a in alphas)} if alphas else None,
            "skipped": sorted({r["smooth_skipped"] for r in rows if "smooth_skipped" in r}),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    p.add_argument("--recipe", default="w8a8-int8-smoothquant")
    p.add_argument("--num-samples", type=int, default=None, help="override the recipe's calibration samples")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args()

    recipe = load_recipe(args.recipe)
    if args.num_samples:
        recipe = dataclasses.replace(recipe, calibration=dataclasses.replace(recipe.calibration, num_samples=args.num_samples))
    if "smoothquant" not in [a.name for a in build_all(recipe)]:
        raise SystemExit(f"recipe {recipe.name} has no smoothquant step")
    loaded = load_model(args.model)
    c = recipe.calibration
    ids = calibration_batch(loaded.tokenizer, c.data, c.num_samples, c.seqlen, c.seed)
    t0 = time.perf_counter()
    result = quantize_model(loaded, recipe, ids, device=args.device)
    seconds = time.perf_counter() - t0
    summary = summarize(layer_rows(result))
    print(f"{recipe.name}: {c.num_samples} x {c.seqlen} calibration tokens, {seconds:.1f} s on {args.device}")
    print(f"{'linear':10s} {'n':>3s} {'ratio before (median / worst)':>30s} {'after':>18s} {'alpha median':>13s} {'no smoothing':>13s}")
    for kind, s in summary.items():
        b, a, al = s["outlier_ratio_before"], s["outlier_ratio_after"], s["alpha"]
        print(f"{kind:10s} {s['linears']:3d} "
              + (f"{b['median']:14.1f} / {b['max']:7.1f} {a['median']:9.1f} / {a['max']:6.1f} {al['median']:13.2f} {al['none']:13d}"
                 if b else f"  skipped: {'; '.join(s['skipped'])}"))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"recipe": recipe.name, "calibration": dataclasses.asdict(c), "seconds": seconds,
                                             "by_linear": summary}, indent=2))


if __name__ == "__main__":
    main()
