"""`quantkit`: thin Typer commands that parse, call quantkit.api and print.

Human output (tables, progress) goes to stderr; `--json` prints one JSON
object on stdout for scripts and CI jobs.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Quantize LLMs and check that quality held.")
err = Console(stderr=True)


def _fail(message: str) -> None:
    # the message holds user text (paths, keys, values): printed as it is, never as markup
    err.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _t(value) -> Text:
    """A table cell or title holding user text: shown as it is, never as markup."""
    return Text(str(value))


class _NoteHandler(logging.Handler):
    """The library's notes (logger "quantkit", e.g. a dead run's leftovers removed) as `note:` lines."""

    def emit(self, record: logging.LogRecord) -> None:
        err.print(Text.assemble(("note:", "bold yellow"), " ", record.getMessage()), highlight=False, soft_wrap=True)


def _terminate(signum, _frame) -> None:
    # SIGTERM (a job scheduler, `kill`) unwinds like Ctrl-C: the temporary output is removed on the way out
    raise KeyboardInterrupt(f"signal {signum}")


@app.callback()
def _setup() -> None:
    """Before every command: SIGTERM unwinds like Ctrl-C, the library's notes print as `note:` lines."""
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    notes = logging.getLogger("quantkit")
    if not any(isinstance(h, _NoteHandler) for h in notes.handlers):
        notes.addHandler(_NoteHandler())
        notes.propagate = False


def _run(fn, *args, **kwargs):
    """Call the library; user-caused errors become one red line and exit 1."""
    from quantkit.errors import QuantkitError

    try:
        return fn(*args, **kwargs)
    except (QuantkitError, ValueError, OSError) as e:  # OSError: missing files, disk full, no permission
        _fail(str(e))


def _memory_text(memory: dict, loaded: str) -> Text:
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    parts = []
    if memory.get("peak_cpu_rss_bytes"):
        parts.append(f"peak CPU RSS {gib(memory['peak_cpu_rss_bytes'])}")
    if memory.get("peak_gpu_bytes"):
        parts.append(f"peak GPU {gib(memory['peak_gpu_bytes'])}")
    if memory.get("model_bytes"):
        parts.append(f"model {gib(memory['model_bytes'])}")
    return _t(", ".join(parts) + (f"; weights loaded {loaded}" if loaded else ""))


