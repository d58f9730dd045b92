"""GPTQ's solve alone, at the stacked shapes one decoder block hands it (q/k/v, o, gate/up, down), on
random weights and a Hessian from random correlated inputs: seconds per solve through each backend of
GPTQ's column loop (quantkit.kernels.gptq_columns: "cuda", one launch per 128 columns; "reference",
the torch loop), how much of it is the Hessian's factorization (which every process repeats when
several split a solve's rows: quantkit.distributed), and where the time of one solve goes
(torch.profiler: the top operators by device time). A claim about speed only.

    python scripts/bench_gptq_solve.py --json-out $OUT/solve.json           # Llama-3-8B's block
    python scripts/bench_gptq_solve.py --hidden 256 --mlp 688 --device cpu  # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from quantkit.algorithms.gptq_math import inverse_cholesky, gptq_quantize
from quantkit.formats import IntSpec
from quantkit.kernels.gptq_columns import OVERRIDE_VARIABLE


def _hessian(k: int, device: str) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(k)
    x = torch.randn(4096, k, device=device, generator=g) @ (torch.eye(k, device=device)
                                                            + 0.05 * torch.randn(k, k, device=device, generator=g))
    return 2 * x.T @ x / x.shape[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--mlp", type=int, default=14336)
    p.add_argument("--kv", type=int, default=1024, help="k_proj / v_proj rows (GQA)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", nargs="+", default=["cuda", "reference"])
    p.add_argument("--json-out")
    args = p.parse_args()
    import os

    h, m = args.hidden, args.mlp
    shapes = {"q/k/v": (h + 2 * args.kv, h), "o": (h, h), "gate/up": (2 * m, h), "down": (h, m)}
    spec = IntSpec(4, True, args.group_size)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    rows, profile = [], {}
    for name, (out, k) in shapes.items():
        W = torch.randn(out, k, device=args.device) * 0.02
        H = _hessian(k, args.device)
        for backend in args.backends:
            if backend == "cuda" and not args.device.startswith("cuda"):
                continue
            os.environ[OVERRIDE_VARIABLE] = backend
            times = []
            for _ in range(args.repeats + 1):  # the first warms up (the kernel's compile, cuBLAS, cuSOLVER)
                sync()
                t = time.perf_counter()
                result = gptq_quantize(W, H, spec)
                sync()
                times.append(time.perf_counter() - t)
            factor = []  # the part every process repeats when rows are split over several (quantkit.distributed)
            for _ in range(args.repeats):
                sync()
                t = time.perf_counter()
                inverse_cholesky(H, 0.01)
                sync()
                factor.append(time.perf_counter() - t)
            rows.append({"group": name, "out": out, "in": k, "backend": backend, "seconds": statistics.median(times[1:]),
                         "factor_seconds": statistics.median(factor), "loss": result.loss})
            if name == "down" and backend == args.backends[0] and args.device.startswith("cuda"):
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                        torch.profiler.ProfilerActivity.CUDA]) as prof:
                    gptq_quantize(W, H, spec)
                    sync()
                profile = prof.key_averages().table(sort_by="device_time_total", row_limit=15)
    os.environ.pop(OVERRIDE_VARIABLE, None)
    t = Table(title=f"GPTQ solve, W4 g{args.group_size}, {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}")
    for col in ("group", "out x in", "backend", "s / solve", "of which factorization", "vs reference"):
        t.add_column(col, justify="right")
    ref = {r["group"]: r["seconds"] for r in rows if r["backend"] == "reference"}
    for r in rows:
        t.add_row(r["group"], f"{r['out']} x {r['in']}", r["backend"], f"{r['seconds']:.3f}", f"{r['factor_seconds']:.3f}",
                  f"{ref[r['group']] / r['seconds']:.1f}x" if r["group"] in ref else "")
    per_block = {b: sum(r["seconds"] for r in rows if r["backend"] == b) for b in args.backends}
    if profile:
        print(profile)
    Console(width=120).print(t)
    print("per block:", ", ".join(f"{b} {s:.3f} s" for b, s in per_block.items()))
    factor = {b: sum(r["factor_seconds"] for r in rows if r["backend"] == b) for b in args.backends}
    print("of which factorizations:", ", ".join(f"{b} {s:.3f} s" for b, s in factor.items()))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"rows": rows, "per_block": per_block, "factor_per_block": factor, "profile": profile}, f, indent=1)


if __name__ == "__main__":
    main()
