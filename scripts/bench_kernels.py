"""Quantized matmul kernels against cuBLAS, in one table: for each linear shape NxK
(out_features x in_features) and token count M, the median time per call, the speedup
over F.linear in fp16 (bf16 with --dtype bf16), the effective bandwidth (the weight in
the kernel's own format, scales included, plus the input and output bytes) also as a
fraction of this card's measured device-to-device copy bandwidth, TFLOP/s, and the
relative error against a float32 reference of the same quantized weight.

Kernels (--kernels):
    fp16       F.linear, weight [N, K] in --dtype
    tinygemm   torch's int4 kernel (_weight_int4pack_mm), W4 g128, bfloat16 input
    w4a16      quantkit int_weight_matmul, backend "cuda", symmetric int4, group 128
    w8a16      the same, 8-bit
    int8       torch._int_mm bare (x already int8; needs M > 16 on some torch versions)
    w8a8-int8  quantkit w8a8_matmul, backend "torch" (x's per-token quantization included)
    fp8        torch._scaled_mm bare (e4m3 x and w, row-wise scales, bf16 output)
A kernel that fails to build or run leaves its error text in its row.

Timing: each kernel runs over R separately allocated weight/input sets in turn (R >= 2,
enough sets for ~200 MB of weights, so that L2 serves none of them), captured in one
CUDA graph that repeats the sets for >= 2 ms of work; median of 20 replays divided by
the calls in one. A kernel that does not capture is timed by eager launches ("eager").

    python scripts/bench_kernels.py --json-out $OUT/kernels.json
    python scripts/bench_kernels.py --shapes 4096x4096 --ms 1 16 --kernels fp16 w4a16 --check-only
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from rich import box
from rich.console import Console
from rich.table import Table

from quantkit.formats import ActSpec, IntSpec, pack_int32
from quantkit.formats.activation import dynamic_scales, quantize
from quantkit.kernels import int_weight_matmul, prepare_int_weight, prepare_w8a8, w8a8_matmul

SHAPES = ["4096x4096", "4096x11008", "11008x4096", "8192x28672", "28672x8192"]
GROUP = 128
ROTATE_BYTES = 200e6  # weight bytes per rotation: four times the H200's 50 MB L2
MAX_SETS = 16
TARGET_MS = 2.0  # GPU work per timed run
DEV = torch.device("cuda")
INT8, FP8 = ActSpec("int8"), ActSpec("fp8")


class Case(NamedTuple):
    """One kernel on one shape. make() -> (weight set, ref) where ref(input) is the float32
    product with that set's dequantized weight; prep(x) -> the input the kernel takes for
    x [M, K] in --dtype; call(input, weight set) -> y; weight_bytes: what one call reads
    of the weight in the kernel's format, scales included."""

    make: Callable[[], tuple[Any, Callable[[Any], torch.Tensor]]]
    prep: Callable[[torch.Tensor], Any]
    call: Callable[[Any, Any], torch.Tensor]
    weight_bytes: int


