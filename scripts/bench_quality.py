"""Perplexity and quantization time of recipes on the real model, beside float.

    python scripts/bench_quality.py --recipes w4a16-rtn-g64 w4a16-rtn --windows 100

For each recipe: quantize a copy of the float model (model load excluded from
the time, and reported apart), write the checkpoint, load it back through our
reader (the packed weights and the kernel entry point, not a fake-quantized
copy) and evaluate it on both bundled held-out texts: perplexity, and the KL divergence of
its next-token distributions from the float model's (mean, 99th percentile, top-1 changed). Also checks that
transformers reads the checkpoint and computes the same (per layer, and
perplexity on the first --hf-windows windows). Prints a table and
writes the numbers as JSON (--json-out, rewritten after each recipe).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from quantkit.algorithms import build_all
from quantkit.algorithms.rotation import transform_config
from quantkit.budget import budget_recipe, choose as choose_budget, measure as measure_budget, summary as budget_summary, target_bits
from quantkit.calibration import EVALUATION_TEXTS, calibration_batch, evaluation_tokens
from quantkit.checkpoint import load_checkpoint, write_checkpoint
from quantkit.checkpoint.report import layer_rows
from quantkit.eval import perplexity
from quantkit.formats import IntSpec
from quantkit.models import load_model
from quantkit.models.families import checkpoint_name
from quantkit.devices import calibration_dtype
from quantkit.pipeline import needs_calibration, quantize_model
from quantkit.progress import QuantizeProgress
from quantkit.api import resolve_recipe


def hf_check(folder: Path, ours, ids: torch.Tensor, tokens: torch.Tensor, seqlen: int, windows: int) -> dict | None:
    """Does transformers (+ compressed-tensors) compute what our reader computes?

    Per layer: every quantized linear's output in transformers' forward against
    our module run on the very same input (max difference relative to the
    output's max). End to end: the max logit difference and both perplexities on
    the first `windows` windows. A quantized model is not a continuous function
    (a rounding flips when an input moves by one ulp), so the two forwards'
    summation orders alone can move single logits visibly: the per-layer check
    and the perplexities are what say the formats agree.
    """
    try:
        import compressed_tensors  # noqa: F401  (transformers needs it for this format)
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    try:
        theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=next(ours.parameters()).dtype).eval()
    except (RuntimeError, ValueError, AssertionError) as e:  # e.g. asymmetric zero points (llm-compressor #1618)
        return {"error": f"transformers cannot load it: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    mine = {n: m for n, m in ours.named_modules() if hasattr(m, "prepare")}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name):
        def hook(_module, args, out):
            seen.setdefault(name, (args[0].detach(), out.detach()))
        return hook

    handles = [theirs.get_submodule(n).register_forward_hook(keep(n)) for n in mine]
    with torch.inference_mode():
        logit_diff = float((theirs(ids).logits - ours(ids).logits).abs().max())
        layer_diff = max(float((mine[n](x) - y).abs().max() / y.abs().max().clamp_min(1e-30)) for n, (x, y) in seen.items())
    for h in handles:
        h.remove()
    r_ours = perplexity(ours, tokens, seqlen, windows, show_progress=False)
    r_theirs = perplexity(theirs, tokens, seqlen, windows, show_progress=False)
    return {"layers_checked": len(seen), "max_layer_rel_diff": layer_diff, "max_abs_logit_diff": logit_diff,
            "windows": windows, "ppl_ours": r_ours.perplexity, "ppl_transformers": r_theirs.perplexity}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="load the model in this dtype (default: as stored; the bundled GGUF is float32). The "
                        "float reference runs in it too, and the scales are stored in it, as for a 16-bit hub checkpoint")
    p.add_argument("--recipes", nargs="+", default=["w4a16-rtn-g64"])
    p.add_argument("--data", nargs="+", default=list(EVALUATION_TEXTS), help="evaluation texts (default: the three bundled ones)")
    p.add_argument("--scale-dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="weights.scale_dtype for every weight-only integer recipe (default: each recipe's own)")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="run each recipe once per calibration seed (default: the recipe's own), with a table of the spread")
    p.add_argument("--calib-data", default=None, help="calibration data for every recipe instead of its own (a name, path or mix)")
    p.add_argument("--no-kld", action="store_true", help="perplexity only: skip the float reference pass (half the evaluation time)")
    p.add_argument("--windows", type=int, default=100)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--device", default="cpu", help="quantize and evaluate here (cuda: W8A8 layers run torch._int_mm / _scaled_mm)")
    p.add_argument("--backends", nargs="+", default=["auto"],
                   help="kernel backends to evaluate each checkpoint with (auto = the fastest available; reference = the torch twin)")
    p.add_argument("--hf-windows", type=int, default=10, help="windows of the first text for the transformers round trip (0: skip)")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args()

    t0 = time.perf_counter()
    base = load_model(args.model, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    tokens = {d: evaluation_tokens(base.tokenizer, d) for d in args.data}
    probe = base.tokenizer("It is a truth universally acknowledged, that a single man", return_tensors="pt").input_ids

    rows = []

    def save() -> None:
        """The rows so far to --json-out (after every recipe: a long run that stops keeps what it measured)."""
        if args.json_out:
            meta = {"date": datetime.date.today().isoformat(), "machine": (torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()} {platform.processor()}")
                    + f" torch {torch.__version__}, {torch.get_num_threads()} threads", "device": args.device,
                    "model": base.source, "dtype": str(next(base.model.parameters()).dtype), "model_load_s": load_s, "windows": args.windows, "seqlen": args.seqlen}
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))

    for d in args.data:
        base.model.to(args.device)
        r = perplexity(base.model, tokens[d], args.seqlen, args.windows, label=f"float on {d}", device=args.device)
        base.model.to("cpu")
        rows.append({"model": "float", "data": d, "perplexity": r.perplexity, "windows": r.windows, "tokens": r.tokens, "eval_s": r.seconds})

    for name, seed in [(n, s) for n in args.recipes for s in (args.seeds or [None])]:
        recipe = resolve_recipe(name, args.calib_data)
        label = name if seed is None else f"{name} [seed {seed}]"
        if seed is not None:
            recipe = dataclasses.replace(recipe, calibration=dataclasses.replace(recipe.calibration, seed=seed))
        if args.scale_dtype and isinstance(recipe.weights, IntSpec) and recipe.activations is None:
            recipe = dataclasses.replace(recipe, weights=dataclasses.replace(recipe.weights, scale_dtype=args.scale_dtype))
        work = copy.deepcopy(base)
        calib, budget = None, None
        if needs_calibration(recipe, build_all(recipe)) or recipe.budget is not None:
            c = recipe.calibration
            calib = calibration_batch(base.tokenizer, c.data, c.num_samples, c.seqlen, c.seed, c.chat_template)
        t0 = time.perf_counter()
        if recipe.budget is not None:  # mixed precision, as api.quantize does it: measure, choose, quantize the choice
            dtype = calibration_dtype(recipe.calibration.dtype, next(work.model.parameters()).dtype, torch.device(args.device))
            costs = measure_budget(work, recipe, build_all(recipe), calib, torch.device(args.device), dtype, QuantizeProgress())
            choice = choose_budget(costs, target_bits(costs, recipe.budget))
            budget = budget_summary(costs, choice)
            recipe, work = budget_recipe(recipe, choice), copy.deepcopy(base)  # measuring may rotate: a fresh copy
        chain = build_all(recipe)
        result = quantize_model(work, recipe, calib, device=args.device, chain=chain)
        quant_s = time.perf_counter() - t0
        # an online rotation is recorded as the checkpoint's transform_config, as api.quantize writes it
        online = {checkpoint_name(work.family, n): b for r in chain.rotations for n, b in r.online_linears(work.model).items()}
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            folder = write_checkpoint(Path(tmp) / "checkpoint", work.model, work.tokenizer, result.weights, recipe.to_yaml(), {"layers": layer_rows(result)}, actorder=result.actorder,
                                      activations=result.activations, input_scales=result.input_scales,
                                      transforms=transform_config(online))
            write_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            ours = load_checkpoint(folder)
            read_s = time.perf_counter() - t0
            hf = hf_check(folder, ours.model, probe, tokens[args.data[0]], args.seqlen, args.hf_windows) if args.hf_windows else None
            for backend in args.backends:
                ours = load_checkpoint(folder, backend=None if backend == "auto" else backend, device=args.device)
                used = sorted({m._prepared.backend for m in ours.model.modules() if getattr(m, "_prepared", None) is not None})
                base.model.to(args.device)
                for d in args.data:
                    r = perplexity(ours.model, tokens[d], args.seqlen, args.windows, label=f"{name} on {d}", device=args.device,
                                   reference=None if args.no_kld else base.model)
                    rows.append({
                        "model": label if len(args.backends) == 1 else f"{label} [{backend}]", "backend": used, "data": d,
                        "recipe": name, "seed": recipe.calibration.seed,
                        "calibration": recipe.calibration.data if calib is not None else None,
                        "budget": budget and {k: budget[k] for k in ("bits_per_weight", "linears_per_format")},
                        "perplexity": r.perplexity, "windows": r.windows, "tokens": r.tokens, "eval_s": r.seconds,
                        "kld_mean": r.kld_mean, "kld_p99": r.kld_p99, "top1_changed": r.top1_changed,
                        "quantize_s": quant_s, "quantize_breakdown_s": result.seconds, "write_s": write_s, "read_s": read_s,
                        "transformers": hf, "group_sizes": sorted({str(g["group_size"]) for g in layer_rows(result)}),
                    })
                base.model.to("cpu")
        del work, ours
        save()

    floats = {r["data"]: r["perplexity"] for r in rows if r["model"] == "float"}
    table = Table(title=f"perplexity, {args.windows} x {args.seqlen}-token windows (model load {load_s:.1f} s, excluded)")
    for col in ("model", "calibration", "data", "ppl", "vs float", "KLD mean", "KLD p99", "top-1 changed", "quantize s", "write s",
                "HF layer diff", "HF ppl (ours)"):
        table.add_column(col, justify="left" if col in ("model", "calibration", "data") else "right")
    for r in rows:
        q = r["model"] != "float"
        table.add_row(r["model"], r.get("calibration") or "", r["data"], f"{r['perplexity']:.2f}", f"{100 * (r['perplexity'] / floats[r['data']] - 1):+.1f}%" if q else "",
                      f"{r['kld_mean']:.4f}" if q and r["kld_mean"] is not None else "",
                      f"{r['kld_p99']:.4f}" if q and r["kld_p99"] is not None else "",
                      f"{100 * r['top1_changed']:.2f}%" if q and r["top1_changed"] is not None else "",
                      f"{r['quantize_s']:.2f}" if q else "", f"{r['write_s']:.2f}" if q else "",
                      ("no load" if "error" in hf else f"{hf['max_layer_rel_diff']:.1e}") if (hf := r.get("transformers")) else "",
                      f"{hf['ppl_transformers']:.3f} ({hf['ppl_ours']:.3f})" if hf and "error" not in hf else "")
    Console().print(table)
    if args.seeds and len(args.seeds) > 1:
        Console().print(spread_table(rows, floats))
    save()


def spread_table(rows: list[dict], floats: dict[str, float]) -> Table:
    """Each recipe's perplexity and KL over the calibration seeds: mean, lowest and highest."""
    table = Table(title="over calibration seeds (mean, lowest - highest)")
    for col in ("recipe", "data", "seeds", "ppl mean", "ppl range", "vs float", "KLD mean", "KLD range"):
        table.add_column(col, justify="left" if col in ("recipe", "data") else "right")
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["model"] != "float":
            groups.setdefault((r["recipe"], r["data"]), []).append(r)
    for (recipe, data), rs in groups.items():
        ppl = [r["perplexity"] for r in rs]
        kl = [r["kld_mean"] for r in rs if r["kld_mean"] is not None]
        mean = sum(ppl) / len(ppl)
        table.add_row(recipe, data, str(len(rs)), f"{mean:.2f}", f"{min(ppl):.2f} - {max(ppl):.2f}",
                      f"{100 * (mean / floats[data] - 1):+.1f}%",
                      f"{sum(kl) / len(kl):.4f}" if kl else "", f"{min(kl):.4f} - {max(kl):.4f}" if kl else "")
    return table


if __name__ == "__main__":
    main()
