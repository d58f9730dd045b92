"""The integer-weight CUDA kernel's paths and decode variants, one by one (H200-class GPU, CuPy).

Random W4A16 g128 symmetric weights in float16 (speed, not quality), timed as in
scripts/bench_kernels.py: CUDA-graph replays over separately allocated weight sets
(>= 200 MB per rotation, so L2 serves none of them). Where bench_kernels.py times the path
the library picks, this forces each one, for the figures of csrc/NOTES.md:

    python scripts/profile_int_weight.py paths [--shapes 28672x8192 ...] [--ms 1 2 4 8 16 64 256 1024]
        fp16 cuBLAS, then the decode kernel (M <= 16), the batch kernel (M >= 2),
        dequantize + cuBLAS (M >= 64) and, on Hopper, the wgmma GEMM with each A operand
        (rs, ss) and token tile BN where BN / 4 < M <= 4 BN: us, speedup over fp16, relative error
    python scripts/profile_int_weight.py variants [--shapes 12288x4096 4096x4096 22016x4096 4096x11008]
        M = 1, every instantiated decode-kernel variant, alone and right after the small op that
        precedes it in the engine (RMSNorm before q/k/v, o and gate/up; SiLU * up before down),
        programmatic dependent launch as configured (QUANTKIT_PDL)
    ncu --section SpeedOfLight -k regex:int_weight_gemv -s 2 -c 1 \\
        python scripts/profile_int_weight.py ncu --shapes 28672x8192 --ms 1 [--path gemv]
        three untimed calls per shape and M: the workload for Nsight Compute
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from bench_kernels import copy_bandwidth_gbs, time_us  # scripts/ is on sys.path when run as a script
from quantkit.formats import IntSpec, pack_int32
from quantkit.kernels import engine_ops, int_weight_matmul, prepare_int_weight
from quantkit.kernels import int_weight_cuda as iwc
from quantkit.kernels.launch_int_weight_wgmma import KINDS as WGMMA_KINDS
from quantkit.kernels.launch_int_weight_wgmma import KIND_TILES as WGMMA_KIND_TILES

SPEC = IntSpec(4, True, 128)
ROTATE_BYTES = 200e6
DEV = torch.device("cuda")
DTYPE = torch.float16


def weight(n: int, k: int, backend: str = "cuda"):
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=DEV)
    scale = (torch.rand(n, k // SPEC.group_size, device=DEV) * 0.01 + 0.001).to(DTYPE)
    return prepare_int_weight(pack_int32(q, 4, 1), scale, None, None, SPEC, (n, k), backend=backend), q, scale


def weight_sets(n: int, k: int) -> list:
    count = max(3, int(-(-ROTATE_BYTES // (n * k / 2))))
    return [weight(n, k)[0] for _ in range(count)]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def paths(shapes: list[tuple[int, int]], ms: list[int], iters: int) -> None:
    print(f"{torch.cuda.get_device_name()}, copy {copy_bandwidth_gbs():.0f} GB/s; W4A16 g128 fp16, us per call")
    for n, k in shapes:
        sets = weight_sets(n, k)
        dense = [torch.randn(n, k, device=DEV, dtype=DTYPE) * 0.02 for _ in sets]
        w, q, scale = weight(n, k)
        reference = prepare_int_weight(pack_int32(q, 4, 1), scale, None, None, SPEC, (n, k), backend="reference")
        for m in ms:
            xs = [torch.randn(m, k, device=DEV, dtype=DTYPE) for _ in sets]
            t16, *_ = time_us(lambda x, wd: torch.nn.functional.linear(x, wd), xs, dense, iters)
            row = f"{n}x{k} M={m:5d} | fp16 {t16:7.1f}"
            ref = int_weight_matmul(xs[0], reference)
            runs = ([("decode", "gemv")] if m <= iwc.GEMV_MAX_M else []) + ([("batch", "mma")] if m > 1 else [])
            runs += [("dense", "dense")] if m >= 64 else []
            runs = [(label, path, None, None) for label, path in runs]
            runs += [(f"{kind}{bn}", "wgmma", bn, kind) for kind in WGMMA_KINDS for bn in WGMMA_KIND_TILES[kind]
                     if iwc.wgmma_ok(w) and bn // 4 < m <= 4 * bn]
            for label, path, bn, kind in runs:
                err = rel_err(iwc._matmul(xs[0], w, None, path=path, bn=bn, kind=kind), ref)
                t, *_ = time_us(lambda x, ws, path=path, bn=bn, kind=kind: iwc._matmul(x, ws, None, path=path, bn=bn,
                                                                                      kind=kind), xs, sets, iters)
                row += f" | {label} {t:7.1f} ({t16 / t:4.2f}x, err {err:.0e})"
            print(row, flush=True)
        del sets, dense
        torch.cuda.empty_cache()


def variants(shapes: list[tuple[int, int]], iters: int) -> None:
    instantiated = [iwc.GEMV, *iwc.ROW_BLOCK_GEMV.values()]
    print(f"{torch.cuda.get_device_name()}; M = 1, W4A16 g128 fp16, us per call; variant = (EPI, D, W, XP, MB, RBK)")
    for n, k in shapes:
        sets = weight_sets(n, k)
        x = torch.randn(1, k, device=DEV, dtype=DTYPE)
        residual, norm = torch.randn(1, k, device=DEV, dtype=DTYPE), torch.ones(k, device=DEV, dtype=DTYPE)
        gate_up = torch.randn(1, 2 * k, device=DEV, dtype=DTYPE)
        if k > 8192:  # the down projection: its input is SiLU(gate) * up
            def before():
                return engine_ops.silu_mul(gate_up[:, :k], gate_up[:, k:])
        else:
            def before():
                return engine_ops.add_rms_norm(x, residual, norm, 1e-5)[0]
        ref = iwc._matmul(x, sets[0], None, path="gemv", variant=iwc.GEMV)
        print(f"{n}x{k} ({n * k / 2e6:.1f} MB, {len(sets)} sets):", flush=True)
        for v in instantiated:
            err = rel_err(iwc._matmul(x, sets[0], None, path="gemv", variant=v), ref)
            alone, *_ = time_us(lambda x, w, v=v: iwc._matmul(x, w, None, path="gemv", variant=v), [x] * len(sets),
                                sets, iters)
            after, *_ = time_us(lambda _, w, v=v: iwc._matmul(before(), w, None, path="gemv", variant=v),
                                [x] * len(sets), sets, iters)
            print(f"   {dataclasses.astuple(v)}: alone {alone:6.1f}, after its op {after:6.1f} ({n * k / 2 / after / 1e6:5.2f} TB/s), "
                  f"err vs stream-K {err:.1e}", flush=True)
        del sets
        torch.cuda.empty_cache()


def ncu(shapes: list[tuple[int, int]], ms: list[int], path: str | None, kind: str | None) -> None:
    for n, k in shapes:
        w = weight(n, k)[0]
        for m in ms:
            x = torch.randn(m, k, device=DEV, dtype=DTYPE)
            for _ in range(3):
                iwc._matmul(x, w, None, path=path, kind=kind)
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["paths", "variants", "ncu"])
    p.add_argument("--shapes", nargs="+", default=None, help="NxK (out x in features)")
    p.add_argument("--ms", type=int, nargs="+", default=None, help="tokens per call (paths, ncu)")
    p.add_argument("--path", choices=["gemv", "mma", "dense", "wgmma"], default=None, help="ncu: force this path")
    p.add_argument("--kind", choices=WGMMA_KINDS, default=None, help="ncu with --path wgmma: this variant")
    p.add_argument("--iters", type=int, default=15, help="timed replays per kernel")
    args = p.parse_args()
    default = {"paths": ["28672x8192", "8192x28672", "11008x4096", "4096x4096"],
               "variants": ["12288x4096", "4096x4096", "22016x4096", "4096x11008"], "ncu": ["28672x8192", "8192x28672"]}
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes or default[args.mode]]
    if args.mode == "paths":
        paths(shapes, args.ms or [1, 16, 64, 256, 1024], args.iters)
    elif args.mode == "variants":
        variants(shapes, args.iters)
    else:
        ncu(shapes, args.ms or [1], args.path, args.kind)


if __name__ == "__main__":
    main()
