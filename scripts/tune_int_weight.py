"""Measures which kernel the 4-bit integer-weight matmul should use above GEMV_MAX_M tokens, per
GPU and shape family, and writes the table the dispatcher reads (csrc/int_weight_dispatch.json).

For each shape NxK and token count M it times, as scripts/bench_kernels.py does (CUDA-graph
replays over weight sets that L2 cannot hold), every path that takes that M: the batch kernel
("mma"), dequantize + cuBLAS ("dense"), and on Hopper the wgmma GEMM in each variant and
token tile ("wgmma:rs:128", ...), W4A16 (--bits 8: W8A16) g128 symmetric float16 weights; the
fastest becomes the table's entry for [M, next measured M). quantkit.kernels.int_weight_cuda then
looks up the nearest measured shape (in log N + log K) for this GPU's name; a GPU without an entry
keeps the fixed rules.

    python scripts/tune_int_weight.py [--shapes 4096x4096 ...] [--ms 17 32 64 ...] [--bits 4|8] [--write]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from bench_kernels import time_us  # scripts/ is on sys.path when run as a script
from quantkit.formats import IntSpec, pack_int32
from quantkit.kernels import int_weight_cuda as iwc
from quantkit.kernels import prepare_int_weight
from quantkit.kernels.launch_int_weight_wgmma import BITS, KIND_TILES, KINDS
from quantkit.resources import csrc_dir

SHAPES = ["4096x4096", "12288x4096", "4096x11008", "22016x4096", "28672x8192", "8192x28672"]
MS = [17, 32, 64, 128, 256, 512, 1024, 2048]
ROTATE_BYTES = 200e6
DEV = torch.device("cuda")


def weight(n: int, k: int, bits: int = 4, dense: bool = False):
    spec = IntSpec(bits, True, 128)
    half = 1 << (bits - 1)
    q = torch.randint(-half, half, (n, k), dtype=torch.int8, device=DEV)
    scale = (torch.rand(n, k // spec.group_size, device=DEV) * 0.01 + 0.001).half()
    prepared = prepare_int_weight(pack_int32(q, bits, 1), scale, None, None, spec, (n, k), backend="cuda")
    if not dense:
        return prepared
    return prepared, q.float() * scale.float().repeat_interleave(spec.group_size, dim=1)  # the float32 weight it holds


CHECK_TOLERANCE = 1e-2  # relative error (Frobenius) against the float32 product; a correct kernel is ~1e-4


def wrong(choice: str, x: torch.Tensor, w, w_float: torch.Tensor) -> str | None:
    """Why `choice` may not be timed: its output is not the product (or it failed); None when it is."""
    try:
        y = run(choice, x, w).float()
    except Exception as e:  # a variant that cannot launch here is reported, not chosen
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    ref = x.float() @ w_float.T
    err = float((y - ref).norm() / ref.norm())
    return None if err < CHECK_TOLERANCE else f"relative error {err:.1e}"


def candidates(m: int, hopper: bool, kinds: list[str], bits: int = 4) -> list[str]:
    paths = ["mma"] + (["dense"] if m >= 64 else [])
    if hopper:
        paths += [f"wgmma:{kind}:{bn}" for kind in kinds if bits in BITS[kind] for bn in KIND_TILES[kind]
                  if bn // 4 < m <= 4 * bn]
    return paths


def run(choice: str, x: torch.Tensor, w) -> torch.Tensor:
    path, *rest = choice.split(":")
    kind, bn = (rest[0], int(rest[1])) if rest else (None, None)
    return iwc._matmul(x, w, None, path=path, bn=bn, kind=kind)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=SHAPES)
    p.add_argument("--ms", type=int, nargs="+", default=MS)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                   help="wgmma variants to try (default: all; ss, dropped, lost to rs at every shape and M measured: "
                        "csrc/NOTES.md)")
    p.add_argument("--bits", type=int, choices=[4, 8], default=4, help="weight width (each has its own table)")
    p.add_argument("--write", action="store_true", help="merge this GPU's table into csrc/int_weight_dispatch.json")
    p.add_argument("--json-out", default=None, help="every timing, as JSON")
    args = p.parse_args()
    gpu = torch.cuda.get_device_name()
    hopper = iwc.wgmma_ok(weight(128, 128, args.bits))
    console = Console()
    table, timings = {}, []
    for shape in args.shapes:
        n, k = map(int, shape.split("x"))
        first, w_float = weight(n, k, args.bits, dense=True)
        sets = [first] + [weight(n, k, args.bits) for _ in range(max(3, int(-(-ROTATE_BYTES // (n * k * args.bits / 8)))) - 1)]
        dense = [torch.randn(n, k, device=DEV, dtype=torch.float16) * 0.02 for _ in range(len(sets))]
        rows = []
        for m in sorted(args.ms):
            xs = [torch.randn(m, k, device=DEV, dtype=torch.float16) for _ in sets]
            t16, *_ = time_us(lambda x, wd: torch.nn.functional.linear(x, wd), xs, dense, args.iters)
            # every candidate checked against the weight it holds before it is timed: a wrong one is never chosen
            paths = candidates(m, hopper, args.kinds, args.bits)
            bad = {c: why for c in paths if (why := wrong(c, xs[0], first, w_float))}
            for c, why in bad.items():
                console.print(f"[red]{shape} M={m}: {c} left out: {why}[/red]")
            times = {c: time_us(lambda x, w, c=c: run(c, x, w), xs, sets, args.iters)[0] for c in paths if c not in bad}
            best = min(times, key=times.get)
            rows.append([m, best])
            timings.append({"shape": shape, "M": m, "fp16_us": t16, "us": times, "best": best, "wrong": bad})
            console.print(f"{shape} M={m}: fp16 {t16:.1f} us; " + ", ".join(
                f"{c} {t:.1f} ({t16 / t:.2f}x)" for c, t in sorted(times.items(), key=lambda kv: kv[1])), highlight=False)
        # consecutive Ms with one choice become one entry
        table[shape] = [r for i, r in enumerate(rows) if i == 0 or r[1] != rows[i - 1][1]]
        del sets, dense, first, w_float
        torch.cuda.empty_cache()

    out = Table(title=f"int_weight dispatch above {iwc.GEMV_MAX_M} tokens, {gpu} (W{args.bits}A16 g128 fp16)")
    out.add_column("shape")
    out.add_column("from M: path")
    for shape, entries in table.items():
        out.add_row(shape, ", ".join(f"{m}: {c}" for m, c in entries))
    console.print(out)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"gpu": gpu, "torch": torch.__version__, "bits": args.bits, "timings": timings,
                       "table": table}, f, indent=1)
    if args.write:
        path = csrc_dir() / "int_weight_dispatch.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        major, minor = torch.cuda.get_device_capability()
        # what was measured before and not now is kept (a long sweep may run in parts): other shapes, the
        # other width's table, and a shape's entries at other Ms (merge_rows)
        key = iwc.table_key(args.bits)
        entry = data.get(gpu, {})
        old = entry.get(key, {})
        merged = {**old, **{shape: merge_rows(old.get(shape, []), rows) for shape, rows in table.items()}}
        entry.update({"capability": f"{major}.{minor}", "command": "python scripts/tune_int_weight.py " + " ".join(
            sys.argv[1:]), "measured": time.strftime("%Y-%m-%d"), key: merged})
        data[gpu] = entry
        path.write_text(dump_table(data))
        console.print(f"wrote {path}")


def merge_rows(old: list, new: list) -> list:
    """A shape's [from M, choice] entries: the new ones, measured now, and the old ones at other Ms (a
    run over a few Ms leaves the rest of the table as it was), in M order, consecutive equal choices as
    one entry."""
    at = {m: c for m, c in old} | {m: c for m, c in new}
    rows = [[m, at[m]] for m in sorted(at)]
    return [r for i, r in enumerate(rows) if i == 0 or r[1] != rows[i - 1][1]]


def dump_table(data: dict) -> str:
    """The table as JSON with one line per shape."""
    lines = ["{"]
    for gi, gpu in enumerate(sorted(data)):
        entry = data[gpu]
        lines.append(f" {json.dumps(gpu)}: {{")
        lines += [f"  {json.dumps(key)}: {json.dumps(entry[key])}," for key in ("capability", "command", "measured")]
        tables = sorted(key for key in entry if key.startswith("shapes"))
        for ti, key in enumerate(tables):
            lines.append(f"  {json.dumps(key)}: {{")
            shapes = sorted(entry[key])
            lines += [f"   {json.dumps(s)}: {json.dumps(entry[key][s])}" + ("," if i < len(shapes) - 1 else "")
                      for i, s in enumerate(shapes)]
            lines.append("  }" + ("," if ti < len(tables) - 1 else ""))
        lines.append(" }" + ("," if gi < len(data) - 1 else ""))
    return "\n".join(lines + ["}"]) + "\n"


if __name__ == "__main__":
    main()