def group_scales(n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    return (torch.rand(n, k // GROUP, device=DEV) * 0.01 + 0.001).to(dtype)


def case_fp16(n: int, k: int, dtype: torch.dtype) -> Case:
    def make():
        w = torch.randn(n, k, device=DEV, dtype=dtype) * 0.02
        return w, lambda x: x.float() @ w.float().T
    return Case(make, lambda x: x, F.linear, 2 * n * k)


def case_tinygemm(n: int, k: int, dtype: torch.dtype) -> Case:
    def make():
        q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=DEV)
        s = group_scales(n, k, torch.bfloat16)
        u = q.int() + 8  # tinygemm stores unsigned nibbles u and dequantizes (u - 8) * scale + zero
        if torch.__version__ >= "2.5":  # uint8 [N, K/2], column 2j in the high nibble, 2j+1 in the low
            u = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(u, 8)  # inner_k_tiles = 8
        scales_and_zeros = torch.stack([s.T, torch.zeros_like(s.T)], dim=-1).contiguous()  # [K/128, N, 2], zero 0
        return (packed, scales_and_zeros), lambda x: x.float() @ (q.float() * s.float().repeat_interleave(GROUP, 1)).T

    def call(x, w):
        return torch.ops.aten._weight_int4pack_mm(x, w[0], GROUP, w[1])
    return Case(make, lambda x: x.to(torch.bfloat16), call, n * k // 2 + 4 * n * (k // GROUP))


def case_ours(bits: int) -> Callable[[int, int, torch.dtype], Case]:
    spec = IntSpec(bits=bits, symmetric=True, group_size=GROUP)

    def build(n: int, k: int, dtype: torch.dtype) -> Case:
        def make():
            q = torch.randint(spec.qmin, spec.qmax + 1, (n, k), dtype=torch.int8, device=DEV)
            packed, scale = pack_int32(q, bits, dim=1), group_scales(n, k, dtype)
            w = prepare_int_weight(packed, scale, None, None, spec, (n, k), backend="cuda")
            return w, lambda x: int_weight_matmul(
                x.float(), prepare_int_weight(packed, scale, None, None, spec, (n, k), backend="reference"))
        return Case(make, lambda x: x, int_weight_matmul, n * k * bits // 8 + 2 * n * (k // GROUP))
    return build


def case_int8(n: int, k: int, dtype: torch.dtype) -> Case:
    def make():
        w8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=DEV)
        return w8, lambda xq: xq.float() @ w8.float().T

    def prep(x):
        return quantize(x, dynamic_scales(x, INT8), INT8)
    return Case(make, prep, lambda xq, w8: torch._int_mm(xq, w8.t()), n * k)


def case_w8a8(n: int, k: int, dtype: torch.dtype) -> Case:
    spec = IntSpec(8, True, None)

    def make():
        w8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=DEV)
        sw = torch.rand(n, 1, device=DEV) * 0.01 + 0.001
        w = prepare_w8a8(w8, sw, None, spec, INT8, backend="torch")
        return w, lambda x: w8a8_matmul(x.float(), prepare_w8a8(w8, sw, None, spec, INT8, backend="reference"))
    return Case(make, lambda x: x, w8a8_matmul, n * k + 4 * n)


def case_fp8(n: int, k: int, dtype: torch.dtype) -> Case:
    def make():
        wq = torch.randn(n, k, device=DEV).to(torch.float8_e4m3fn)
        sw = torch.rand(1, n, device=DEV) * 0.01 + 0.001
        return (wq, sw), lambda xs: (xs[0].float() * xs[1]) @ (wq.float() * sw.T).T

    def prep(x):
        sx = dynamic_scales(x, FP8)  # float32 [M, 1]
        return quantize(x, sx, FP8), sx

    def call(xs, w):
        return torch._scaled_mm(xs[0], w[0].t(), scale_a=xs[1], scale_b=w[1], out_dtype=torch.bfloat16)
    return Case(make, prep, call, n * k + 4 * n)


CASES = {  # --kernels name -> (row label, builder)
    "fp16": ("F.linear (cuBLAS)", case_fp16),
    "tinygemm": ("tinygemm W4 g128", case_tinygemm),
    "w4a16": ("ours W4A16 g128", case_ours(4)),
    "w8a16": ("ours W8A16 g128", case_ours(8)),
    "int8": ("torch._int_mm INT8", case_int8),
    "w8a8-int8": ("ours W8A8-INT8", case_w8a8),
    "fp8": ("torch._scaled_mm FP8", case_fp8),
}


def error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".strip()[:2000]


def nbytes(x: torch.Tensor | tuple[torch.Tensor, ...]) -> int:
    return sum(t.nbytes for t in x) if isinstance(x, tuple) else x.nbytes


def event_ms(fn: Callable[[], Any]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def median_ms(fn: Callable[[], Any], iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(event_ms(fn) for _ in range(iters))


def capture(run: Callable[[], None]) -> tuple[torch.cuda.CUDAGraph | None, str]:
    """A CUDA graph of run(), warmed up on a side stream first as torch's docs require;
    (None, why) where it does not capture."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        return graph, ""
    except Exception as e:
        torch.cuda.synchronize()
        return None, error_text(e)


def time_us(call: Callable, inputs: list, sets: list, iters: int) -> tuple[float, str, str]:
    """(median microseconds per call, "graph" | "eager", why not graph): the sets in turn,
    repeated for >= TARGET_MS per timed run."""
    def loop(reps: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(reps):
                for x, w in zip(inputs, sets):
                    call(x, w)
        return run

    graph, why = capture(loop(1))
    reps = max(1, math.ceil(TARGET_MS / median_ms(graph.replay if graph else loop(1), 5)))
    if graph:
        del graph
        graph, why = capture(loop(reps))
    ms = median_ms(graph.replay if graph else loop(reps), iters)
    return ms * 1e3 / (reps * len(sets)), "graph" if graph else "eager", why


def bench_kernel(kind: str, shape: str, ms: list[int], dtype: torch.dtype, args) -> list[dict]:
    n, k = map(int, shape.split("x"))
    base = {"shape": shape, "N": n, "K": k, "kernel": kind}
    try:
        case = CASES[kind][1](n, k, dtype)
        first, ref = case.make()
        r = min(MAX_SETS, max(2, math.ceil(ROTATE_BYTES / case.weight_bytes)))
        sets = [first] + [case.make()[0] for _ in range(r - 1)]  # each set its own allocation
    except Exception as e:
        return [{**base, "M": m, "error": error_text(e)} for m in ms]
    rows = []
    for m in ms:
        row = {**base, "M": m, "sets": r, "weight_bytes": case.weight_bytes}
        try:
            inputs = [case.prep(torch.randn(m, k, device=DEV, dtype=dtype)) for _ in range(r)]
            y, expect = case.call(inputs[0], sets[0]), ref(inputs[0])
            row["rel_err"] = float((y.float() - expect).norm() / expect.norm())
            row["io_bytes"] = nbytes(inputs[0]) + y.nbytes
            if not args.check_only:
                row["us"], row["timing"], why = time_us(case.call, inputs, sets, args.iters)
                if why:
                    row["graph_error"] = why
        except Exception as e:
            row["error"] = error_text(e)
        rows.append(row)
    return rows


def add_rates(rows: list[dict], copy_gbs: float) -> None:
    base_us = {(r["shape"], r["M"]): r["us"] for r in rows if r["kernel"] == "fp16" and "us" in r}
    for r in rows:
        if "us" not in r:
            continue
        seconds = r["us"] * 1e-6
        r["GBs"] = (r["weight_bytes"] + r["io_bytes"]) / seconds / 1e9
        r["of_copy_bw"] = r["GBs"] / copy_gbs
        r["TFLOPs"] = 2 * r["M"] * r["N"] * r["K"] / seconds / 1e12
        if (r["shape"], r["M"]) in base_us:
            r["speedup"] = base_us[r["shape"], r["M"]] / r["us"]


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second, median of 10."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / median_ms(lambda: dst.copy_(src), 10) / 1e6


def print_table(header: dict, rows: list[dict]) -> None:
    table = Table(title=f"{header['gpu']}, torch {header['torch']}, {header['dtype']}, "
                        f"copy {header['copy_GBs']:.0f} GB/s", box=box.SIMPLE_HEAD)
    for col in ("shape", "M", "kernel", "us", "speedup", "GB/s", "of copy", "TFLOP/s", "rel_err", "timing"):
        table.add_column(col, justify="left" if col in ("shape", "kernel", "timing") else "right")
    table.add_column("error", max_width=60, no_wrap=True, overflow="ellipsis")

    def cell(r: dict, key: str, fmt: str) -> str:
        return format(r[key], fmt) if key in r else ""
    label = {kind: f"{header['dtype']} {name}" if kind == "fp16" else name for kind, (name, _) in CASES.items()}
    for i, r in enumerate(rows):
        if i and (r["shape"], r["M"]) != (rows[i - 1]["shape"], rows[i - 1]["M"]):
            table.add_section()
        table.add_row(r["shape"], str(r["M"]), label[r["kernel"]], cell(r, "us", ".1f"), cell(r, "speedup", ".2f"),
                      cell(r, "GBs", ".0f"), cell(r, "of_copy_bw", ".0%"), cell(r, "TFLOPs", ".1f"),
                      cell(r, "rel_err", ".1e"), r.get("timing", ""), r.get("error", "").split("\n")[0])
    Console(width=220).print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="NxK (out x in features)")
    p.add_argument("--ms", type=int, nargs="+", default=[1, 16, 64, 256, 1024])
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    p.add_argument("--kernels", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--iters", type=int, default=20, help="timed runs per kernel")
    p.add_argument("--check-only", action="store_true", help="correctness only, no timing")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)

    header = {"gpu": torch.cuda.get_device_name(), "torch": str(torch.__version__), "dtype": args.dtype,
              "copy_GBs": copy_bandwidth_gbs()}
    torch.cuda.empty_cache()
    print(f"{header['gpu']}, torch {header['torch']}, device-to-device copy {header['copy_GBs']:.0f} GB/s "
          "(read + write, 1 GiB)", flush=True)
    rows = []
    for shape in args.shapes:
        for kind in args.kernels:
            rows += bench_kernel(kind, shape, args.ms, dtype, args)
            torch.cuda.empty_cache()  # this kernel's weight sets are gone with bench_kernel's frame
            print(f"{shape} {kind} done", flush=True)
    rows.sort(key=lambda r: (args.shapes.index(r["shape"]), r["M"], args.kernels.index(r["kernel"])))
    add_rates(rows, header["copy_GBs"])
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({**header, "rows": rows}, f, indent=2)
    print_table(header, rows)


if __name__ == "__main__":
    main()
