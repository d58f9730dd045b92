"""The GPU baselines for W8A8: torch._int_mm (int8) and torch._scaled_mm (FP8, row-wise
scales) on Llama-2-7B's linear shapes, beside the bf16 matmul, through our kernel entry
point (quantkit.kernels.w8a8, backend "torch": the input's per-token quantization
included) and bare (the matmul alone, inputs already quantized).

Random weights of real shapes (speed, not quality). Median of CUDA-event timings over
rotating input sets (so the weights are not served from L2 at small M), after warm-up.

    python scripts/bench_w8a8_kernels.py --json-out $OUT/w8a8_kernels.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from quantkit.formats import ActSpec, FloatSpec, IntSpec, quantize_rtn
from quantkit.formats.activation import dynamic_scales, quantize
from quantkit.kernels import prepare_w8a8, w8a8_matmul

SHAPES = {"qkvo 4096x4096": (4096, 4096), "gate/up 11008x4096": (11008, 4096), "down 4096x11008": (4096, 11008)}


def median_ms(fn, sets: int, reps: int = 50) -> float:
    for i in range(5):
        fn(i % sets)
    torch.cuda.synchronize()
    times = []
    for r in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(r % sets)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def check(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        raise RuntimeError("non-finite output")
    return float((y.float() - ref).norm() / ref.norm())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ms", type=int, nargs="+", default=[1, 16, 128, 1024, 4096])
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows = []
    for shape_name, (n, k) in SHAPES.items():
        sets = 4
        w = [torch.randn(n, k, device=dev) * 0.02 for _ in range(sets)]
        w_bf16 = [t.to(torch.bfloat16) for t in w]
        prepared = {}
        for kind, spec, act in (("int8", IntSpec(8, True, None), ActSpec("int8")), ("fp8", FloatSpec("channel"), ActSpec("fp8"))):
            qws = [quantize_rtn(t, spec) for t in w]
            prepared[kind] = (act, qws, [prepare_w8a8(q.q, q.scale.float(), None, spec, act, backend="torch") for q in qws])
        for m in args.ms:
            x = [torch.randn(m, k, device=dev, dtype=torch.bfloat16) for _ in range(sets)]
            ref = x[0].double() @ w[0].double().T
            row = {"shape": shape_name, "N": n, "K": k, "M": m, "gpu": torch.cuda.get_device_name()}
            row["bf16_ms"] = median_ms(lambda i: torch.nn.functional.linear(x[i], w_bf16[i]), sets)
            row["bf16_rel_err"] = check(torch.nn.functional.linear(x[0], w_bf16[0]), ref)
            for kind, (act, qws, prep) in prepared.items():
                row[f"{kind}_ms"] = median_ms(lambda i: w8a8_matmul(x[i], prep[i]), sets)
                row[f"{kind}_rel_err"] = check(w8a8_matmul(x[0], prep[0]), ref)
                xs = [dynamic_scales(t, act) for t in x]
                xq = [quantize(t, s, act) for t, s in zip(x, xs)]
                if kind == "int8":
                    xq = [torch.cat([t, t.new_zeros(max(0, 17 - m), k)]) for t in xq]
                    bare = lambda i: torch._int_mm(xq[i], prep[i].tensors["q_t"])  # noqa: E731
                else:
                    bare = lambda i: torch._scaled_mm(xq[i], prep[i].tensors["q_t"], scale_a=xs[i], scale_b=prep[i].tensors["scale"],  # noqa: E731
                                                      out_dtype=torch.bfloat16)
                row[f"{kind}_bare_ms"] = median_ms(bare, sets)
            flops, wbytes = 2 * m * n * k, n * k
            row["bf16_TFLOPs"] = flops / row["bf16_ms"] / 1e9
            row["bf16_weight_GBs"] = 2 * wbytes / row["bf16_ms"] / 1e6
            rows.append(row)
    print(f"{'shape':20s} {'M':>5s} {'bf16 ms':>8s} {'int8 ms':>8s} {'(bare)':>7s} {'fp8 ms':>8s} {'(bare)':>7s}  int8/fp8 rel err (bf16)")
    for r in rows:
        print(f"{r['shape']:20s} {r['M']:5d} {r['bf16_ms']:8.4f} {r['int8_ms']:8.4f} {r['int8_bare_ms']:7.4f} "
              f"{r['fp8_ms']:8.4f} {r['fp8_bare_ms']:7.4f}  {r['int8_rel_err']:.1e}/{r['fp8_rel_err']:.1e} ({r['bf16_rel_err']:.1e})")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
