"""W8A8 on the real SmolLM2 before the A8 path exists in recipes: how large are the
activation outliers, and what do int8 / FP8 activations cost with and without SmoothQuant?

Activation quantization is applied here by forward pre-hooks on every quantized linear
(quantkit.formats.activation.fake_quantize on its input); the weights go through the
library (SmoothQuant transform + RTN W8 per channel via quantize_model, or FP8 per channel).
Static scales: each linear's input |x| maximum over the calibration batch, measured on the
model with quantized weights.

    PYTHONPATH=. python scripts/bench_smoothquant.py --inputs runs/gptq-bench --calib-samples 32 --windows 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from bench_common import load_inputs, machine  # noqa: E402

from quantkit.algorithms.smoothquant import outlier_ratio  # noqa: E402
from quantkit.eval import perplexity  # noqa: E402
from quantkit.formats.activation import ActSpec, fake_quantize, scale_for  # noqa: E402
from quantkit.models import load_model  # noqa: E402
from quantkit.pipeline import quantize_model  # noqa: E402
from quantkit.recipe import Recipe  # noqa: E402


def linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}


@torch.inference_mode()
def input_absmax(model, calib: torch.Tensor, per_channel: bool) -> dict[str, torch.Tensor]:
    """Each linear's input max |x| over the calibration ids: per channel [in], or one value."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().flatten(0, -2).abs()
            m = x.amax(dim=0) if per_channel else x.amax()
            seen[name] = m if name not in seen else torch.maximum(seen[name], m)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears(model).items()]
    for i in range(0, calib.shape[0], 8):
        model(input_ids=calib[i : i + 8], use_cache=False)
    for h in handles:
        h.remove()
    return seen


def quantize_inputs(model, spec: ActSpec, static: dict[str, torch.Tensor] | None) -> None:
    for name, m in linears(model).items():
        scale = None if spec.dynamic else scale_for(static[name], spec)
        m.register_forward_pre_hook(lambda mod, args, s=scale: (fake_quantize(args[0], spec, s),))


@torch.no_grad()
def fp8_weights(model) -> None:
    for m in linears(model).values():  # per output channel: each row its own scale
        m.weight.copy_(fake_quantize(m.weight, ActSpec("fp8", dynamic=True)))


def variant(args, calib, evals, weights: str, acts: ActSpec | None, smooth: bool) -> dict:
    loaded = load_model(args.inputs / "model", dtype="float32")
    t = time.perf_counter()
    if weights == "int8":
        algos = ([{"smoothquant": {"alpha": args.alpha}}] if smooth else []) + ["rtn"]
        recipe = Recipe.from_dict({"name": "w8", "scheme": "W8A16", "weights": {"bits": 8, "group_size": None},
                                   "algorithms": algos, "calibration": {"num_samples": calib.shape[0], "seqlen": calib.shape[1]}})
        quantize_model(loaded, recipe, calib, show_progress=False)
    elif weights == "fp8":
        if smooth:
            raise SystemExit("fp8 + smoothquant: not in this script")
        fp8_weights(loaded.model)
    static = None
    if acts is not None and not acts.dynamic:
        static = input_absmax(loaded.model, calib, per_channel=False)
    if acts is not None:
        quantize_inputs(loaded.model, acts, static)
    seconds = time.perf_counter() - t
    ppl = {k: perplexity(loaded.model, w.flatten(), w.shape[1], None, 4, show_progress=False).perplexity for k, w in evals.items()}
    label = f"W{weights or 'float'} A{'float' if acts is None else acts.type + (' dynamic' if acts.dynamic else ' static')}" + (
        f" + SmoothQuant a={args.alpha}" if smooth else "")
    return {"variant": label, "ppl": ppl, "prepare_s": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", type=Path, default=Path("runs/gptq-bench"))
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--alpha", type=lambda v: v if v == "search" else float(v), default=0.5,
                   help="SmoothQuant's migration strength, or 'search' (per mapping, scored with int8 activations)")
    p.add_argument("--smooth-only", action="store_true", help="only the SmoothQuant rows (no outlier statistics)")
    args = p.parse_args()
    _, calib, evals = load_inputs(args.inputs, args.calib_samples, args.windows)

    if args.smooth_only:
        return run_rows(args, calib, evals, [("int8", ActSpec("int8", True), True), ("int8", ActSpec("int8", False), True)])
    # 1. the outliers: per-channel max |x| of every linear input, max / median over channels
    loaded = load_model(args.inputs / "model", dtype="float32")
    stats = input_absmax(loaded.model, calib, per_channel=True)
    by_kind: dict[str, list[float]] = {}
    for name, m in stats.items():
        by_kind.setdefault(name.rsplit(".", 1)[-1], []).append(outlier_ratio(m))
    outliers = {k: {"median": sorted(v)[len(v) // 2], "max": max(v)} for k, v in by_kind.items()}
    print(json.dumps({"outlier_ratio_max_over_median": outliers}), flush=True)
    del loaded

    run_rows(args, calib, evals, [
        (None, None, False),
        ("int8", None, False),
        ("int8", ActSpec("int8", True), False), ("int8", ActSpec("int8", True), True),
        ("int8", ActSpec("int8", False), False), ("int8", ActSpec("int8", False), True),
        ("fp8", ActSpec("fp8", True), False), ("fp8", ActSpec("fp8", False), False),
    ])


def run_rows(args, calib, evals, variants) -> None:
    rows = []
    for weights, acts, smooth in variants:
        r = variant(args, calib, evals, weights, acts, smooth)
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(f"\n{args.calib_samples} calibration x {calib.shape[1]}, {args.windows} windows per text, float32, {machine()}")
    print(f"{'variant':55s} {'austen-eval':>12s} {'pydocs-eval':>12s}")
    for r in rows:
        print(f"{r['variant']:55s} {r['ppl']['austen-eval']:12.2f} {r['ppl']['pydocs-eval']:12.2f}")


if __name__ == "__main__":
    main()
