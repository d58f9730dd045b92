"""GPTQ side by side: quantkit vs llm-compressor's GPTQModifier vs GPTQModel.

Same model, same calibration token ids, same evaluation windows, same NLL formula;
each tool runs in its own process (peers in their own venvs, made by
scripts/peers/setup_peers.sh), float32 on the CPU.

    python scripts/bench_gptq.py prepare --out runs/gptq-bench      # shared inputs, once
    python scripts/bench_gptq.py compare --bits 4 --group-size 64 --ours w4a16-gptq
    python scripts/bench_gptq.py run-ours --recipe w4a16-gptq        # one JSON line
    python scripts/bench_gptq.py float                               # the float row, one JSON line
    python scripts/bench_gptq.py table                               # table of results.jsonl

Smoke test: prepare --out /tmp/gb --calib-samples 8 --windows 2, then
compare --inputs /tmp/gb (or pass --calib-samples / --windows to use fewer rows).

compare runs every tool under `flock /tmp/quantkit-cpu.lock` (never two heavy runs
at once on the shared machine), appends the JSON lines to <inputs>/results.jsonl
and prints a table. Timed: the quantization call only (model load, input
preparation and evaluation excluded; each runner's notes say what its call
contains). Peak memory: ru_maxrss of the runner's process, read right after the
quantization (so it includes the loaded model).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts" / "peers"))
from bench_common import EVAL_SETS, cpu_clock, emit, load_inputs, machine, parse_result, peak_rss_mb, runner_args, timing  # noqa: E402
from quantkit.checkpoint.report import layer_rows

LOCK = "/tmp/quantkit-cpu.lock"
DEFAULT_INPUTS = Path("runs/gptq-bench")
# name -> (venv, runner script, extra runner args); the benchmark's settings: no act-order, dampening 0.01
PEERS = {
    "llmcompressor": ("/tmp/peer-llmc", "run_llmcompressor.py", []),
    "llmcompressor-rtn": ("/tmp/peer-llmc", "run_llmcompressor.py", ["--algo", "rtn"]),
    "gptqmodel": ("/tmp/peer-gptqmodel", "run_gptqmodel.py", []),
}
# run only when named in --tools: the tools' own defaults (act-order on), as /work/shared/PEERS.md measured them
PEER_VARIANTS = {
    "llmcompressor-static": ("/tmp/peer-llmc", "run_llmcompressor.py", ["--actorder", "static"]),
    "gptqmodel-defaults": ("/tmp/peer-gptqmodel", "run_gptqmodel.py", ["--tool-defaults"]),
    "llmcompressor-awq": ("/tmp/peer-llmc", "run_llmcompressor.py", ["--algo", "awq"]),
}


# --------------------------------------------------------------------------- prepare

def prepare(out: Path, calib_data: str, calib_samples: int, seqlen: int, windows: int, seed: int) -> dict:
    """Write the float model folder, the calibration ids and the evaluation windows."""
    from safetensors.torch import save_file

    from quantkit.calibration import calibration_batch, evaluation_tokens
    from quantkit.eval.perplexity import windows_of
    from quantkit.models import load_model

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = load_model(None)  # the bundled GGUF, dequantized to float32; its gguf marker already dropped
    model_dir = out / "model"
    base.model.save_pretrained(model_dir)
    base.tokenizer.save_pretrained(model_dir)

    calib = calibration_batch(base.tokenizer, calib_data, calib_samples, seqlen, seed)  # [N, seqlen]
    save_file({"input_ids": calib.contiguous()}, out / "calibration.safetensors")
    evals = {name: windows_of(evaluation_tokens(base.tokenizer, name), seqlen, windows).contiguous() for name in EVAL_SETS}
    short = {k: v.shape[0] for k, v in evals.items() if v.shape[0] < windows}
    if short:
        raise SystemExit(f"fewer than {windows} windows of {seqlen} tokens in {short}")
    save_file(evals, out / "eval.safetensors")

    # the saved folder must be the same model and tokenizer as the GGUF it came from
    again = load_model(model_dir)
    probe = evals[EVAL_SETS[0]][:1]
    with torch.inference_mode():
        diff = float((again.model(probe).logits - base.model(probe).logits).abs().max())
    if not torch.equal(calibration_batch(again.tokenizer, calib_data, calib_samples, seqlen, seed), calib):
        raise SystemExit(f"the tokenizer saved in {model_dir} tokenizes {calib_data!r} differently from the GGUF's")

    manifest = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model_source": base.source,
        "model_dir": "model",
        "dtype": str(next(base.model.parameters()).dtype).removeprefix("torch."),
        "calibration": {"data": calib_data, "num_samples": calib_samples, "seqlen": seqlen, "seed": seed},
        "eval": {"sets": list(EVAL_SETS), "windows": windows, "seqlen": seqlen, "first_non_overlapping": True},
        "saved_vs_gguf_max_abs_logit_diff": diff,
        "machine": machine(),
        "seconds": time.perf_counter() - t0,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def covers(folder: Path, calib_samples: int | None, windows: int | None) -> bool:
    path = folder / "manifest.json"
    if not path.is_file():
        return False
    m = json.loads(path.read_text())
    return (calib_samples or 0) <= m["calibration"]["num_samples"] and (windows or 0) <= m["eval"]["windows"]


# --------------------------------------------------------------------------- runners (quantkit's env)

def run_float(args) -> dict:
    from quantkit.eval import perplexity
    from quantkit.models import load_model

    manifest, _, evals = load_inputs(args.inputs, 1, args.windows)
    loaded = load_model(args.inputs / manifest["model_dir"])
    ppl = {name: perplexity(loaded.model, w.flatten(), w.shape[1], None, args.batch_size, show_progress=False).perplexity
           for name, w in evals.items()}
    return {"tool": "float", "version": _quantkit_version(), "bits": None, "group_size": None, "symmetric": None,
            "quantize_s": None, "peak_rss_mb": peak_rss_mb(), "ppl": ppl, "windows": _n(evals), "dtype": "float32",
            "notes": "float model of the shared folder, evaluated with quantkit.eval.perplexity"}


def run_ours(args) -> dict:
    from quantkit.api import resolve_recipe
    from quantkit.eval import perplexity
    from quantkit.formats import IntSpec
    from quantkit.models import load_model
    from quantkit.pipeline import quantize_model

    manifest, calib, evals = load_inputs(args.inputs, args.calib_samples, args.windows)
    c = manifest["calibration"]
    # the recipe's calibration settings describe the shared ids actually used
    recipe = resolve_recipe(args.recipe, calib_data=c["data"], num_samples=calib.shape[0], seqlen=calib.shape[1])
    notes = ["quantize_s = quantkit.pipeline.quantize_model (block-0 capture, Hessians, rounding, propagation); "
             "evaluated: the in-place fake-quantized float32 model with quantkit.eval.perplexity"]
    # the compared scheme, whatever the recipe's own (the peers get the same --bits/--group-size/--asym)
    scheme = IntSpec(args.bits, not args.asym, args.group_size)
    if recipe.weights != scheme or recipe.scheme != f"W{args.bits}A16":
        notes.append(f"recipe weights {recipe.weights} replaced by the compared scheme {scheme}")
        recipe = dataclasses.replace(recipe, scheme=f"W{args.bits}A16", weights=scheme)
    if args.calib_dtype and args.calib_dtype != recipe.calibration.dtype:
        notes.append(f"calibration forwards in {args.calib_dtype} (recipe: {recipe.calibration.dtype})")
        recipe = dataclasses.replace(recipe, calibration=dataclasses.replace(recipe.calibration, dtype=args.calib_dtype))
    if recipe.calibration.seed != c["seed"]:
        notes.append(f"recipe seed {recipe.calibration.seed} ignored: the shared ids were drawn with seed {c['seed']}")
    # --model: the same float weights from another file (the GGUF the shared folder was written from, on a GPU machine)
    loaded = load_model(args.model or args.inputs / manifest["model_dir"], dtype="float32")
    rss_loaded = peak_rss_mb()

    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = cpu_clock()
    result = quantize_model(loaded, recipe, calib, device=args.device)
    if cuda:
        torch.cuda.synchronize()
        notes.append(f"on {torch.cuda.get_device_name()}; calibration forwards {recipe.calibration.dtype} (auto: bfloat16 on CUDA)")
    timed = timing(start, cpu_clock())
    rss = peak_rss_mb()

    loaded.model.to(args.device)
    ppl = {name: perplexity(loaded.model, w.flatten(), w.shape[1], None, args.batch_size, args.device, show_progress=False).perplexity
           for name, w in evals.items()}
    rows = layer_rows(result)
    schemes = sorted({(r["bits"], r["group_size"], r["symmetric"]) for r in rows}, key=str)
    if len(schemes) != 1:
        notes.append(f"mixed schemes {schemes}; reported the first")
    bits, group, sym = schemes[0]
    awq = {}
    if any("awq_clip_shrink" in r or "awq_alpha" in r for r in rows):  # what AWQ kept (under GPTQ: what GPTQ accepted)
        awq = {"awq_scaled_linears": sum(1 for r in rows if r.get("awq_alpha") is not None),
               "awq_searched_linears": sum(1 for r in rows if "awq_alpha" in r),
               "awq_clipped_linears": sum(1 for r in rows if r.get("awq_clip_shrink", 1.0) < 1.0),
               "awq_clip_searched_linears": sum(1 for r in rows if "awq_clip_shrink" in r)}
    return {"tool": "quantkit", "version": _quantkit_version(), "recipe": recipe.name,
            "algorithms": [s.name for s in recipe.algorithms], "bits": bits, "group_size": group, "symmetric": sym,
            **timed, "quantize_breakdown_s": result.seconds, "peak_rss_mb": rss,
            "rss_after_load_mb": rss_loaded, "ppl": ppl, "calib_samples": calib.shape[0], "windows": _n(evals),
            "dtype": "float32", "layers": len(rows), **awq, "notes": "; ".join(notes)}


def _quantkit_version() -> str:
    from quantkit import __version__

    return __version__


def _n(evals: dict) -> int:
    return next(iter(evals.values())).shape[0]


# --------------------------------------------------------------------------- compare

def _run_locked(cmd: list[str], env: dict | None = None) -> dict:
    """Run a runner under the CPU lock; its stderr streams through, its result line is returned."""
    print(f"$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(["flock", LOCK, *cmd], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    result = parse_result(proc.stdout)
    if proc.returncode != 0 or result is None:
        tail = "\n".join(proc.stdout.splitlines()[-20:])
        return {"error": f"exit {proc.returncode}, no result line" if result is None else f"exit {proc.returncode}", "stdout_tail": tail}
    return result


def compare(args) -> list[dict]:
    inputs: Path = args.inputs.resolve()
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--inputs", str(inputs), "--batch-size", str(args.batch_size)]
    if args.windows:
        common += ["--windows", str(args.windows)]
    calib = ["--calib-samples", str(args.calib_samples)] if args.calib_samples else []
    scheme = ["--bits", str(args.bits), "--group-size", str(args.group_size)] + (["--asym"] if args.asym else [])

    if args.reprepare or not covers(inputs, args.calib_samples, args.windows):
        cmd = [*me, "prepare", "--out", str(inputs)]
        cmd += ["--calib-samples", str(args.calib_samples)] if args.calib_samples else []
        cmd += ["--windows", str(args.windows)] if args.windows else []
        print(f"$ {' '.join(cmd)}", file=sys.stderr, flush=True)
        subprocess.run(["flock", LOCK, *cmd], check=True, cwd=REPO)
    manifest = json.loads((inputs / "manifest.json").read_text())
    windows = args.windows or manifest["eval"]["windows"]
    samples = args.calib_samples or manifest["calibration"]["num_samples"]

    tools = args.tools or ["float", "ours", *PEERS]
    ours = args.ours if args.ours is not None else _default_ours(args.bits)
    jobs: list[tuple[str, list[str], dict | None]] = []
    if "float" in tools:
        jobs.append(("float", [*me, "float", *common], None))
    if "ours" in tools:
        if not ours:
            print(f"no quantkit GPTQ recipe for W{args.bits} (pass --ours RECIPE); ours skipped", file=sys.stderr)
        jobs += [(f"quantkit {r}", [*me, "run-ours", "--recipe", r, *common, *calib, *scheme], None) for r in ours]
    for name, (venv, script, extra) in {**PEERS, **PEER_VARIANTS}.items():
        if name not in tools:
            continue
        python = Path(venv) / "bin" / "python"
        if not python.is_file():
            print(f"{venv} missing (bash scripts/peers/setup_peers.sh): {name} skipped", file=sys.stderr)
            continue
        env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2")}
        env.pop("VIRTUAL_ENV", None)
        jobs.append((name, [str(python), str(REPO / "scripts" / "peers" / script), *common, *calib, *scheme, *extra], env))

    run_id = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results = []
    for label, cmd, env in jobs:
        r = _run_locked(cmd, env)
        r.setdefault("tool", label)
        r.update({"run_id": run_id, "inputs": str(inputs), "machine": r.get("machine") or machine()})
        r.setdefault("calib_samples", samples if label != "float" else None)
        r.setdefault("windows", windows)
        with open(inputs / "results.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
        results.append(r)
        print(json.dumps(r), flush=True)
    print_table(results, f"{samples} calibration x {manifest['calibration']['seqlen']}, {windows} windows per text")
    return results


def _default_ours(bits: int) -> list[str]:
    """Shipped GPTQ recipes of this bit width (run-ours gives them the compared group size and symmetry)."""
    from quantkit.recipe import RECIPES_DIR

    return [path.stem for path in sorted(RECIPES_DIR.glob(f"w{bits}a16-gptq*.yaml"))]


def print_table(results: list[dict], what: str) -> None:
    from rich.console import Console
    from rich.table import Table

    machines = sorted({r["machine"] for r in results if r.get("machine")})
    table = Table(title=f"GPTQ side by side, float32 CPU, {what}\n{' | '.join(machines)}")
    for col in ("tool", "version", "scheme", *(f"ppl {s}" for s in EVAL_SETS), "quantize s", "cpu s", "others' cpu s", "peak MB"):
        table.add_column(col, justify="left" if col in ("tool", "version", "scheme") else "right")
    for r in sorted(results, key=lambda r: r.get("tool") != "float"):
        if "error" in r:
            table.add_row(r["tool"], "", "[red]failed[/red]", r["error"], "", "", "", "", "")
            continue
        name = r["tool"] + (f" {r['recipe']}" if r.get("recipe") else f" {r['algorithm']}" if r.get("algorithm") else "")
        scheme = "" if r["bits"] is None else f"W{r['bits']} g{r['group_size']} {'sym' if r['symmetric'] else 'asym'}"
        ppl = [f"{r['ppl'][s]:.2f}" for s in EVAL_SETS]
        qs = "" if r.get("quantize_s") is None else f"{r['quantize_s']:.1f}"
        cpu = "" if r.get("quantize_cpu_s") is None else f"{r['quantize_cpu_s']:.0f}"
        others = "" if r.get("others_cpu_s") is None else f"{r['others_cpu_s']:.0f}"
        table.add_row(name, r.get("version", ""), scheme, *ppl, qs, cpu, others, f"{r['peak_rss_mb']:.0f}")
    Console(width=None if sys.stdout.isatty() else 130).print(table)


# --------------------------------------------------------------------------- CLI

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    pp = sub.add_parser("prepare", help="write the shared float model, calibration ids and evaluation windows")
    pp.add_argument("--out", type=Path, default=DEFAULT_INPUTS)
    pp.add_argument("--calib-data", default="austen")
    pp.add_argument("--calib-samples", type=int, default=128)
    pp.add_argument("--seqlen", type=int, default=512)
    pp.add_argument("--windows", type=int, default=100)
    pp.add_argument("--seed", type=int, default=0)

    sub.add_parser("float", parents=[runner_args("", add_help=False)], help="perplexity of the float model (one JSON line)")
    po = sub.add_parser("run-ours", parents=[runner_args("", add_help=False)], help="quantize with quantkit (one JSON line)")
    po.add_argument("--recipe", required=True, help="a name under recipes/ or a YAML path")
    po.add_argument("--device", default="cpu", help="where the blocks are quantized and the model evaluated")
    po.add_argument("--calib-dtype", default=None, choices=["auto", "model", "float32", "bfloat16", "float16"],
                    help="the calibration forwards' dtype (default: the recipe's)")
    po.add_argument("--model", default=None, help="load the float model from here instead of the shared folder's copy")

    pc = sub.add_parser("compare", parents=[runner_args("", add_help=False)], help="run every tool and print the table")
    pc.add_argument("--ours", nargs="*", default=None, help="quantkit recipes (default: recipes/w{bits}a16-gptq*.yaml of this scheme)")
    pc.add_argument("--tools", nargs="+", choices=["float", "ours", *PEERS, *PEER_VARIANTS], default=None,
                    help=f"default: float, ours, {', '.join(PEERS)}")
    pc.add_argument("--reprepare", action="store_true", help="write the shared inputs again")

    pt = sub.add_parser("table", help="print the table of results.jsonl")
    pt.add_argument("--inputs", type=Path, default=DEFAULT_INPUTS)
    pt.add_argument("--all", action="store_true", help="every run, not only the last result of each tool and scheme")

    args = p.parse_args()
    if args.command == "prepare":
        print(json.dumps(prepare(args.out, args.calib_data, args.calib_samples, args.seqlen, args.windows, args.seed)))
    elif args.command == "float":
        emit(run_float(args))
    elif args.command == "run-ours":
        emit(run_ours(args))
    elif args.command == "compare":
        compare(args)
    else:
        rows = [json.loads(line) for line in (args.inputs / "results.jsonl").read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "error" not in r]
        if not args.all:  # the latest row of each (tool, recipe, algorithm, scheme, samples, windows)
            latest = {}
            for r in rows:
                latest[(r["tool"], r.get("recipe"), r.get("algorithm"), r["bits"], r["group_size"], r["symmetric"], r.get("calib_samples"), r["windows"])] = r
            rows = list(latest.values())
        print_table(rows, f"{args.inputs / 'results.jsonl'}")


if __name__ == "__main__":
    main()
