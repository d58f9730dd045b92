"""End to end on a GPU: a real model's W4A16 checkpoint through the CUDA kernels
against the same checkpoint through the reference twin (same GPU, same dtype).

Quantizes the model with a recipe (RTN by default), writes and reads the
checkpoint, casts it to float16, then for each backend: logits of prompts of
1, 12 and 48 tokens (the decode kernel at 1; the batch kernel at 48, and at 12 for
matrices too small to give every decode warp 8 steps) and perplexity on the evaluation
split in windows of 64 tokens one at a time (M = 64, batch kernel) and of 512 tokens
four at a time (M = 2048: dequantize + cuBLAS).

    python scripts/check_cuda_e2e.py --model ~/qk/model.gguf --recipe recipes/w4a16-rtn.yaml --json-out $OUT/e2e.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from quantkit.algorithms import build_all
from quantkit.calibration import DEFAULT_EVALUATION, calibration_batch, evaluation_tokens
from quantkit.checkpoint import load_checkpoint, write_checkpoint
from quantkit.checkpoint.report import layer_rows
from quantkit.eval import perplexity
from quantkit.models import load_model
from quantkit.nn.quant_linear import IntWeightLinear
from quantkit.pipeline import needs_calibration, quantize_model
from quantkit.recipe import load_recipe

PROMPT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
          "of a wife. However little known the feelings or views of such a man may be on his first entering a "
          "neighbourhood, this truth is so well fixed in the minds of the surrounding families")


def use_backend(model: torch.nn.Module, backend: str) -> int:
    layers = [m for m in model.modules() if isinstance(m, IntWeightLinear)]
    for m in layers:
        m.prepare(backend)
    return len(layers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--recipe", default="recipes/w4a16-rtn.yaml")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--json-out", default=None)
    args = p.parse_args()

    base = load_model(args.model)
    recipe = load_recipe(args.recipe)
    calib = None
    if needs_calibration(recipe, build_all(recipe)):
        c = recipe.calibration
        calib = calibration_batch(base.tokenizer, c.data, c.num_samples, c.seqlen, c.seed)
    result = quantize_model(base, recipe, calib, device="cuda")
    tokens = evaluation_tokens(base.tokenizer, DEFAULT_EVALUATION)
    ids = base.tokenizer(PROMPT, return_tensors="pt").input_ids.to("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_checkpoint(Path(tmp) / "ckpt", base.model, base.tokenizer, result.weights, recipe.to_yaml(),
                                  {"layers": layer_rows(result)}, actorder=result.actorder)
        model = load_checkpoint(folder, device="cuda").model.to(torch.float16).eval()

    logits, ppl = {}, {}
    for backend in ("cuda", "reference"):
        count = use_backend(model, backend)
        with torch.no_grad():
            logits[backend] = {n: model(ids[:, :n]).logits[0, -1].float() for n in (1, 12, 48)}
        ppl[backend] = {
            "64 x 1": perplexity(model, tokens, 64, args.windows * 8, batch_size=1, device="cuda", show_progress=False).perplexity,
            "512 x 4": perplexity(model, tokens, 512, args.windows, batch_size=4, device="cuda", show_progress=False).perplexity,
        }
    rows = []
    for n in (1, 12, 48):
        a, b = logits["cuda"][n], logits["reference"][n]
        rows.append({"what": f"last-token logits, {n}-token prompt", "max_rel": float((a - b).abs().max() / b.abs().max()),
                     "norm_rel": float((a - b).norm() / b.norm()), "argmax_equal": bool(a.argmax() == b.argmax())})
    for key in ppl["cuda"]:
        c, r = ppl["cuda"][key], ppl["reference"][key]
        rows.append({"what": f"perplexity, windows of {key}", "cuda": c, "reference": r, "rel_diff": c / r - 1})

    table = Table(title=f"{args.recipe}: CUDA kernels vs reference twin, {count} quantized linears, float16, "
                        f"{torch.cuda.get_device_name()}")
    for col in ("what", "cuda", "reference", "difference"):
        table.add_column(col, justify="left" if col == "what" else "right")
    for r in rows:
        if "max_rel" in r:
            table.add_row(r["what"], "", "", f"max {r['max_rel']:.2e}, norm {r['norm_rel']:.2e}, same argmax {r['argmax_equal']}")
        else:
            table.add_row(r["what"], f"{r['cuda']:.4f}", f"{r['reference']:.4f}", f"{100 * r['rel_diff']:+.4f}%")
    Console().print(table)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "recipe": args.recipe, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
