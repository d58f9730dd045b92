"""Decode attention over the paged KV cache, alone: one ops.paged_attention call (one token per
sequence) at Llama-2-7B's heads (32 query and KV heads of 128), for each batch x context, with the
cache in float16 and in FP8 E4M3. Beside each time: the bytes the call must read (K and V of every
position once, q, the slot lists) over this card's measured device-to-device copy bandwidth, i.e.
the time a purely bandwidth-bound kernel would take ("floor"), and torch's
scaled_dot_product_attention over the same float16 keys laid out dense (no paging; its flash /
memory-efficient kernel), the baseline in the same process. The slots are a random permutation of
the pool, as a long-running engine's are.

Timing: each call captured in a CUDA graph, 20 calls a replay, median of 10 replays.

    python scripts/bench_attention.py --batches 1 64 256 --contexts 256 2048 --json-out $OUT/attention.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from bench_kernels import capture, copy_bandwidth_gbs, median_ms  # scripts/ is on sys.path when run as a script
from quantkit.kernels import engine_ops as ops

DEV = "cuda"
HEADS, HEAD = 32, 128
console = Console()


def graphed_us(fn, calls: int = 20, replays: int = 10) -> float:
    """us per call: `calls` calls captured in one CUDA graph, median of `replays` replays."""
    fn()  # compile, allocate
    graph, why = capture(lambda: [fn() for _ in range(calls)])
    if graph is None:
        raise RuntimeError(f"attention did not capture in a CUDA graph: {why}")
    return median_ms(graph.replay, replays) * 1e3 / calls


def case(b: int, c: int, copy_gbs: float) -> dict:
    torch.manual_seed(b * 7919 + c)
    slots = b * c
    kc = torch.randn(slots, HEADS, HEAD, device=DEV, dtype=torch.float16)
    vc = torch.randn_like(kc)
    context = torch.randperm(slots, device=DEV).view(b, c)
    positions = torch.full((b,), c - 1, device=DEV)
    q = torch.randn(b, HEADS, HEAD, device=DEV, dtype=torch.float16)
    scale = HEAD ** -0.5
    row = {"batch": b, "context": c}
    for name, (k, v) in (("fp16", (kc, vc)), ("fp8", (kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)))):
        bytes_read = 2 * b * c * HEADS * HEAD * k.element_size() + q.nbytes * 2 + context.nbytes
        row[f"{name}_us"] = graphed_us(lambda: ops.paged_attention(q, k, v, context, positions, scale))
        row[f"{name}_floor_us"] = bytes_read / copy_gbs / 1e3
        out = ops.paged_attention(q, k, v, context, positions, scale).float()
        ref = ops.paged_attention_reference(q, k, v, context, positions, scale).float()
        row[f"{name}_rel_err"] = float((out - ref).norm() / ref.norm())
    # dense float16 keys [B, H, C, D] in sequence order: what the paged kernel reads, without the paging
    kd = kc[context].permute(0, 2, 1, 3).contiguous()
    vd = vc[context].permute(0, 2, 1, 3).contiguous()
    del kc, vc
    qd = q[:, :, None, :]
    row["sdpa_us"] = graphed_us(lambda: F.scaled_dot_product_attention(qd, kd, vd, scale=scale))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 2048])
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    copy_gbs = copy_bandwidth_gbs()
    rows = []
    for c in args.contexts:
        for b in args.batches:
            if 2 * b * c * HEADS * HEAD * 2 * 2.2 > torch.cuda.mem_get_info()[0]:
                console.print(f"batch {b} x context {c}: left out, its caches do not fit")
                continue
            rows.append(case(b, c, copy_gbs))
            torch.cuda.empty_cache()
    t = Table(title=f"paged decode attention, 32 x 128 heads, {torch.cuda.get_device_name()}, "
                    f"copy {copy_gbs:.0f} GB/s; floor = its bytes at copy bandwidth")
    for col in ("batch", "context", "fp16 us", "floor", "fp8 us", "floor", "sdpa fp16 us", "fp16 vs sdpa",
                "rel err fp16 / fp8"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["batch"]), str(r["context"]), f"{r['fp16_us']:.1f}", f"{r['fp16_floor_us']:.1f}",
                  f"{r['fp8_us']:.1f}", f"{r['fp8_floor_us']:.1f}", f"{r['sdpa_us']:.1f}",
                  f"{r['sdpa_us'] / r['fp16_us']:.2f}x", f"{r['fp16_rel_err']:.1e} / {r['fp8_rel_err']:.1e}")
    console.print(t)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_GBs": copy_gbs,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
