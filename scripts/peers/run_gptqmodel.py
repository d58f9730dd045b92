"""GPTQModel's GPTQ on the shared GPTQ-benchmark inputs.

Run with the GPTQModel venv (scripts/peers/setup_peers.sh), GPTQMODEL_CPU_WORKERS=2
on a 2-core machine (without it GPTQModel crashes there):

    GPTQMODEL_CPU_WORKERS=2 /tmp/peer-gptqmodel/bin/python scripts/peers/run_gptqmodel.py \\
        --inputs runs/gptq-bench --bits 4 --group-size 64

Loads the float folder with GPTQModel.load in float32 (not timed), times
`model.quantize(list_of_dicts, batch_size=1)` (its calibration handling, the
layer loop, GPTQ and packing into its int32 GPTQ format), then saves the
quantized model to a temporary folder and scores it as GPTQModel.load reads it
back (float32 asked for; its "auto" dtype on a CPU is bfloat16). The model it
holds in memory right after quantize() is not ready for inference (it scored
a perplexity of about 1e9 here): load() prepares the packed modules (kernel
selection, post_init). Prints one JSON line.
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import tempfile
import time

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # before gptqmodel is imported

import torch  # noqa: E402
from bench_common import calibration_dicts, emit, load_inputs, peak_rss_mb, perplexity, runner_args  # noqa: E402


def _saved_dtypes(folder: str) -> dict[str, str]:
    """Tensor-name suffix ("scales", "qweight", ...) -> dtype(s) as stored in the saved checkpoint."""
    from pathlib import Path

    from safetensors import safe_open

    found: dict[str, set[str]] = {}
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                found.setdefault(key.rsplit(".", 1)[-1], set()).add(st.get_slice(key).get_dtype())
    return {k: ",".join(sorted(v)) for k, v in sorted(found.items())}


def main() -> None:
    args = runner_args(__doc__).parse_args()

    from gptqmodel import GPTQModel, QuantizeConfig

    manifest, calib, evals = load_inputs(args.inputs, args.calib_samples, args.windows)
    config = QuantizeConfig(
        bits=args.bits, group_size=args.group_size, sym=not args.asym,
        desc_act=False,
        act_group_aware=False,  # its default (True for GPTQ) reorders columns within groups: a form of act-order
        damp_percent=0.01,  # its default is 0.05
        offload_to_disk=False,  # its default writes finished layers to disk; the other tools keep them in memory
    )
    model = GPTQModel.load(str(args.inputs / manifest["model_dir"]), config, device="cpu", dtype=torch.float32)
    rss_loaded = peak_rss_mb()

    t0 = time.perf_counter()
    model.quantize(calibration_dicts(calib), batch_size=1, calibration_sort=None)  # None: keep the given order
    quantize_s = time.perf_counter() - t0
    rss = peak_rss_mb()

    with tempfile.TemporaryDirectory(prefix="gptqmodel-bench-") as tmp:
        t0 = time.perf_counter()
        model.save(tmp)
        save_s = time.perf_counter() - t0
        saved_dtypes = _saved_dtypes(tmp)
        del model
        gc.collect()
        reloaded = GPTQModel.load(tmp, device="cpu", dtype=torch.float32)
    net = reloaded.model.eval()
    ppl = {name: perplexity(net, w, args.batch_size) for name, w in evals.items()}
    dtype = str(next(net.parameters()).dtype).removeprefix("torch.")
    quantized = [m for m in net.modules() if hasattr(m, "qweight")]
    kinds = sorted({type(m).__name__ for m in quantized})
    scale_dtypes = sorted({str(m.scales.dtype).removeprefix("torch.") for m in quantized if hasattr(m, "scales")})
    emit({
        "tool": "gptqmodel", "version": importlib.metadata.version("gptqmodel"), "algorithm": "gptq",
        "bits": args.bits, "group_size": args.group_size, "symmetric": not args.asym,
        "quantize_s": quantize_s, "peak_rss_mb": rss, "rss_after_load_mb": rss_loaded, "ppl": ppl,
        "calib_samples": calib.shape[0], "windows": next(iter(evals.values())).shape[0], "dtype": dtype,
        "save_s": save_s, "saved_dtypes": saved_dtypes, "quantized_modules": len(quantized),
        "notes": (f"QuantizeConfig(desc_act=False, act_group_aware=False, damp_percent=0.01, offload_to_disk=False), "
                  f"quantize(batch_size=1, calibration_sort=None); GPTQMODEL_CPU_WORKERS={os.environ['GPTQMODEL_CPU_WORKERS']}; "
                  f"quantize_s = quantize() incl. packing (GPTQModel.load and save excluded); evaluated: the saved model "
                  f"reloaded by GPTQModel.load(dtype=float32): {len(quantized)} x {', '.join(kinds) or 'no quantized module'}, "
                  f"scales {', '.join(scale_dtypes)} (saved as {saved_dtypes.get('scales')}), first parameter {dtype}; "
                  f"transformers {importlib.metadata.version('transformers')}"),
    })


if __name__ == "__main__":
    main()
