"""GPTQModel's GPTQ on the shared GPTQ-benchmark inputs.

Run with the GPTQModel venv (scripts/peers/setup_peers.sh), GPTQMODEL_CPU_WORKERS=2
on a 2-core machine (without it GPTQModel crashes there):

    GPTQMODEL_CPU_WORKERS=2 /tmp/peer-gptqmodel/bin/python scripts/peers/run_gptqmodel.py \\
        --inputs runs/gptq-bench --bits 4 --group-size 64

Loads the float folder with GPTQModel.load in float32 (not timed), times
`model.quantize(list_of_dicts, batch_size=1)` (its calibration handling, the
layer loop, GPTQ and packing into its int32 GPTQ format), then saves the
quantized model to a temporary folder and scores what it saved.

Scoring in float32 takes a detour. The model held in memory right after
quantize() is not ready for inference (it scored a perplexity of about 1e9
here; load() converts the packed zero points and picks a kernel). Reloaded
with dtype=float32, GPTQModel picks TorchFusedLinear on a CPU, which holds the
scales in bfloat16 and casts float32 activations to bfloat16; its pure-torch
kernel (backend gptq_torch, dequantize then matmul) refuses float32. So
(--eval float32, the default) the folder is loaded with gptq_torch in float16
(the dtype its scales are saved in, so they load exactly), the model is cast to
float32 (torch's .float(): the scales widen exactly, int buffers are untouched)
and the unquantized tensors (embedding, norms, lm_head; saved in float32) are
loaded again from the saved files, so no float16 rounding remains.
--eval auto scores GPTQModel.load(folder, device="cpu") as it comes (bfloat16).
Prints one JSON line.
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # before gptqmodel is imported

import torch  # noqa: E402
from bench_common import calibration_dicts, cpu_clock, emit, load_inputs, peak_rss_mb, perplexity, runner_args, timing  # noqa: E402


def _saved_tensors(folder: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(name suffix -> dtype(s) as saved, {name: tensor} of the saved floating tensors other than scales)."""
    from safetensors.torch import load_file

    dtypes: dict[str, set[str]] = {}
    floats: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        for key, t in load_file(str(f)).items():
            dtypes.setdefault(key.rsplit(".", 1)[-1], set()).add(str(t.dtype).removeprefix("torch."))
            if t.is_floating_point() and not key.endswith(".scales"):
                floats[key] = t
    return {k: ",".join(sorted(v)) for k, v in sorted(dtypes.items())}, floats


def _load_float32(GPTQModel, BACKEND, folder: str, floats: dict[str, torch.Tensor]):
    reloaded = GPTQModel.load(folder, device="cpu", dtype=torch.float16, backend=BACKEND.GPTQ_TORCH)
    net = reloaded.model.float()
    missing, unexpected = net.load_state_dict(floats, strict=False)
    if unexpected:
        raise SystemExit(f"saved float tensors the reloaded model does not have: {unexpected[:5]}")
    for name, t in floats.items():  # every unquantized tensor now as saved
        if not torch.equal(net.get_parameter(name) if name in dict(net.named_parameters()) else net.get_buffer(name), t.float()):
            raise SystemExit(f"{name} differs from the saved tensor after reload")
    return net, len(floats)


def main() -> None:
    p = runner_args(__doc__)
    p.add_argument("--eval", choices=["float32", "auto"], default="float32",
                   help="float32: see the docstring; auto: GPTQModel.load as it comes (bfloat16 on a CPU)")
    p.add_argument("--tool-defaults", action="store_true",
                   help="GPTQModel's own GPTQ defaults (damp_percent 0.05, act_group_aware on), as /work/shared/PEERS.md ran it")
    args = p.parse_args()

    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    manifest, calib, evals = load_inputs(args.inputs, args.calib_samples, args.windows)
    gptq = {} if args.tool_defaults else {
        "act_group_aware": False,  # its default (True for GPTQ) reorders columns within groups: a form of act-order
        "damp_percent": 0.01,  # its default is 0.05
    }
    config = QuantizeConfig(
        bits=args.bits, group_size=args.group_size, sym=not args.asym, desc_act=False,
        offload_to_disk=False,  # its default writes finished layers to disk; the other tools keep them in memory
        **gptq,
    )
    model = GPTQModel.load(str(args.inputs / manifest["model_dir"]), config, device="cpu", dtype=torch.float32)
    rss_loaded = peak_rss_mb()

    start = cpu_clock()
    model.quantize(calibration_dicts(calib), batch_size=1, calibration_sort=None)  # None: keep the given order
    timed = timing(start, cpu_clock())
    rss = peak_rss_mb()

    with tempfile.TemporaryDirectory(prefix="gptqmodel-bench-") as tmp:
        t0 = time.perf_counter()
        model.save(tmp)
        save_s = time.perf_counter() - t0
        del model
        gc.collect()
        saved_dtypes, floats = _saved_tensors(tmp)
        if args.eval == "float32":
            net, n_restored = _load_float32(GPTQModel, BACKEND, tmp, floats)
            how = (f"GPTQModel.load(float16, backend=gptq_torch) cast to float32, {n_restored} unquantized tensors "
                   f"reloaded as saved ({saved_dtypes.get('weight')})")
        else:
            net = GPTQModel.load(tmp, device="cpu").model
            how = "GPTQModel.load(folder, device='cpu') as it comes"
        del floats
    net.eval()
    ppl = {name: perplexity(net, w, args.batch_size) for name, w in evals.items()}
    quantized = [m for m in net.modules() if hasattr(m, "qweight")]
    kinds = sorted({type(m).__name__ for m in quantized})
    scale_dtypes = sorted({str(m.scales.dtype).removeprefix("torch.") for m in quantized if hasattr(m, "scales")})
    dtype = str(net.get_input_embeddings().weight.dtype).removeprefix("torch.")
    emit({
        "tool": "gptqmodel", "version": importlib.metadata.version("gptqmodel"),
        "algorithm": "gptq" + (" tool-defaults" if args.tool_defaults else ""),
        "bits": args.bits, "group_size": args.group_size, "symmetric": not args.asym,
        **timed, "peak_rss_mb": rss, "rss_after_load_mb": rss_loaded, "ppl": ppl,
        "calib_samples": calib.shape[0], "windows": next(iter(evals.values())).shape[0], "dtype": dtype,
        "save_s": save_s, "saved_dtypes": saved_dtypes, "quantized_modules": len(quantized),
        "notes": (f"QuantizeConfig(desc_act=False, act_group_aware={config.act_group_aware}, damp_percent={config.damp_percent}, "
                  f"offload_to_disk=False), "
                  f"quantize(batch_size=1, calibration_sort=None); GPTQMODEL_CPU_WORKERS={os.environ['GPTQMODEL_CPU_WORKERS']}; "
                  f"quantize_s = quantize() incl. packing (GPTQModel.load and save excluded); evaluated: the saved model, "
                  f"{how}: {len(quantized)} x {', '.join(kinds) or 'no quantized module'}, scales {', '.join(scale_dtypes)} "
                  f"(saved as {saved_dtypes.get('scales')}), embedding {dtype}; "
                  f"transformers {importlib.metadata.version('transformers')}"),
    })


if __name__ == "__main__":
    main()
