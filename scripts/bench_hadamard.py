"""The online rotation (rotate-online checkpoints: down_proj's input times blockwise Hadamard matrices)
on the GPU: the CUDA fast Walsh-Hadamard transform (csrc/hadamard.cu) against the torch twin (the dense
block matrix), for decode and prefill token counts at Llama shapes. Median of 50 CUDA-event-timed
calls after warm-up; bandwidth = bytes read + written over the time, beside this card's measured
device-to-device copy bandwidth.

    python scripts/bench_hadamard.py --json-out $OUT/hadamard.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from rich.console import Console
from rich.table import Table

from quantkit.formats.hadamard import online_block
from quantkit.kernels.hadamard import hadamard_rows


def _time(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return statistics.median(times)


def _copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    big = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    return 2 * big.numel() / _time(lambda: big.clone(), 20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[11008, 14336, 28672], help="down_proj input widths")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 4096])
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default="bfloat16")
    p.add_argument("--json-out")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    copy_bw = _copy_bandwidth()
    rows = []
    for n in args.widths:
        b = online_block(n)
        for m in args.tokens:
            x = torch.randn(m, n, device="cuda", dtype=dtype)
            fast = _time(lambda: hadamard_rows(x, b, override="cuda"))
            twin = _time(lambda: hadamard_rows(x, b, override="reference"))
            err = float((hadamard_rows(x, b, override="cuda").float() - hadamard_rows(x.double(), b, override="reference")).norm()
                        / hadamard_rows(x.double(), b, override="reference").norm())
            moved = 2 * x.numel() * x.element_size()
            rows.append({"n": n, "block": b, "tokens": m, "cuda_us": fast * 1e6, "twin_us": twin * 1e6,
                         "speedup": twin / fast, "cuda_gbps": moved / fast / 1e9, "of_copy": moved / fast / copy_bw,
                         "rel_error": err})
    t = Table(title=f"online Hadamard on {torch.cuda.get_device_name()}, {args.dtype} (copy {copy_bw / 1e9:.0f} GB/s)")
    for col in ("n", "block", "tokens", "cuda us", "twin us", "speedup", "cuda GB/s", "of copy", "rel. error"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["n"]), str(r["block"]), str(r["tokens"]), f"{r['cuda_us']:.1f}", f"{r['twin_us']:.1f}",
                  f"{r['speedup']:.2f}x", f"{r['cuda_gbps']:.0f}", f"{r['of_copy']:.0%}", f"{r['rel_error']:.1e}")
    Console(width=140).print(t)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "dtype": args.dtype, "copy_gbps": copy_bw / 1e9,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
