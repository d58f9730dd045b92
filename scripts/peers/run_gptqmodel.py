"""GPTQModel's GPTQ on the shared GPTQ-benchmark inputs.

Run with the GPTQModel venv (scripts/peers/setup_peers.sh), GPTQMODEL_CPU_WORKERS=2
on a 2-core machine (without it GPTQModel crashes there):

    GPTQMODEL_CPU_WORKERS=2 /tmp/peer-gptqmodel/bin/python scripts/peers/run_gptqmodel.py \\
        --inputs runs/gptq-bench --bits 4 --group-size 64

Loads the float folder with GPTQModel.load in float32 (not timed), times
`model.quantize(list_of_dicts, batch_size=1)` (its calibration handling, the
layer loop, GPTQ and packing into its int32 GPTQ format), then scores the
quantized model it holds in memory on the shared windows. Prints one JSON line.
"""

from __future__ import annotations

import importlib.metadata
import os
import time

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # before gptqmodel is imported

import torch  # noqa: E402
from bench_common import calibration_dicts, emit, load_inputs, peak_rss_mb, perplexity, runner_args  # noqa: E402


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

    net = model.model.eval()
    ppl = {name: perplexity(net, w, args.batch_size) for name, w in evals.items()}
    dtype = str(next(net.parameters()).dtype).removeprefix("torch.")
    kinds = sorted({type(m).__name__ for m in net.modules() if "QuantLinear" in type(m).__name__})
    emit({
        "tool": "gptqmodel", "version": importlib.metadata.version("gptqmodel"), "algorithm": "gptq",
        "bits": args.bits, "group_size": args.group_size, "symmetric": not args.asym,
        "quantize_s": quantize_s, "peak_rss_mb": rss, "rss_after_load_mb": rss_loaded, "ppl": ppl,
        "calib_samples": calib.shape[0], "windows": next(iter(evals.values())).shape[0], "dtype": dtype,
        "notes": (f"QuantizeConfig(desc_act=False, act_group_aware=False, damp_percent=0.01, offload_to_disk=False), "
                  f"quantize(batch_size=1, calibration_sort=None); GPTQMODEL_CPU_WORKERS={os.environ['GPTQMODEL_CPU_WORKERS']}; "
                  f"quantize_s = quantize() incl. packing (GPTQModel.load excluded); evaluated: the packed in-memory model "
                  f"({', '.join(kinds) or 'no QuantLinear found'}); transformers {importlib.metadata.version('transformers')}"),
    })


if __name__ == "__main__":
    main()