def _emit_json(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


@app.command()
def quantize(
    model: Annotated[Optional[str], typer.Argument(help="HF folder, .gguf file or hub id; default: bundled SmolLM2-135M-Instruct")] = None,
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="recipe name (see `quantkit recipes`) or YAML path")] = "w4a16-rtn",
    out: Annotated[Path, typer.Option("--out", "-o", help="output checkpoint folder")] = Path("out/quantized"),
    force: Annotated[bool, typer.Option("--force", help="replace an existing output folder")] = False,
    calib_data: Annotated[Optional[str], typer.Option("--calib-data", help="bundled name (default: mix), local .txt/.jsonl/.parquet, hub dataset, or a mix: 'austen@0.5,./notes.txt@0.5'")] = None,
    num_samples: Annotated[Optional[int], typer.Option("--num-samples", help="calibration samples")] = None,
    seqlen: Annotated[Optional[int], typer.Option("--seqlen", help="calibration sample length in tokens")] = None,
    chat_template: Annotated[Optional[str], typer.Option("--chat-template", help="write conversations in the calibration data with the tokenizer's chat template: auto (where it has one), on, off")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N")] = "cpu",
    keep_degraded: Annotated[bool, typer.Option("--keep-degraded", help="write the checkpoint even if the held-back perplexity check fails")] = False,
    devices: Annotated[int, typer.Option("--devices", help="processes to share the work: GPUs with --device cuda, else CPU processes")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as one JSON object on stdout")] = False,
) -> None:
    """Quantize MODEL with a recipe and write a compressed-tensors checkpoint.

    The checkpoint is written block by block with a journal: after a crash or a kill, run the
    same command again and it continues at the first unfinished block."""
    from quantkit import api

    template = {None: None, "auto": "auto", "on": True, "off": False}
    if chat_template not in template:
        _fail(f"--chat-template must be auto, on or off, got {chat_template!r}")
    report = _run(api.quantize, model, recipe, out, force, calib_data, num_samples, seqlen, device,
                  keep_degraded=keep_degraded, devices=devices, chat_template=template[chat_template])
    if report is None:  # a rank other than 0 under torchrun: rank 0 reports
        return
    if as_json:
        _emit_json({k: v for k, v in report.items() if k != "layers"} | {"layers": len(report["layers"])})
        return
    s = report["seconds"]
    table = Table(title=_t(f"quantized with {report['recipe']} -> {report['out']}"), show_header=False)
    table.add_row("model", _t(report["model"]))
    table.add_row("layers quantized", str(len(report["layers"])))
    table.add_row("linear weights", f"{report['bytes_float'] / 2**20:.1f} MiB -> {report['bytes_quantized'] / 2**20:.1f} MiB")
    for label, text in report["summary"]:  # each algorithm's own summary of its facts
        table.add_row(_t(label), _t(text))
    budget = report.get("budget")
    if budget:
        table.add_row("mixed precision", _t(_budget_text(budget)))
    held = _held_out_text(report.get("held_out"))
    if held:
        table.add_row("held-out check", _t(held))
    calibration = report.get("calibration") or {}
    if calibration.get("parts"):
        table.add_row("calibration data", _t(", ".join(
            f"{p['source']} {p['samples']}" + (" (chat template)" if p["chat_template"] else "")
            for p in calibration["parts"]) + f" x {calibration['seqlen']} tokens"))
    table.add_row("calibration dtype", _t(report["calibration_dtype"]))
    table.add_row("error plot", _t(Path(report["out"]) / "quantization_error.png"))
    table.add_row("seconds", f"load {s['load']:.1f}, quantize {s['quantize']:.1f}, write {s['write']:.1f}")
    blocks = [b["seconds"] for b in report.get("blocks", [])]
    if blocks:
        resumed = report.get("resumed_from")
        table.add_row("seconds per block", f"mean {sum(blocks) / len(blocks):.2f}, max {max(blocks):.2f}"
                      + (f" (resumed at block {resumed})" if resumed else ""))
    table.add_row("memory", _memory_text(report.get("memory") or {}, report.get("weights_loaded", "")))
    err.print(table)


@app.command("eval")
def eval_(
    model: Annotated[Optional[str], typer.Argument(help="quantized checkpoint, HF folder, .gguf or hub id; default: bundled model")] = None,
    data: Annotated[Optional[list[str]], typer.Option("--data", "-d", help="evaluation text (repeatable); default: austen-eval, pydocs-eval and kjv-eval (three domains)")] = None,
    seqlen: Annotated[int, typer.Option("--seqlen", help="window length in tokens")] = 512,
    windows: Annotated[int, typer.Option("--windows", help="number of non-overlapping windows per text (0 = all)")] = 100,
    batch_size: Annotated[int, typer.Option("--batch-size", help="windows per forward pass")] = 4,
    baseline: Annotated[Optional[str], typer.Option("--baseline", help="also evaluate this model ('default' = the bundled one) for comparison")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")] = False,
    kld: Annotated[bool, typer.Option("--kld", help="also the KL divergence of the next-token distributions from the float model, and how often the top-1 token changes")] = False,
    kld_reference: Annotated[Optional[str], typer.Option("--kld-reference", help="--kld: the reference model (default: the float model the checkpoint's report names)")] = None,
    speed: Annotated[bool, typer.Option("--speed", help="measure latency and throughput through the engine instead")] = False,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="--speed: comma-separated batch sizes")] = "1,8,64",
    prompt_len: Annotated[str, typer.Option("--prompt-len", help="--speed: prompt tokens (comma-separated: several)")] = "128",
    output_len: Annotated[str, typer.Option("--output-len", help="--speed: generated tokens (comma-separated: several)")] = "128",
    speculative: Annotated[str, typer.Option("--speculative", help="--speed: none, ngram (prompt lookup) or draft")] = "none",
    draft: Annotated[Optional[str], typer.Option("--draft", help="--speed: the draft model for --speculative draft")] = None,
    num_draft: Annotated[int, typer.Option("--num-draft", help="--speed: draft tokens per step")] = 4,
    device: Annotated[Optional[str], typer.Option("--device", help="--speed: cuda or cpu (default: cuda when present)")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="--speed: float16, bfloat16 or float32 (default: float16 on a GPU)")] = None,
    async_decode: Annotated[bool, typer.Option("--async-decode/--sync-decode", help="--speed: launch each decode step before the previous step's tokens are read back")] = True,
    kv_cache_dtype: Annotated[str, typer.Option("--kv-cache-dtype", help="auto (the model's dtype) or fp8 (E4M3, no scales: half the cache bytes); --speed runs the engine with it, perplexity rounds keys and values as it stores them")] = "auto",
) -> None:
    """Perplexity of a model or quantized checkpoint on held-out texts (or, with --speed, its speed)."""
    from quantkit import api

    if speed:
        _speed(model, batch_sizes, prompt_len, output_len, speculative, draft, num_draft, device, dtype, as_json,
               async_decode, kv_cache_dtype)
        return

    datasets = tuple(data) if data else api.DEFAULT_EVAL_DATA
    if windows < 0:
        _fail(f"--windows must be >= 0 (0 = every window), got {windows}")
    n_windows = windows if windows > 0 else None
    if kld_reference is not None and not kld:
        _fail("--kld-reference needs --kld")
    reference = (kld_reference or True) if kld else None
    rows = []
    for source in ([baseline] if baseline else []) + [model]:
        src = None if source == "default" else source
        rows += _run(api.evaluate, src, datasets, seqlen, n_windows, batch_size,
                     kld=reference if source == model else None,
                     kv_cache_dtype=kv_cache_dtype if source == model else "auto")
    main = [r for r in rows if r["model"] == rows[-1]["model"]]
    if as_json:
        first = main[0]
        extra = {k: first[k] for k in ("kld_mean", "kld_p99", "top1_changed") if k in first}
        _emit_json({"model": first["model"], "data": first["data"], "perplexity": first["perplexity"], "tokens": first["tokens"],
                    "windows": first["windows"], "seconds": first["seconds"], **extra, "results": rows})
        return
    table = Table(title=f"perplexity ({seqlen}-token windows"
                        + (f"; {Path(model or 'default').name}: FP8 KV cache" if kv_cache_dtype == "fp8" else "") + ")")  # every cell below is plain Text: names are user text
    columns = ["model", "data", "perplexity", "vs baseline"] + (["KLD mean", "KLD p99", "top-1 changed"] if kld else [])
    for col in columns + ["windows", "tokens", "seconds"]:
        table.add_column(col, justify="left" if col in ("model", "data") else "right")
    base = {r["data"]: r["perplexity"] for r in rows if baseline and r["model"] == rows[0]["model"]}
    for r in rows:
        delta = f"{100 * (r['perplexity'] / base[r['data']] - 1):+.1f}%" if base and r in main else ""
        divergence = ([f"{r['kld_mean']:.4f}", f"{r['kld_p99']:.4f}", f"{100 * r['top1_changed']:.2f}%"] if "kld_mean" in r
                      else ["", "", ""]) if kld else []
        table.add_row(*map(_t, (Path(r["model"]).name, r["data"], f"{r['perplexity']:.3f}", delta, *divergence,
                                r["windows"], r["tokens"], f"{r['seconds']:.1f}")))
    err.print(table)
    for r in rows:
        if r.get("input_saturated_fraction"):
            err.print(_t(f"{Path(r['model']).name} on {r['data']}: {100 * r['input_saturated_fraction']:.4f}% of the inputs of "
                         f"{r['input_saturated_layers']} static-scale layers saturated (clamped at their calibrated range)"))


