"""What the CLI and Python users call: quantize(), load(), evaluate(), inspect()."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

from quantkit import __version__
from quantkit.algorithms import build_all
from quantkit.algorithms.rotation import transform_config
from quantkit.budget import budget_recipe, choose as choose_budget, measure as measure_budget, summary as budget_summary, target_bits
from quantkit.checkpoint.report import layer_rows, summary_lines
from quantkit.devices import calibration_dtype, check_device, memory_of, peak_rss_bytes
from quantkit.distributed import ALONE, BACKEND_VARIABLE, device_for, from_environment, spawn
from quantkit.calibration import (DEFAULT_EVALUATION, EVALUATION_TEXTS, calibration_batch, calibration_parts,
                                  evaluation_tokens, held_out_batch, parse_mix)
from quantkit.checkpoint import check_output, checkpoint_summary, is_quantized_checkpoint, load_checkpoint
from quantkit.checkpoint.stream import StreamingCheckpoint, source_fingerprint, tensor_digest
from quantkit.engine.config import KV_CACHE_DTYPES
from quantkit.eval import perplexity
from quantkit.eval.kv_cache import use_fp8_kv_cache
from quantkit.eval.plots import layer_error_png
from quantkit.errors import NumericalError
from quantkit.models import LoadedModel, context_length, empty_model, family_for, load_config, load_lazily, load_model, resolve_source
from quantkit.models.families import checkpoint_name
from quantkit.pipeline import needs_calibration, plan_targets, quantize_model
from quantkit.progress import QuantizeProgress, RichProgress
from quantkit.recipe import Recipe, load_recipe

DEFAULT_RECIPE = "w4a16-rtn"
DEFAULT_EVAL_DATA = EVALUATION_TEXTS  # the bundled held-out texts, of three domains
ERROR_PLOT = "quantization_error.png"


def resolve_recipe(
    recipe: str | os.PathLike | Recipe,
    calib_data: str | None = None,
    num_samples: int | None = None,
    seqlen: int | None = None,
    chat_template: str | bool | None = None,
) -> Recipe:
    """Load a recipe by name or path and apply command-line calibration overrides."""
    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    changes = {k: v for k, v in (("data", calib_data), ("num_samples", num_samples), ("seqlen", seqlen),
                                 ("chat_template", chat_template)) if v is not None}
    if changes:
        r = dataclasses.replace(r, calibration=dataclasses.replace(r.calibration, **changes))
    return r


def _local_paths(*candidates) -> list[Path]:
    """The candidates that name existing local files or folders (hub ids and names are skipped)."""
    out = []
    for c in candidates:
        if isinstance(c, (str, os.PathLike)) and str(c) and Path(c).expanduser().exists():
            out.append(Path(c).expanduser().resolve())
    return out


def _check_seqlen(seqlen: int, config, what: str) -> None:
    context = context_length(config)
    if context is not None and seqlen > context:
        raise ValueError(f"{what} {seqlen} is beyond the model's context of {context} tokens "
                         f"(max_position_embeddings); choose {context} or fewer")


def _check_calibration_memory(recipe: Recipe, config, dev: torch.device) -> None:
    """The driver holds one block's calibration inputs and outputs at once, on the device
    (and, with replay, more buffers of that size): refuse what cannot fit before loading."""
    c, hidden = recipe.calibration, getattr(config, "hidden_size", None)
    have = memory_of(dev)
    if not isinstance(hidden, int) or have is None:
        return
    need = 2 * c.num_samples * c.seqlen * hidden * 4  # inputs + outputs of a block, at most 4 bytes a value
    if need > have:
        raise ValueError(f"calibration of {c.num_samples} samples x {c.seqlen} tokens holds at least "
                         f"{need / 2**30:.1f} GiB of activations per block ({hidden} values a token); {dev} has "
                         f"{have / 2**30:.1f} GiB. Use fewer samples (--num-samples) or shorter ones (--seqlen)")


def quantize(
    model: str | os.PathLike | None = None,
    recipe: str | os.PathLike | Recipe = DEFAULT_RECIPE,
    out: str | os.PathLike = "out",
    force: bool = False,
    calib_data: str | None = None,
    num_samples: int | None = None,
    seqlen: int | None = None,
    device: str = "cpu",
    show_progress: bool = True,
    keep_degraded: bool = False,
    devices: int = 1,
    chat_template: str | bool | None = None,
) -> dict:
    """Quantize `model` (the bundled default when None) with `recipe` into `out`.

    Returns the quantization report (also written as quantization_report.json).
    Nothing is written when anything fails. Cheap checks run before the model's
    weights are read: the recipe, the device, the output location (see
    quantkit.checkpoint.output for what `force` may replace), the model's
    family and every selected layer's width against its group size.

    After quantizing, the quantized model's perplexity on a few held-back
    calibration windows is compared with the float model's (quantkit.heldout);
    NaN, or a ratio beyond the recipe's `check.max_ratio`, refuses to write
    unless `keep_degraded`.

    The checkpoint is written block by block as the model is walked (a lazy
    model's weights are read one block at a time: quantkit.models.lazy), with a
    journal: rerunning the same command after a crash or a kill resumes at the
    first unfinished block (quantkit.checkpoint.stream).

    devices: processes to spread the work over (quantkit.distributed): that many
    GPUs with device "cuda", or CPU processes. Under torchrun, quantkit joins the
    group torchrun made instead.
    """
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be a whole number of at least 1, got {devices!r}")
    comm = from_environment()
    if comm is None and devices > 1:
        if str(device).startswith("cuda") and os.environ.get(BACKEND_VARIABLE) != "gloo" \
                and devices > torch.cuda.device_count():
            raise ValueError(f"--devices {devices} with device {device!r}: this machine has "
                             f"{torch.cuda.device_count()} CUDA GPU(s)")
        return spawn(devices, quantize, dict(model=model, recipe=recipe, out=out, force=force, calib_data=calib_data,
                                             num_samples=num_samples, seqlen=seqlen, device=device,
                                             show_progress=show_progress, keep_degraded=keep_degraded, devices=devices,
                                             chat_template=chat_template))
    comm = comm or ALONE
    device = device_for(comm, str(device))
    recipe_arg = recipe
    recipe = resolve_recipe(recipe, calib_data, num_samples, seqlen, chat_template)
    chain = build_all(recipe)  # bad algorithm names and options fail before any work
    dev = check_device(device)
    source = resolve_source(model)
    inputs = _local_paths(source, recipe_arg, *(part.source for part in parse_mix(recipe.calibration.data)))
    check_output(out, force, inputs, keep_resumable=True)
    config = load_config(source)
    family = family_for(config)
    if not plan_targets(empty_model(config), family, recipe):  # group sizes are checked here too
        raise ValueError(f"recipe {recipe.name!r} selects no linear layer of {source}")
    calibrate = needs_calibration(recipe, chain) or recipe.budget is not None  # a budget measures on calibration data
    if calibrate:
        _check_seqlen(recipe.calibration.seqlen, config, "calibration seqlen")
        _check_calibration_memory(recipe, config, dev)

    t0 = time.perf_counter()
    loaded, loaded_whole = load_lazily(source, config=config)
    load_s = time.perf_counter() - t0
    model_dtype = next(loaded.model.parameters()).dtype
    # "auto" resolved once, from the hardware, and recorded: the recipe copy repeats the run exactly
    fwd_dtype = calibration_dtype(recipe.calibration.dtype, model_dtype, dev)
    recipe = dataclasses.replace(recipe, calibration=dataclasses.replace(
        recipe.calibration, dtype=str(fwd_dtype).removeprefix("torch.")))

    t0 = time.perf_counter()
    c = recipe.calibration
    calib = (calibration_batch(loaded.tokenizer, c.data, c.num_samples, c.seqlen, c.seed, c.chat_template)
             if calibrate else None)
    parts = calibration_parts(loaded.tokenizer, c.data, c.num_samples, c.chat_template) if calibrate else None
    check = recipe.check
    held_seqlen = min(check.seqlen or c.seqlen, context_length(config) or (1 << 62))
    held_ids, disjoint = (held_out_batch(loaded.tokenizer, c.data, check.windows, held_seqlen, c.seed,
                                         (c.num_samples, c.seqlen) if calibrate else None, c.chat_template)
                          if check.windows else (None, True))
    calib_s = time.perf_counter() - t0

    budget = None
    if recipe.budget is not None:  # mixed precision: measure, choose, then quantize the chosen recipe
        t0 = time.perf_counter()
        with RichProgress() if show_progress and comm.rank == 0 else QuantizeProgress() as progress:
            costs = measure_budget(loaded, recipe, chain, calib, dev, fwd_dtype, progress)
        asked = target_bits(costs, recipe.budget)
        choice = choose_budget(costs, asked)
        budget = {"bits_per_weight_asked": asked, "size_of": recipe.budget.size_of or None, "seconds": time.perf_counter() - t0,
                  **budget_summary(costs, choice)}
        recipe = budget_recipe(recipe, choice)
        chain = build_all(recipe)
        loaded, loaded_whole = load_lazily(source, config=config)  # measuring rotated the model: a fresh one
    # a rerun of the same command resumes an interrupted one (quantkit.checkpoint.stream)
    fingerprint = {"quantkit": __version__, "torch": torch.__version__, "model": source_fingerprint(source),
                   "recipe": recipe.to_yaml(), "data": tensor_digest(calib, held_ids), "device": str(dev),
                   "processes": comm.world}
    writer = StreamingCheckpoint(out, force, inputs, fingerprint, loaded, recipe.activations, dev, comm.rank,
                                 comm.world, comm.barrier, lambda obj: comm.broadcast(obj, 0))
    try:
        resume = writer.resume_point()
        t0 = time.perf_counter()
        with RichProgress() if show_progress and comm.rank == 0 else QuantizeProgress() as progress:
            result = quantize_model(loaded, recipe, calib, device=dev, progress=progress, held_out_ids=held_ids,
                                    held_out_disjoint=disjoint, chain=chain, sink=writer, resume=resume, comm=comm)
        quant_s = time.perf_counter() - t0
        held = None
        if result.held_out is not None:
            passed = result.held_out.passes(check.max_ratio)
            held = result.held_out.to_report() | {"max_ratio": check.max_ratio, "passed": passed}
            if not passed and not keep_degraded:
                r = result.held_out
                raise NumericalError(
                    f"the quantized model's perplexity on {r.windows} held-back calibration windows is "
                    f"{r.quantized_perplexity:.4g} against the float model's {r.float_perplexity:.4g} (ratio {r.ratio:.3g}, "
                    f"bound {check.max_ratio:g}): refusing to write {out}. Raise check.max_ratio in the recipe or "
                    f"keep it anyway with --keep-degraded (keep_degraded=True)")

        rows = writer.rows
        blocks = writer.blocks
        activations = None if recipe.activations is None else dataclasses.asdict(recipe.activations)
        gpu_peaks = [b["peak_gpu_bytes"] for b in result.blocks if b.get("peak_gpu_bytes") is not None]
        gpu_peak = max(gpu_peaks) if gpu_peaks else None
        ranks = comm.gather({"rank": comm.rank, "peak_cpu_rss_bytes": peak_rss_bytes(), "peak_gpu_bytes": gpu_peak,
                             "seconds": {k: v for k, v in result.seconds.items()},
                             "collective_s": comm.collective_s, "collective_bytes": comm.collective_bytes})
        report = {
            "quantkit_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__} threads {torch.get_num_threads()}".strip(),
            "model": loaded.source,
            "recipe": recipe.name,
            "scheme": recipe.scheme,
            "activations": activations,
            "calibration": dataclasses.asdict(recipe.calibration) | {"parts": parts} if calib is not None else None,
            "calibration_dtype": c.dtype,
            "held_out": held,
            "device": str(dev),
            "weights_loaded": "lazily, one block at a time" if loaded_whole is None else f"whole: {loaded_whole}",
            "resumed_from": resume.block if resume is not None else None,
            "seconds": {"load": load_s, "calibration_data": calib_s, "quantize": quant_s, **{f"quantize.{k}": v for k, v in result.seconds.items()}},
            "memory": {"peak_cpu_rss_bytes": peak_rss_bytes(), "peak_gpu_bytes": gpu_peak,
                       "model_bytes": sum(p.numel() * p.element_size() for p in loaded.model.parameters())},
            "processes": ranks if not comm.alone else None,
            "blocks": blocks,
            "budget": budget,
            "bytes_float": sum(r["bytes_float"] for r in rows),
            "bytes_quantized": sum(r["bytes_quantized"] for r in rows),
            # what the CLI's summary shows, each algorithm summarizing its own facts
            "summary": summary_lines(rows, activations) + chain.summarize(rows),
            "layers": rows,
        }
        t0 = time.perf_counter()
        plot = layer_error_png(rows, f"{recipe.name}: per-layer error ({Path(loaded.source).name})")
        specs = plan_targets(loaded.model, loaded.family, recipe)
        float_linears = [checkpoint_name(loaded.family, n) for n, m in loaded.model.named_modules()
                         if isinstance(m, torch.nn.Linear) and n not in specs]
        folder = writer.out
        if comm.rank == 0:
            online = {checkpoint_name(loaded.family, n): b for r in chain.rotations
                      for n, b in r.online_linears(loaded.model).items()}
            writer.finish(loaded.tokenizer, {checkpoint_name(loaded.family, n): s for n, s in specs.items()},
                          float_linears, result.actorder, recipe.to_yaml(), report, {ERROR_PLOT: plot},
                          transform_config(online))
        comm.barrier()
    except KeyboardInterrupt:
        writer.abandon(keep=True)  # Ctrl-C, SIGTERM: the finished blocks stay for a rerun to resume
        raise
    except BaseException:
        writer.abandon(keep=False)
        raise
    report["seconds"]["write"] = time.perf_counter() - t0
    report["out"] = str(folder)
    return report if comm.rank == 0 else None  # under torchrun, rank 0 reports


def load(source: str | os.PathLike | None = None, backend: str | None = None) -> LoadedModel:
    """A quantized checkpoint (as IntWeightLinear / W8A8Linear modules) or a float model.

    Every folder whose config.json has a quantization_config (of any quant_method), or
    whose weights are quantized, goes to quantkit's checkpoint reader, which reads it or
    refuses it by name (never transformers' own quantizers); other folders, files and hub
    ids load as float models."""
    if source is not None and is_quantized_checkpoint(Path(source).expanduser()):
        return load_checkpoint(source, backend=backend)
    return load_model(source)


def evaluate(
    source: str | os.PathLike | None = None,
    data: tuple[str, ...] | list[str] = DEFAULT_EVAL_DATA,
    seqlen: int = 512,
    windows: int | None = 100,
    batch_size: int = 4,
    show_progress: bool = True,
    kld: bool | str | os.PathLike | None = None,
    kv_cache_dtype: str = "auto",
) -> list[dict]:
    """Perplexity of one model on each of `data`; one row per data set.
    windows None: every window of each text. The settings are checked against
    the model's config before any weight is read.
    kld: also the KL divergence of the next-token distributions from a reference
    model, and how often the top-1 token changes (quantkit.eval.perplexity): True
    takes the float model a quantized checkpoint was made from (its report names
    it), a path or name takes that model.
    kv_cache_dtype "fp8": the model attends over keys and values rounded as the engine's FP8 KV cache
    stores them (quantkit.eval.kv_cache), so the rows show what that cache costs; the KLD reference
    keeps its own attention."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; valid: {', '.join(KV_CACHE_DTYPES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if windows is not None and windows < 1:
        raise ValueError(f"windows must be at least 1 (None: every window), got {windows}")
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    _check_seqlen(seqlen, load_config(source), "seqlen")
    reference_source = kld_reference(source) if kld is True else (None if kld in (None, False) else str(kld))
    loaded = load(source)
    if kv_cache_dtype == "fp8":
        use_fp8_kv_cache(loaded.model)
    reference = None
    if reference_source is not None:
        reference = load(None if reference_source == "default" else reference_source)
        widths = (loaded.model.config.vocab_size, reference.model.config.vocab_size)
        if widths[0] != widths[1]:
            raise ValueError(f"cannot compare next-token distributions: {loaded.source} has {widths[0]} tokens, "
                             f"the reference {reference.source} {widths[1]}")
    static = [m for m in loaded.model.modules() if getattr(m, "input_scale", None) is not None]
    rows = []
    for name in data:
        for m in static:  # count the inputs that saturate at their calibrated static scale
            m.track_saturation, m.saturated, m.seen = True, 0, 0
        tokens = evaluation_tokens(loaded.tokenizer, name)
        r = perplexity(loaded.model, tokens, seqlen, windows, batch_size, show_progress=show_progress,
                       label=f"{Path(loaded.source).name} on {name}", reference=reference and reference.model)
        row = {"model": loaded.source, "data": name, **dataclasses.asdict(r), "kv_cache_dtype": kv_cache_dtype}
        if reference is None:
            for key in ("kld_mean", "kld_median", "kld_p99", "top1_changed"):
                row.pop(key)
        else:
            row["kld_reference"] = reference.source
        if static:
            row["input_saturated_fraction"] = sum(int(m.saturated) for m in static) / max(1, sum(m.seen for m in static))
            row["input_saturated_layers"] = sum(int(m.saturated) > 0 for m in static)
        rows.append(row)
    for m in static:
        m.track_saturation = False
    return rows


def kld_reference(source: str | os.PathLike | None) -> str:
    """The float model a quantized checkpoint was made from, as its report names it."""
    folder = Path(source).expanduser() if source is not None else None
    report = folder / "quantization_report.json" if folder is not None and folder.is_dir() else None
    try:
        model = json.loads(report.read_text("utf-8")).get("model") if report and report.is_file() else None
    except (OSError, ValueError, AttributeError):
        model = None
    if not isinstance(model, str):
        raise ValueError(f"{source} is not a checkpoint whose report names the float model it was made from; "
                         f"name the reference for --kld with --kld-reference")
    if not (Path(model).exists() or model.count("/") == 1):
        raise ValueError(f"the float model {source} was made from, {model}, is not here; "
                         f"name the reference for --kld with --kld-reference")
    return model


def speed(
    source: str | os.PathLike | None = None,
    batch_sizes: tuple[int, ...] = (1, 8, 64),
    prompt_len: int | tuple[int, ...] = 128,
    output_len: int | tuple[int, ...] = 128,
    speculative: str = "none",
    num_draft: int = 4,
    draft: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: str | None = None,
    cuda_graphs: bool = True,
    text: str = DEFAULT_EVALUATION,
    progress=None,
    async_decode: bool = True,
    kv_cache_dtype: str = "auto",
) -> list[dict]:
    """Latency and throughput through quantkit's engine (quantkit.engine.speed), one row per
    (batch size, prompt length, output length).
    device None: the GPU when there is one. dtype: the activations' (and float weights') dtype, default
    float16 on a GPU and float32 on the CPU. async_decode, kv_cache_dtype: see
    quantkit.engine.config.EngineConfig."""
    from quantkit.engine.config import EngineConfig
    from quantkit.eval.speed import Case, measure
    from quantkit.models.loader import DTYPES

    device = str(check_device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    dtype = dtype or ("float16" if device.startswith("cuda") else "float32")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    prompts = (prompt_len,) if isinstance(prompt_len, int) else tuple(prompt_len)
    outputs = (output_len,) if isinstance(output_len, int) else tuple(output_len)
    cases = [Case(b, p, o) for p in prompts for o in outputs for b in batch_sizes]  # validates before loading anything
    config = EngineConfig(speculative=speculative, num_draft=num_draft, cuda_graphs=cuda_graphs,
                          async_decode=async_decode, kv_cache_dtype=kv_cache_dtype)
    if speculative == "draft" and draft is None:
        raise ValueError("--speculative draft needs --draft MODEL")

    def on(model_source):
        loaded = load(model_source)
        loaded.model.to(device)
        # Module.to(dtype) would also cast FP8 weights (float8 counts as floating point): cast only the
        # full-width float tensors (float weights, scales, norms) to the activations' dtype
        wide = (torch.float32, torch.float16, torch.bfloat16)
        loaded.model._apply(lambda t: t.to(DTYPES[dtype]) if t.dtype in wide else t)
        return loaded

    target = on(source)
    drafter = on(draft) if speculative == "draft" else None
    tokens = evaluation_tokens(target.tokenizer, text).tolist()
    rows = measure(target, tokens, cases, config, draft=drafter, progress=progress)
    for r in rows:
        r.update(model=target.source, device=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                 dtype=dtype, draft=drafter.source if drafter else None)
    return rows


def export(src: str | os.PathLike, out: str | os.PathLike, fmt: str = "awq", force: bool = False) -> Path:
    """Write the quantized checkpoint `src` in another engine's layout (`awq`: AWQ GEMM)."""
    from quantkit.checkpoint.awq_export import export_awq

    exporters = {"awq": export_awq}
    if fmt not in exporters:
        raise ValueError(f"unknown export format {fmt!r}; available: {', '.join(exporters)}")
    check_output(out, force, _local_paths(src))  # before loading anything; never onto the checkpoint itself
    return exporters[fmt](src, out, force)


def inspect(path: str | os.PathLike) -> dict:
    """A quantized checkpoint's config, report and recipe, once its config.json and safetensors
    headers are found to agree (CheckpointError otherwise); see checkpoint_summary."""
    return checkpoint_summary(path)
