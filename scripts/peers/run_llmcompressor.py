"""llm-compressor's GPTQModifier (or QuantizationModifier: RTN; AWQModifier + QuantizationModifier: AWQ) on the shared benchmark inputs.

Run with the llm-compressor venv (scripts/peers/setup_peers.sh):

    /tmp/peer-llmc/bin/python scripts/peers/run_llmcompressor.py --inputs runs/gptq-bench --bits 4 --group-size 64
    /tmp/peer-llmc/bin/python scripts/peers/run_llmcompressor.py --algo rtn ...
    /tmp/peer-llmc/bin/python scripts/peers/run_llmcompressor.py --algo awq --asym ...

AWQ on a CPU-only machine: llm-compressor 0.14 pins its cached activations
(`IntermediatesCache.pin_memory`), which fails without an accelerator; this
runner makes that call a no-op (pinning only speeds up host-to-device copies).

Loads the float folder in float32 (not timed), times `oneshot(...)` (its data
loader over the given ids, the sequential pipeline's tracing, calibration,
GPTQ and freezing), then scores the quantized model oneshot returns, as it is,
on the shared windows. Prints one JSON line.
"""

from __future__ import annotations

import importlib.metadata

import torch
from bench_common import calibration_dicts, cpu_clock, emit, load_inputs, peak_rss_mb, perplexity, runner_args, timing


def scheme(bits: int, group_size: int, symmetric: bool) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


@torch.no_grad()
def bake_fake_quantized(model) -> int:
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    n = 0
    for module in model.modules():
        scheme_ = getattr(module, "quantization_scheme", None)
        if scheme_ is None or scheme_.weights is None or not hasattr(module, "weight_scale"):
            continue
        zp = getattr(module, "weight_zero_point", None)
        module.weight.data.copy_(fake_quantize(module.weight, module.weight_scale, zp, scheme_.weights))
        n += 1
    return n


def main() -> None:
    p = runner_args(__doc__)
    p.add_argument("--algo", choices=["gptq", "rtn", "awq"], default="gptq")
    p.add_argument("--model", default=None, help="load the float model from this folder instead of the shared folder's copy")
    p.add_argument("--actorder", choices=["none", "static", "weight", "group"], default="none",
                   help="GPTQModifier.actorder; its own default is static (what /work/shared/PEERS.md measured)")
    args = p.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM

    manifest, calib, evals = load_inputs(args.inputs, args.calib_samples, args.windows)
    model = AutoModelForCausalLM.from_pretrained(args.model or args.inputs / manifest["model_dir"], dtype=torch.float32).eval()
    config = scheme(args.bits, args.group_size, not args.asym)
    if args.algo == "gptq":
        # actorder given explicitly: left out, it is "static" activation ordering
        actorder = None if args.actorder == "none" else args.actorder
        modifier = GPTQModifier(config_groups=config, ignore=["lm_head"], dampening_frac=0.01, actorder=actorder, block_size=128)
        rows = calibration_dicts(calib)
        data = Dataset.from_dict({k: [r[k][0].tolist() for r in rows] for k in ("input_ids", "attention_mask")})
        kwargs = dict(dataset=data, num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
                      shuffle_calibration_samples=False, batch_size=1)
    elif args.algo == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier
        from llmcompressor.pipelines.cache import IntermediatesCache

        if not torch.cuda.is_available():
            IntermediatesCache.pin_memory = lambda self, *a, **k: None  # no accelerator here (see the docstring)
        modifier = [AWQModifier(duo_scaling=True), QuantizationModifier(config_groups=config, ignore=["lm_head"])]
        rows = calibration_dicts(calib)
        data = Dataset.from_dict({k: [r[k][0].tolist() for r in rows] for k in ("input_ids", "attention_mask")})
        kwargs = dict(dataset=data, num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
                      shuffle_calibration_samples=False, batch_size=1)
    else:
        modifier = QuantizationModifier(config_groups=config, ignore=["lm_head"])
        kwargs = {}
    rss_loaded = peak_rss_mb()

    start = cpu_clock()
    model = oneshot(model=model, recipe=modifier if isinstance(modifier, list) else [modifier], **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    timed = timing(start, cpu_clock())
    rss = peak_rss_mb()

    model.eval()
    if torch.cuda.is_available():  # llm-compressor onloads each layer to the GPU itself; the evaluation runs there too
        model.to("cuda")
    # write the fake-quantized weights from llm-compressor's own scales / zero points into the linears: on the GPU
    # the model oneshot returned scored exactly as the float one (its forward-time quantization was not active).
    # Idempotent where it was: weights already on the grid round to themselves.
    baked = bake_fake_quantized(model)
    ppl = {name: perplexity(model, w, args.batch_size) for name, w in evals.items()}
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    scale_dtypes = sorted({str(t.dtype).removeprefix("torch.") for n, t in model.named_parameters() if n.endswith("weight_scale")})
    n_quantized = sum(1 for n, _ in model.named_parameters() if n.endswith("weight_scale"))
    emit({
        "tool": "llmcompressor", "version": importlib.metadata.version("llmcompressor"),
        "algorithm": args.algo + (f" actorder={args.actorder}" if args.algo == "gptq" and args.actorder != "none" else ""),
        "bits": args.bits, "group_size": args.group_size, "symmetric": not args.asym,
        **timed, "peak_rss_mb": rss, "rss_after_load_mb": rss_loaded, "ppl": ppl,
        "calib_samples": calib.shape[0] if args.algo != "rtn" else 0, "windows": next(iter(evals.values())).shape[0],
        "dtype": dtype, "quantized_modules": n_quantized,
        "notes": ({"gptq": f"GPTQModifier(ignore=[lm_head], dampening_frac=0.01, actorder={args.actorder}, block_size=128); "
                           "sequential pipeline, batch 1, no shuffle",
                   "awq": "AWQModifier(duo_scaling=True) + QuantizationModifier(ignore=[lm_head]); "
                          + ("" if torch.cuda.is_available() else "IntermediatesCache.pin_memory made a no-op (CPU only); ")
                          + "sequential pipeline, batch 1, no shuffle",
                   "rtn": "QuantizationModifier(ignore=[lm_head]); data-free"}[args.algo]
                  + "; quantize_s = oneshot() (model load excluded); evaluated: the fake-quantized model oneshot returns"
                  + f" ({n_quantized} linears with weight_scale {', '.join(scale_dtypes)}, first parameter {dtype};"
                  + f" {baked} weights replaced by their fake-quantized values from those scales and zero points)"
                  + f"; compressed-tensors {importlib.metadata.version('compressed-tensors')}, "
                  + f"transformers {importlib.metadata.version('transformers')}"),
    })


if __name__ == "__main__":
    main()
