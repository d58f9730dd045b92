"""Which calibration data transfers to which text: a layer-level proxy, in minutes instead of hours.

For a few blocks of the model (float inputs), each source's token-equalized Hessian H = 2/n X^T X
is collected for every linear of those blocks (as GPTQ collects it). Each weight is then GPTQ-rounded
against each source's H, and each rounding is scored on each target's H: its output error there,

    err(source -> target) = tr(dW H_target dW^T),   dW = W - GPTQ(W, H_source)

divided by the error of the rounding that calibrated on the target itself (the oracle, 1.0), and
averaged over the linears. Lower is better; a row is a calibration, a column a text it might
serve. Round-to-nearest (no calibration) is the last row. It does not propagate errors through the
model, so it ranks calibrations rather than predicting perplexity; on SmolLM2 it ranked the
bundled calibrations on the three evaluation texts as the full model's perplexities did
(BENCHMARKS.md, calibration that generalizes).

    python scripts/calibration_transfer.py --sources austen mix generated --targets austen-eval kjv-eval ./my-notes.txt

Sources and targets: any --calib-data spec (a bundled name, a file, a mix), windows drawn at seeded
random offsets; `generated` is the model's own text (seeded sampling, temperature 1, top-p 0.95,
from its first special token), which approximates what the model was trained on.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from quantkit.algorithms.gptq_math import gptq_quantize
from quantkit.algorithms.statistics import InputStatistics
from quantkit.calibration import calibration_batch
from quantkit.formats import IntSpec, quantize_rtn
from quantkit.forwards import blocks_of
from quantkit.models import load_model
from quantkit.models.families import block_family

GENERATED = "generated"


def generated_windows(loaded, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """[n, seqlen] of the model's own text: seeded sampling from its first special token."""
    tok = loaded.tokenizer
    first = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = loaded.model.generate(torch.full((n, 1), first), attention_mask=torch.ones(n, 1, dtype=torch.long),
                                    do_sample=True, temperature=1.0, top_p=0.95, max_new_tokens=seqlen - 1,
                                    min_new_tokens=seqlen - 1, pad_token_id=tok.eos_token_id)
    return out[:, :seqlen]


def hessians(model, ids: torch.Tensor, names: list[str], batch: int) -> dict[str, torch.Tensor]:
    """Linear name -> H = 2/n X^T X of its inputs over `ids`, each token row scaled to unit norm
    (GPTQ's statistics: quantkit.algorithms.statistics)."""
    stats = InputStatistics("calibration_transfer", hessian=True, equalize=True)

    def hook(name):
        def pre(_module, args):
            stats.observe((name,), args[0].reshape(-1, args[0].shape[-1]))
        return pre

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.inference_mode():
            for b in ids.split(batch):
                model(b, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: stats[n].hessian for n in names}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    p.add_argument("--sources", nargs="+", default=["austen", "mix", GENERATED])
    p.add_argument("--targets", nargs="+", default=["austen-eval", "pydocs-eval", "kjv-eval"])
    p.add_argument("--windows", type=int, default=32, help="windows per source and per target")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blocks", type=int, default=4, help="blocks studied, evenly spaced through the model")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args()

    t0 = time.perf_counter()
    loaded = load_model(args.model)
    model = loaded.model.eval()
    blocks = blocks_of(loaded)
    chosen = sorted({round(i * (len(blocks) - 1) / max(args.blocks - 1, 1)) for i in range(args.blocks)})
    prefix = loaded.family.blocks
    names = [f"{prefix}.{i}.{rel}" for i in chosen for rel in block_family(loaded.family, model.config, i).linears]
    names = [n for n in names if isinstance(model.get_submodule(n), torch.nn.Linear)]

    texts = list(dict.fromkeys([*args.sources, *args.targets]))
    H = {}
    for text in track(texts, description="hessians"):
        ids = (generated_windows(loaded, args.windows, args.seqlen, args.seed) if text == GENERATED
               else calibration_batch(loaded.tokenizer, text, args.windows, args.seqlen, args.seed))
        H[text] = hessians(model, ids, names, args.batch_size)

    rows = [*args.sources, "rtn"]
    score = {r: {t: 0.0 for t in args.targets} for r in rows}
    for name in track(names, description="roundings"):
        W = model.get_submodule(name).weight.data.to(torch.float32)
        # symmetric, groups of --group-size; a width they do not divide: one scale per output channel
        s = IntSpec(args.bits, True, args.group_size if W.shape[1] % args.group_size == 0 else None)
        rounded = {t: W - gptq_quantize(W, H[t][name], s).weight.dequantize(torch.float32) for t in texts}
        rounded["rtn"] = W - quantize_rtn(W, s).dequantize(torch.float32)
        for t in args.targets:
            Ht = H[t][name]
            oracle = float(((rounded[t] @ Ht) * rounded[t]).sum())
            for r in rows:
                score[r][t] += float(((rounded[r] @ Ht) * rounded[r]).sum()) / oracle / len(names)

    table = Table(title=f"output error of a rounding calibrated on the row, on the column's text, over the oracle's "
                        f"(W{args.bits} g{args.group_size} GPTQ, {len(names)} linears of blocks {chosen}, "
                        f"{args.windows} x {args.seqlen} tokens each; lower is better)")
    table.add_column("calibration \\ text")
    for t in args.targets:
        table.add_column(t, justify="right")
    for r in rows:
        best = {t: min(score[x][t] for x in args.sources) for t in args.targets}
        table.add_row(r, *[f"[bold]{score[r][t]:.3f}[/bold]" if r != "rtn" and score[r][t] == best[t] else f"{score[r][t]:.3f}"
                           for t in args.targets])
    Console().print(table)
    Console().print(f"{time.perf_counter() - t0:.0f} s")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"blocks": chosen, "linears": names, "windows": args.windows,
                                             "seqlen": args.seqlen, "bits": args.bits, "group_size": args.group_size,
                                             "score": score}, indent=2))


if __name__ == "__main__":
    main()
