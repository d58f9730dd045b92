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

Sources and targets: any --calib-data spec (a bundled name, a file), windows drawn at seeded random
offsets; `generated` is the model's own text (seeded sampling, temperature 1, top-p 0.95, from its
first special token), which approximates what the model was trained on. A source that is a mix
(`mix`, or `austen@1,gitdocs@1,generated@0.5`) is the weighted mean of its parts' Hessians, each
part read once (--windows windows each): what calibrating on those shares converges to.

Choosing a mix without looking at any evaluation text: --leave-out D... adds a column per domain D,
"calibrated on the row's mix without D (the other shares renormalized), scored on D's own text", and
the worst and mean of those; --grid N adds a row for every weighting of the --leave-out domains in
steps of 1/N (plus --grid-extra parts at fixed shares), sorted by the worst left-out score: which
weighting serves best a domain it does not contain.

    python scripts/calibration_transfer.py --sources mix "austen@1,gitdocs@1,pycode@1,dialogue@1,generated@1" \
        --leave-out austen gitdocs pycode dialogue --grid 8 --grid-extra generated@0.2
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from quantkit.algorithms.gptq_math import gptq_quantize
from quantkit.algorithms.statistics import InputStatistics
from quantkit.calibration import calibration_batch, parse_mix
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
    p.add_argument("--leave-out", nargs="+", default=[], metavar="DOMAIN",
                   help="score each row's mix without DOMAIN on DOMAIN's text (a column each)")
    p.add_argument("--grid", type=int, default=0, metavar="N",
                   help="add a row for every weighting of the --leave-out domains in steps of 1/N")
    p.add_argument("--grid-extra", default="", metavar="SPEC", help="parts every grid row holds at fixed shares, "
                   "e.g. generated@0.2 (the domains share the rest)")
    p.add_argument("--grid-top", type=int, default=10, help="grid rows shown (the best by the worst left-out score)")
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

    mixes = {src: {p.source: p.share for p in parse_mix(src)} for src in args.sources}
    if args.grid:
        extra = {p.source: p.share * _weight_sum(args.grid_extra) for p in parse_mix(args.grid_extra)} if args.grid_extra else {}
        rest = 1 - sum(extra.values())
        for c in itertools.product(range(args.grid + 1), repeat=len(args.leave_out)):
            if sum(c) == args.grid:
                mix = {d: rest * k / args.grid for d, k in zip(args.leave_out, c) if k} | extra
                mixes.setdefault(",".join(f"{d}@{w:.4g}" for d, w in mix.items()), mix)
    texts = list(dict.fromkeys([*(p for m in mixes.values() for p in m), *args.targets, *args.leave_out]))
    H = {}
    for text in track(texts, description="hessians"):
        ids = (generated_windows(loaded, args.windows, args.seqlen, args.seed) if text == GENERATED
               else calibration_batch(loaded.tokenizer, text, args.windows, args.seqlen, args.seed))
        H[text] = hessians(model, ids, names, args.batch_size)

    def mixed(mix: dict, name: str, without: str | None = None) -> torch.Tensor | None:
        parts = {k: w for k, w in mix.items() if k != without}
        total = sum(parts.values())
        return sum(w / total * H[k][name] for k, w in parts.items()) if total > 0 else None

    left = [f"without {d}, on {d}" for d in args.leave_out]
    columns = [*args.targets, *left]
    rows = [*mixes, "rtn"]
    score = {r: {c: 0.0 for c in columns} for r in rows}
    for name in track(names, description="roundings"):
        W = model.get_submodule(name).weight.data.to(torch.float32)
        # symmetric, groups of --group-size; a width they do not divide: one scale per output channel
        s = IntSpec(args.bits, True, args.group_size if W.shape[1] % args.group_size == 0 else None)
        error = lambda h: W - gptq_quantize(W, h, s).weight.dequantize(torch.float32)  # noqa: E731
        rtn = W - quantize_rtn(W, s).dequantize(torch.float32)
        cache = {}  # (row, the domain left out or None) -> its rounding's error dW

        def rounded(r: str, without: str | None):
            if r == "rtn":
                return rtn
            key = (r, without if without in mixes[r] else None)
            if key not in cache:
                h = mixed(mixes[r], name, key[1])
                cache[key] = None if h is None else error(h)
            return cache[key]

        for t, column in [*zip(args.targets, args.targets), *zip(args.leave_out, left)]:
            Ht = H[t][name]
            own = error(Ht)
            oracle = float(((own @ Ht) * own).sum())
            for r in rows:
                d = rounded(r, None if column == t else t)
                score[r][column] += float("nan") if d is None else float(((d @ Ht) * d).sum()) / oracle / len(names)
    if left:
        for r in rows:
            vals = [score[r][c] for c in left]  # NaN: the row is the left-out domain alone
            score[r]["worst left out"] = max(vals) if not any(math.isnan(v) for v in vals) else float("nan")
            score[r]["mean left out"] = sum(vals) / len(vals)
        columns += ["worst left out", "mean left out"]
        if args.grid:  # the grid's rows by their worst left-out score, the best --grid-top after the named ones
            ranked = sorted((r for r in mixes if r not in args.sources and not math.isnan(score[r]["worst left out"])),
                            key=lambda r: score[r]["worst left out"])
            rows = [*args.sources, *ranked[: args.grid_top], "rtn"]

    table = Table(title=f"output error of a rounding calibrated on the row, on the column's text, over the oracle's "
                        f"(W{args.bits} g{args.group_size} GPTQ, {len(names)} linears of blocks {chosen}, "
                        f"{args.windows} x {args.seqlen} tokens each; lower is better)")
    table.add_column("calibration \\ text")
    for c in columns:
        table.add_column(c, justify="right")
    for r in rows:
        best = {c: min((score[x][c] for x in rows if x != "rtn" and not math.isnan(score[x][c])), default=None)
                for c in columns}
        table.add_row(r, *[f"[bold]{score[r][c]:.3f}[/bold]" if r != "rtn" and score[r][c] == best[c] else f"{score[r][c]:.3f}"
                           for c in columns])
    Console().print(table)
    Console().print(f"{time.perf_counter() - t0:.0f} s")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"blocks": chosen, "linears": names, "windows": args.windows,
                                             "seqlen": args.seqlen, "bits": args.bits, "group_size": args.group_size,
                                             "mixes": mixes, "score": score}, indent=2))


def _weight_sum(spec: str) -> float:
    """The total of a SOURCE@WEIGHT spec's weights (its parts' shares, parse_mix's, sum to 1)."""
    return sum(float(item.rpartition("@")[2]) if "@" in item else 1.0 for item in spec.split(","))


if __name__ == "__main__":
    main()