def _ints(option: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        _fail(f"{option} must be comma-separated integers, got {text!r}")


def _budget_text(budget: dict) -> str:
    """A report's mixed-precision choice in one line: bits per weight, what was asked, formats."""
    formats = ", ".join(f"{k} x{v}" for k, v in sorted(budget["linears_per_format"].items()))
    size_of = f", the size of uniform {budget['size_of']}" if budget.get("size_of") else ""  # absent in older reports
    return f"{budget['bits_per_weight']:.3f} bits per weight (asked {budget['bits_per_weight_asked']:g}{size_of}): {formats}"


def _speed(model, batch_sizes, prompt_len, output_len, speculative, draft, num_draft, device, dtype, as_json,
           async_decode=True, kv_cache_dtype="auto") -> None:
    from quantkit import api

    sizes, prompts, outputs = (_ints("--batch-sizes", batch_sizes), _ints("--prompt-len", prompt_len),
                               _ints("--output-len", output_len))
    with err.status("measuring speed") as status:
        rows = _run(api.speed, None if model == "default" else model, sizes, prompts, outputs, speculative,
                    num_draft, draft, device, dtype, progress=lambda c: status.update(f"batch {c.batch}, {c.prompt} + {c.output} tokens"),
                    async_decode=async_decode, kv_cache_dtype=kv_cache_dtype)
    if as_json:
        _emit_json({"model": rows[0]["model"], "device": rows[0]["device"], "results": rows})
        return
    spec = speculative != "none"
    table = Table(title=_t(f"{Path(rows[0]['model']).name} on {rows[0]['device']} ({rows[0]['dtype']}"
                           + (", FP8 KV cache" if kv_cache_dtype == "fp8" else "") + ")"
                           + (f", speculative {speculative} k={num_draft}" if spec else "")))
    cols = ["batch", "prompt + output", "tokens/s", "TTFT p50 ms", "ITL p50 ms", "ITL p99 ms", "TPOT ms"]
    cols += ["accepted", "tokens/verify"] if spec else []
    cols += ["KV unused", "KV blocks peak/pool", "preempted"]
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        cells = [str(r["batch"]), f"{r['prompt']} + {r['output']}", f"{r['tokens_per_s']:.1f}", f"{r['ttft_ms_p50']:.1f}",
                 f"{r['itl_ms_p50']:.2f}", f"{r['itl_ms_p99']:.2f}", f"{r['tpot_ms_mean']:.2f}"]
        if spec:
            cells += [f"{100 * r['acceptance_rate']:.1f}%", f"{r['tokens_per_verify']:.2f}"]
        unused = r["kv_unused_fraction"]
        cells += ["-" if unused is None else f"{100 * unused:.1f}%", f"{r['kv_blocks_allocated_peak']}/{r['kv_blocks_total']}",
                  str(r["preemptions"])]
        table.add_row(*map(_t, cells))
    err.print(table)
    if rows[0].get("moe"):
        err.print(_t(f"moe: {rows[0]['moe']}"))


@app.command()
def export(
    src: Annotated[Path, typer.Argument(help="a quantized checkpoint folder (quantkit quantize's output)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    fmt: Annotated[str, typer.Option("--format", help="awq: AWQ GEMM layout (qweight/qzeros/scales)")] = "awq",
    force: Annotated[bool, typer.Option("--force", help="replace an existing output folder")] = False,
) -> None:
    """Write a quantized checkpoint in another engine's layout."""
    from quantkit import api

    path = _run(api.export, src, out, fmt, force)
    err.print(_t(f"wrote {path} ({fmt})"))


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="a quantized checkpoint folder")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")] = False,
) -> None:
    """What is inside a checkpoint: scheme, per-layer formats, sizes, recipe."""
    from quantkit import api

    info = _run(api.inspect, path)
    if as_json:
        _emit_json(info)
        return
    report = info["report"]
    qc = info["quantization_config"] or {}
    head = Table(title=_t(info["path"]), show_header=False)  # cells: plain Text, config and report are user data
    head.add_row("model type", _t(info["model_type"]))
    head.add_row("format", _t(f"{qc.get('quant_method')} / {qc.get('format') or qc.get('version')}"))  # AWQ: its version
    for gname, group in (qc.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        a = group.get("input_activations") or {}
        inputs = f"; inputs {a.get('type')}{a.get('num_bits')} {'dynamic' if a.get('dynamic') else 'static'} per-{a.get('strategy')}" if a else ""
        head.add_row(_t(gname), _t(f"W{w.get('num_bits')} {w.get('type', 'int')} {w.get('strategy')} group={w.get('group_size')} "
                                   f"symmetric={w.get('symmetric')} targets={len(group.get('targets', []))}{inputs}"))
    if qc.get("quant_method") == "awq":
        head.add_row("AWQ", _t(f"W{qc.get('bits')} group={qc.get('group_size')} zero_point={qc.get('zero_point')}"))
    head.add_row("ignored", _t(", ".join(qc.get("ignore") or qc.get("modules_to_not_convert") or []) or "-"))
    budget = report.get("budget")
    if budget:
        head.add_row("mixed precision", _t(_budget_text(budget)))
    held = _held_out_text(report.get("held_out"))
    if held:
        head.add_row("held-out check", _t(held))
    for problem in info.get("report_problems") or []:
        head.add_row("report", _t(problem))
    if report:
        head.add_row("recipe", _t(f"{report.get('recipe')} ({report.get('scheme')})"))
        head.add_row("source model", _t(report.get("model")))
        head.add_row("linear weights", f"{report['bytes_float'] / 2**20:.2f} MiB -> {report['bytes_quantized'] / 2**20:.2f} MiB ({report['bytes_float'] / max(report['bytes_quantized'], 1):.2f}x)")
        head.add_row("files", _t(f"{', '.join(info['files'])} ({report.get('bytes_on_disk', 0) / 2**20:.1f} MiB)"))
    err.print(head)
    if report.get("layers"):
        # names relative to their common prefix (e.g. "model.layers"), to fit a terminal
        parts = [r["name"].split(".") for r in report["layers"]]
        common = next((i for i in range(min(map(len, parts))) if len({p[i] for p in parts}) > 1), 0)
        prefix = ".".join(parts[0][:common])
        title = "layers" + (f" (under {prefix})" if prefix else "") + ": weight error, KiB float -> quantized"
        layers = Table(title=_t(title))
        for col in ("layer", "shape", "format", "rel. err", "KiB", "KiB q"):
            layers.add_column(col, justify="left" if col == "layer" else "right", no_wrap=True)
        for r in report["layers"]:
            fmt = r.get("weight_type") or (f"W{r['bits']} " + (f"g{r['group_size']}" if r["group_size"] else "channel")
                                           + (" sym" if r["symmetric"] else " asym"))
            layers.add_row(_t(r["name"][len(prefix) + 1 if prefix else 0 :]), "x".join(map(str, r["shape"])), _t(fmt),
                           f"{r['weight_rel_error']:.4f}", f"{r['bytes_float'] / 1024:,.0f}", f"{r['bytes_quantized'] / 1024:,.0f}")
        err.print(layers)
    if info["recipe"]:
        err.print("[bold]recipe[/]")  # our own markup; the recipe below is printed as it is
        err.print(info["recipe"], highlight=False, markup=False)


def _held_out_text(held) -> str | None:
    """The held-back check of a stored report in words; None when absent or not as quantkit writes it."""
    keys = ("quantized_perplexity", "float_perplexity", "ratio", "max_ratio", "windows", "seqlen")
    if not isinstance(held, dict) or not all(isinstance(held.get(k), (int, float)) for k in keys):
        return None
    verdict = "passed" if held.get("passed") is True else "FAILED, kept by --keep-degraded"
    return (f"perplexity {held['quantized_perplexity']:.3f} vs float {held['float_perplexity']:.3f} "
            f"({held['ratio']:.3f}x, bound {held['max_ratio']:g}x) on {held['windows']} x {held['seqlen']} held-back "
            f"calibration tokens: {verdict}")


@app.command()
def recipes() -> None:
    """The shipped recipes, one line each."""
    from quantkit.recipe import list_recipes

    table = Table(show_header=True)
    table.add_column("recipe")
    table.add_column("description")
    for name, description in list_recipes():
        table.add_row(_t(name), _t(description))
    Console().print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
