"""The "cuda" backend of the integer-weight kernel, csrc/int_weight_mma.cu: which kernel, which
variant, how many blocks.

y [M, N] = x [M, K] @ dequant(W)^T (+ bias) for 4- and 8-bit weights, symmetric or asymmetric,
any group size that is a multiple of 32 (or one group per row), act-order (`g_idx`) included, x in
float16 or bfloat16 on a CUDA GPU. Four paths, by the number of tokens M:
  M <= GEMV_MAX_M:   the decode kernel: weights stream straight into registers, dequantized to
                     exact q - z, the tensor cores sum 128 columns at a time and the scale
                     multiplies those float32 sums (the bound is reading the packed weights once).
  "mma":             the batch kernel: a cp.async ring per warp, weights dequantized to
                     (q - z) * s in half precision.
  "wgmma":           Hopper (csrc/int_weight_wgmma.cu): the dequantized words are wgmma's register
                     operand, x tiles in shared memory, 32-256 tokens a tile; 4-bit weights in both
                     variants (rs, ws, ws4), 8-bit ones in ws and ws4.
  "dense":           the weight dequantized to a dense [N, K] matrix by one kernel and multiplied
                     by cuBLAS (large batches are compute-bound; cuBLAS's Hopper matmul is faster).
Above GEMV_MAX_M, 4- and 8-bit weights take the path (and wgmma variant and tile) measured fastest
for this GPU and width (csrc/int_weight_dispatch.json, scripts/tune_int_weight.py); without a
measurement, the batch kernel below DENSE_MIN_M and dense from it.

Also backend "cuda" of rms_norm_matmul: one token's residual add and RMSNorm in the decode
kernel's prologue. The layout (built once, at load) is quantkit.kernels.int_weight_layout; the
launches are quantkit.kernels.launch_int_weight_mma.
"""

from __future__ import annotations

import functools
import json
import math

import torch

from quantkit.formats import IntSpec
from quantkit.kernels import cuda
from quantkit.kernels.engine_ops import rms_norm_matmul_reference
from quantkit.kernels.int_weight import PreparedIntWeight
from quantkit.kernels.int_weight_layout import U, layout, scale_tables
from quantkit.kernels.launch_int_weight_mma import (MODULE, GemvVariant, dequant_kernel, gemv_kernel,
                                                   int_weight_dequant, int_weight_gemv, int_weight_mma, mma_kernel)
from quantkit.kernels.launch_int_weight_wgmma import BITS as WGMMA_BITS
from quantkit.kernels.launch_int_weight_wgmma import BM as WGMMA_BM
from quantkit.kernels.launch_int_weight_wgmma import KIND_TILES as WGMMA_KIND_TILES
from quantkit.kernels.launch_int_weight_wgmma import KINDS as WGMMA_KINDS
from quantkit.kernels.launch_int_weight_wgmma import TILES as WGMMA_TILES
from quantkit.kernels.launch_int_weight_wgmma import THREADS as WGMMA_THREADS
from quantkit.kernels.launch_int_weight_wgmma import module_of as wgmma_module_of
from quantkit.kernels.launch_int_weight_wgmma import (fragment_order, int_weight_wgmma, int_weight_wgmma_ws,
                                                      shared_bytes, wgmma_kernel, x_tiles)
from quantkit.kernels.registry import register_backend
from quantkit.resources import csrc_dir

WGMMA_KIND = "rs"  # wgmma's A operand from registers (the one variant kept: csrc/NOTES.md, v6)
WGMMA_MIN_K_TILES = 8  # a K split of the Hopper GEMM keeps at least this many 64-column k-tiles
WGMMA_TILE_COST = 64  # token-tile choice: a tile costs its BN tokens plus this many (the weights' dequantization
#                      and the x tile's fill, repeated per tile): the tile minimizing tiles x (BN + this) wins
DENSE_MIN_M = 256  # from this many tokens on, dequantize + cuBLAS (scripts/bench_kernels.py measures the crossover)
GEMV_MAX_M = 16  # up to this many tokens, the decode (gemv) kernel ...
GEMV_MIN_STEPS_5_16 = 8  # ... for 5-16 tokens only where each warp gets this many steps: with fewer, its fix-up
#                          (M partial sums per warp) costs more than the batch kernel (csrc/NOTES.md, v5)
GEMV = GemvVariant(EPI=True, D=2, W=8, XP=False, MB=2, RBK=False)  # the stream-K decode kernel every format has
GEMV_MIN_STEPS_PER_WARP = 2  # each decode warp takes at least this many 4-unit steps
# ... unless the weight has few enough 32-row blocks that one block of 4, 8 or 16 warps per row block gives the
# GPU about this many warps; that variant adds its warps' sums in shared memory, not through a global fix-up,
# which is faster where it fills the GPU (csrc/NOTES.md, "decode-kernel variants at M = 1")
ROW_BLOCK_WARPS = 2048
ROW_BLOCK_GEMV = {W: GemvVariant(EPI=True, D=2, W=W, XP=False, MB=MB, RBK=True) for W, MB in ((16, 1), (8, 2), (4, 4))}
MIN_STEPS_PER_WARP = 4  # K splits never leave a batch-kernel warp fewer 32-column units than this
WARPS = 8  # per block of the mma and dequant kernels, as in the .cu
SMEM_BUDGET = 47104  # as in the .cu
NORM_MAX_K = 12288  # the fused RMSNorm keeps the normalized token in shared memory: 24 KB, beside the 16 KB of
#                    the row-block variant's sums (48 KB in all without an opt-in)
_KEY = {torch.float16: "f16", torch.bfloat16: "bf16"}  # the compute dtypes, and their names in w.tensors / w.state


def unsupported(spec: IntSpec) -> str | None:
    """Why this backend cannot take `spec`, or None."""
    if spec.bits not in (4, 8):
        return f"the CUDA kernel takes 4- or 8-bit weights, not {spec.bits}-bit"
    if spec.group_size is not None and spec.group_size % 32:
        return f"the CUDA kernel takes group sizes that are multiples of 32, not {spec.group_size}"
    return None


def _available(device: torch.device, dtype: torch.dtype | None, spec: IntSpec | None) -> bool:
    """A CUDA GPU with CuPy, a format the kernel takes, and half precision (it computes in
    fp16 / bf16: a float32 model keeps the reference twin). None: not known yet."""
    return (device.type == "cuda" and cuda.available() and (spec is None or unsupported(spec) is None)
            and (dtype is None or dtype in _KEY))


def _prepare(packed, scale, zero_point_packed, g_idx, spec: IntSpec, shape: tuple[int, int]) -> PreparedIntWeight:
    reason = unsupported(spec)
    if reason:
        raise ValueError(reason)
    if not packed.is_cuda:
        raise ValueError(f"the CUDA kernel needs the weight on a CUDA device, got {packed.device}")
    n, k = shape
    return PreparedIntWeight("cuda", spec, (n, k), layout(packed, scale, zero_point_packed, g_idx, spec, (n, k)))


def tables(w: PreparedIntWeight, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scale (and zero) tables in `dtype`, built on first use per dtype and kept in w.tensors."""
    t = w.tensors
    key = _KEY[dtype]
    if f"scales_{key}" not in t:
        t[f"scales_{key}"], zeros = scale_tables(t, w.spec.bits, dtype)
        if zeros is not None:
            t[f"zeros_{key}"] = zeros
    return t[f"scales_{key}"], t.get(f"zeros_{key}")


def _table_args(w: PreparedIntWeight) -> tuple[int, int, int]:
    """(TR, sshift, SPS) as the kernels take them."""
    sps, sshift = (int(v) for v in w.tensors["table_shape"])
    return w.tensors["table_rows"].shape[0], sshift, sps


def _asym(w: PreparedIntWeight) -> bool:
    return "zero_point" in w.tensors


def dequantize_dense(w: PreparedIntWeight, dtype: torch.dtype) -> torch.Tensor:
    """The whole weight as dtype [Np, Kp] (padded; rows past N and columns past K hold finite
    values that meet only zero-padded x), by csrc/int_weight_mma.cu's dequant kernel."""
    words = w.tensors["words"]
    rb, ks = words.shape[:2]
    scales, zeros = tables(w, dtype)
    tr, sshift, sps = _table_args(w)
    out = torch.empty(rb * 32, ks * 32, dtype=dtype, device=words.device)
    int_weight_dequant(dequant_kernel(dtype, w.spec.bits, _asym(w)), (-(-rb * ks // WARPS),), (32 * WARPS,),
                       w=words, scales=scales, zeros=zeros, out=out, RB=rb, NS=ks // U, tr=tr, sshift=sshift, sps=sps)
    return out


def _ring_bytes(bits: int, asym: bool) -> int:
    """Dynamic shared memory of the mma kernel (Ring in the .cu)."""
    lane_bytes = 16 * (bits // 4) + 8 + (8 if asym else 0)
    stages = min(8, SMEM_BUDGET // (WARPS * 32 * lane_bytes))
    return WARPS * stages * 32 * lane_bytes


def _splits(tiles: int, work: int, slots: int, least: int) -> int:
    """How many blocks of the mma kernel share one tile's K (`work` units): the fewest that
    fill the GPU's resident block slots in whole waves to 90% (blocks are equal, so a
    part-filled last wave idles the rest), else the best filling, each block keeping at
    least `least` units."""
    most = max(1, work // least)

    def filled(s: int) -> float:
        blocks = tiles * s
        return blocks / (math.ceil(blocks / slots) * slots)

    good = [s for s in range(1, most + 1) if filled(s) >= 0.9]
    return good[0] if good else max(range(1, most + 1), key=lambda s: (filled(s), -s))


def _gather_pad(x2: torch.Tensor, perm: torch.Tensor | None, kp: int) -> torch.Tensor:
    """x's columns in the weight's (act-order-sorted) order, zero-padded to kp columns."""
    x2 = x2 if perm is None else x2[:, perm]
    return torch.nn.functional.pad(x2, (0, kp - x2.shape[1])) if kp != x2.shape[1] else x2


def _rows_in_place(x2: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """x as the kernels read it in place: act-order columns gathered, columns padded to a
    multiple of 8, rows 16-byte aligned with unit column stride (copied only when needed)."""
    x2 = _gather_pad(x2, perm, -(-x2.shape[1] // 8) * 8)
    if x2.stride(-1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:
        x2 = x2.clone(memory_format=torch.contiguous_format)
    return x2


def _launch_blocks(name: str, threads: int, smem: int, device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count * cuda.resident_blocks(
        name, MODULE, threads, smem)


def _gemv_name(w: PreparedIntWeight, dtype: torch.dtype, m: int, variant: GemvVariant, norm: bool = False) -> str:
    sps = int(w.tensors["table_shape"][0])
    return gemv_kernel(dtype, w.spec.bits, _asym(w), 1 if m <= 8 else 2, sps, variant, norm)


def _gemv_per(w: PreparedIntWeight, name: str, warps: int, device: torch.device) -> int:
    """Steps per warp of the decode kernel: the RB * NS steps spread over every warp the GPU holds at once."""
    rb, ks = w.tensors["words"].shape[:2]
    return max(GEMV_MIN_STEPS_PER_WARP, -(-rb * (ks // U) // (warps * _launch_blocks(name, 32 * warps, 0, device))))


def _engine_kernels(w: PreparedIntWeight) -> bool:
    """Whether the row-block and fused-RMSNorm decode kernels are instantiated for this weight:
    4-bit, one scale set per step (groups of 128 columns or more; GEMV_ENGINE in the .cu)."""
    return w.spec.bits == 4 and int(w.tensors["table_shape"][0]) == 1


def _gemv_variant(w: PreparedIntWeight, m: int) -> GemvVariant:
    """The decode kernel's variant for this weight: for M <= 4 (and the formats _engine_kernels
    names), one block per row block (no global fix-up) with 16, 8 or 4 warps where that gives the
    GPU between half of ROW_BLOCK_WARPS and ROW_BLOCK_WARPS warps in all; else the stream-K
    kernel (GEMV)."""
    rb = w.tensors["words"].shape[0]
    if m <= 4 and _engine_kernels(w):
        for warps in (16, 8, 4):
            if ROW_BLOCK_WARPS // 2 <= rb * warps <= ROW_BLOCK_WARPS:
                return ROW_BLOCK_GEMV[warps]
    return GEMV


def wgmma_ok(w: PreparedIntWeight, kind: str | None = None) -> bool:
    """Whether the Hopper GEMM (csrc/int_weight_wgmma.cu) takes this weight here (in variant `kind`,
    None: in some variant): 4-bit weights in every one, 8-bit ones in "ws" and "ws4", on a GPU of compute
    capability 9.0."""
    kinds = [kind] if kind is not None else WGMMA_KINDS
    return any(w.spec.bits in WGMMA_BITS.get(k, ()) for k in kinds) and cuda.arch_specific_ok()


def wgmma_tile(m: int, tiles: tuple[int, ...] = WGMMA_TILES) -> int:
    """The token tile BN (of `tiles`) for m tokens (WGMMA_TILE_COST; ties go to the larger tile)."""
    return min(tiles, key=lambda bn: (-(-m // bn) * (bn + WGMMA_TILE_COST), -bn))


@functools.cache
def _gpu(device: torch.device) -> tuple[str, str]:
    """(name, compute capability "major.minor") of a CUDA device, as dispatch_table takes them."""
    return torch.cuda.get_device_name(device), "{}.{}".format(*torch.cuda.get_device_capability(device))


def table_key(bits: int) -> str:
    """Where a GPU's entry in csrc/int_weight_dispatch.json keeps the choices for `bits`-bit weights."""
    return "shapes" if bits == 4 else f"shapes_b{bits}"


@functools.cache
def dispatch_table(gpu: str, capability: str | None = None,
                   bits: int = 4) -> dict[tuple[int, int], list[tuple[int, str]]]:
    """The measured choices above GEMV_MAX_M tokens for `bits`-bit weights on the GPU named `gpu`
    (csrc/int_weight_dispatch.json, written by scripts/tune_int_weight.py), else on a measured GPU of
    the same compute capability ("9.0"): shape (N, K) -> [(from M, choice)], choice "mma", "dense" or
    "wgmma:<kind>:<BN>". Empty where neither was measured."""
    path = csrc_dir() / "int_weight_dispatch.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    key = table_key(bits)
    same_kind = (e for _, e in sorted(data.items()) if capability and e.get("capability") == capability and key in e)
    entry = data.get(gpu) if key in data.get(gpu, {}) else next(same_kind, None)
    if not entry:
        return {}
    return {tuple(map(int, shape.split("x"))): [(int(m), c) for m, c in rows]
            for shape, rows in entry[key].items()}


def measured_choice(m: int, n: int, k: int, gpu: str, capability: str | None = None, bits: int = 4) -> str | None:
    """The table's choice for m tokens of `bits`-bit weights on the measured shape nearest (N, K) (in
    log N + log K): the entry of the largest measured M <= m. None: no table for this GPU (dispatch_table)."""
    table = dispatch_table(gpu, capability, bits)
    if not table:
        return None
    shape = min(table, key=lambda s: (abs(math.log(s[0] / n)) + abs(math.log(s[1] / k)), s))
    rows = table[shape]
    return next((c for start, c in reversed(rows) if start <= m), rows[0][1])


def _path(m: int, w: PreparedIntWeight, dtype: torch.dtype, device: torch.device) -> str:
    """"gemv", "mma", "dense", or the measured "wgmma:<kind>:<BN>" (its variant and token tile too)."""
    if m > GEMV_MAX_M:  # the table measures 4- and 8-bit weights apart; a width it lacks keeps the fixed rules
        choice = measured_choice(m, *w.shape, *_gpu(device), bits=w.spec.bits)
        if choice is not None and (not choice.startswith("wgmma") or wgmma_ok(w, choice.split(":")[1])):
            return choice
    if m >= DENSE_MIN_M:
        return "dense"
    if m > GEMV_MAX_M:
        return "mma"
    if m <= 4:
        return "gemv"
    name = _gemv_name(w, dtype, m, GEMV)
    return "gemv" if _gemv_per(w, name, GEMV.W, device) >= GEMV_MIN_STEPS_5_16 else "mma"


def fused_rms_norm_matmul(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                          w: PreparedIntWeight, bias: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One token's residual add, RMSNorm and matmul in one decode-kernel launch:
    h = x + residual (x when residual is None), y = RMSNorm(h) * norm_weight @ dequant(w)^T (+ bias);
    returns (y, h), rounded as quantkit.kernels.engine_ops.add_rms_norm and then the matmul would.
    None where the fused kernel does not apply (more than one token, act-order, K past NORM_MAX_K,
    unaligned rows, formats without the fused kernel: see _engine_kernels)."""
    if not _engine_kernels(w):
        return None
    k = w.shape[1]
    kp = w.tensors["words"].shape[1] * 32
    rows = [x] + ([residual] if residual is not None else [])
    if (not x.is_cuda or x.dtype not in _KEY or x.shape != (1, k) or "perm" in w.tensors or kp > NORM_MAX_K or k % 8
            or any(t.dtype != x.dtype or t.shape != x.shape or t.stride(-1) != 1 or t.data_ptr() % 16 for t in rows)):
        return None
    h = torch.empty_like(x) if residual is not None else x
    y = _matmul(x, w, bias, path="gemv", norm=(residual, norm_weight.to(x.dtype).contiguous(), float(eps), h))
    return y, h


@register_backend("rms_norm_matmul", "cuda", available=_available)
def _rms_norm_matmul(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                     w: PreparedIntWeight, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel where it applies, else the two ops it fuses (the twin)."""
    fused = fused_rms_norm_matmul(x, residual, norm_weight, eps, w, bias)
    return fused if fused is not None else rms_norm_matmul_reference(x, residual, norm_weight, eps, w, bias)


@register_backend("int_weight", "cuda", available=_available, prepare=_prepare)
def _matmul(x: torch.Tensor, w: PreparedIntWeight, bias: torch.Tensor | None, path: str | None = None,
           variant: GemvVariant | None = None, norm: tuple | None = None, bn: int | None = None,
           kind: str | None = None) -> torch.Tensor:
    """path: "gemv" (M <= 16), "mma", "wgmma" (4-bit, Hopper) or "dense"; None picks by M. variant:
    the decode kernel's, for benchmarks and tests of the instantiated alternatives (None: the production choice,
    _gemv_variant). norm: (residual or None, norm weight in x's dtype, eps, h out), the decode
    kernel's fused RMSNorm (fused_rms_norm_matmul). bn, kind: the wgmma kernel's token tile and A
    operand (None: the measured ones when the table picked wgmma, else wgmma_tile, WGMMA_KIND), for
    benchmarks and tests."""
    if x.dtype not in _KEY:
        raise ValueError(f"the CUDA kernel computes in float16 or bfloat16, got a {x.dtype} input; "
                         "load the model in half precision or use the reference backend")
    words = w.tensors["words"]
    if x.device != words.device:
        raise ValueError(f"input on {x.device}, weight on {words.device}")
    n, k = w.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)
    rb, ks = words.shape[:2]
    perm = w.tensors.get("perm")
    b = None if bias is None else bias.to(x.dtype).contiguous()
    path, *tile = (path or _path(m, w, x.dtype, x.device)).split(":")
    if tile:  # the measured wgmma variant and token tile, where the caller named none
        kind, bn = kind or tile[0], bn or int(tile[1])
    if path == "dense":
        weight = dequantize_dense(w, x.dtype)[:n]
        x2 = _gather_pad(x2, perm, ks * 32)
        return torch.nn.functional.linear(x2, weight, b).reshape(*lead, n)

    scales, zeros = tables(w, x.dtype)
    tr, sshift, sps = _table_args(w)
    x2 = _rows_in_place(x2, perm)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    counters = cuda.counters("int_weight", x.device, rb)
    if path == "gemv":
        if m > 16:
            raise ValueError(f"the gemv kernel takes at most 16 tokens, got {m}")
        variant = variant if variant is not None else _gemv_variant(w, m)
        name = _gemv_name(w, x.dtype, m, variant, norm is not None)
        ns = ks // U
        total = rb * ns
        if variant.RBK:  # one block per row block, each warp `per` of its steps
            per, cmax, ws, blocks = -(-ns // variant.W), 0, None, rb
        else:
            per = _gemv_per(w, name, variant.W, x.device)
            cmax = (ns - 1) // per + 2
            ws = torch.empty(rb * cmax * m * 32, dtype=torch.float32, device=x.device) if per % ns else None
            blocks = -(-total // (per * variant.W))
        residual, norm_weight, eps, h = norm if norm is not None else (None, None, 0.0, None)
        # launched early (PDL) the kernel reads its weights and scales before waiting for the previous
        # kernel: only once they were settled by an ordinary launch (the first, per dtype's tables)
        settled = f"gemv_{_KEY[x.dtype]}"
        int_weight_gemv(name, (blocks,), (32 * variant.W,), x=x2, w=words, scales=scales, zeros=zeros, bias=b, y=y,
                        ws=ws, counters=counters, M=m, N=n, K=x2.shape[1], NS=ns, RB=rb, ldx=x2.stride(0), ldy=n, tr=tr,
                        sshift=sshift, per=per, cmax=cmax, res=residual, nw=norm_weight, eps=eps,
                        h_out=h if residual is not None else None,
                        shared_mem=0 if norm is None else ks * 32 * x.element_size(), dependent=settled in w.state)
        w.state[settled] = True
        return y.reshape(*lead, n)

    if path == "wgmma":
        if kind is not None and kind not in WGMMA_KINDS:
            raise ValueError(f"the wgmma kernel's variants are {WGMMA_KINDS}, got {kind!r}")
        if not wgmma_ok(w, kind):
            raise ValueError(f"the wgmma kernel takes 4-bit weights (8-bit ones in its ws variants) on a compute "
                             f"capability 9.0 GPU, got {w.spec.bits}-bit" + (f" for {kind}" if kind else "")
                             + f" on {torch.cuda.get_device_name(x.device)}")
        _wgmma(x2, w, b, y, scales, zeros, bn, kind)
        return y.reshape(*lead, n)

    nt = 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8
    name = mma_kernel(x.dtype, w.spec.bits, _asym(w), nt)
    smem = _ring_bytes(w.spec.bits, zeros is not None)
    zchunks = -(-m // (8 * nt))
    tiles = rb * zchunks
    per_split = -(-ks // _splits(tiles, ks, _launch_blocks(name, 32 * WARPS, smem, x.device),
                                 WARPS * MIN_STEPS_PER_WARP))
    splits = -(-ks // per_split)
    ws = torch.empty(splits, m, rb * 32, dtype=torch.float32, device=x.device) if splits > 1 else None
    int_weight_mma(name, (rb, splits, zchunks), (32 * WARPS,), x=x2, w=words, scales=scales, zeros=zeros, bias=b, y=y,
                   ws=ws, counters=cuda.counters("int_weight", x.device, tiles), M=m, N=n, K=x2.shape[1], NS=ks // U,
                   ldx=x2.stride(0), ldy=n, tr=tr, sshift=sshift, sps=sps, steps_per_split=per_split, shared_mem=smem)
    return y.reshape(*lead, n)


def _wgmma(x2: torch.Tensor, w: PreparedIntWeight, bias: torch.Tensor | None, y: torch.Tensor, scales: torch.Tensor,
           zeros: torch.Tensor | None, bn: int | None, kind: str | None) -> None:
    """y = x2 @ dequant(w)^T (+ bias) on the Hopper GEMM: tiles of 128 rows x bn tokens, K split
    where the tiles alone would leave most of the GPU's block slots empty. x2: as _rows_in_place
    gives it."""
    words = w.tensors["words"]
    rb, ks = words.shape[:2]
    m, n = y.shape
    bits = w.spec.bits
    kind = kind or (WGMMA_KIND if bits in WGMMA_BITS[WGMMA_KIND] else "ws")
    if kind not in WGMMA_KINDS:
        raise ValueError(f"the wgmma kernel's variants are {WGMMA_KINDS}, got {kind!r}")
    bn = bn or wgmma_tile(m, WGMMA_KIND_TILES[kind])
    if bn not in WGMMA_KIND_TILES[kind]:
        raise ValueError(f"the wgmma kernel's token tile is one of {WGMMA_KIND_TILES[kind]} in {kind}, got {bn}")
    name = wgmma_kernel(kind, x2.dtype, zeros is not None, bn, bits)
    smem = shared_bytes(kind, bn, zeros is not None, bits)
    row_tiles, token_tiles = -(-rb * 32 // WGMMA_BM[kind]), -(-m // bn)
    k_tiles = ks // 2
    slots = torch.cuda.get_device_properties(x2.device).multi_processor_count * cuda.resident_blocks(
        name, wgmma_module_of(kind), WGMMA_THREADS[kind], smem)
    tiles = row_tiles * token_tiles
    # K splits only where the tiles leave more than half the GPU's block slots empty: a split's float32
    # partials cost more than a part-filled last wave (28672x8192 at M=64: 224 tiles on 264 slots)
    split = max(1, min(slots // tiles, k_tiles // WGMMA_MIN_K_TILES)) if 2 * tiles <= slots else 1
    per_split = -(-k_tiles // split)
    splits = -(-k_tiles // per_split)
    ws = (torch.empty(splits, m, row_tiles * WGMMA_BM[kind], dtype=torch.float32, device=x2.device)
          if splits > 1 else None)
    tr, sshift, sps = _table_args(w)
    counters = cuda.counters("int_weight", x2.device, tiles)
    if kind != "rs":
        int_weight_wgmma_ws(name, (row_tiles, splits, token_tiles), xt=x_tiles(x2, x2.shape[1], ks, bn), w=words,
                            scales=scales, zeros=zeros, bias=bias, y=y, ws=ws, counters=counters, M=m, N=n, RB=rb,
                            KS=ks, ldy=n, tr=tr, sshift=sshift, sps=sps, kt_per_split=per_split, shared_mem=smem)
        return
    x2 = fragment_order(_gather_pad(x2, None, ks * 32))
    int_weight_wgmma(name, (row_tiles, splits, token_tiles), x=x2, w=words, scales=scales, zeros=zeros, bias=bias,
                     y=y, ws=ws, counters=counters, M=m, N=n,
                     K=x2.shape[1], RB=rb, KS=ks, ldx=x2.stride(0), ldy=n, tr=tr, sshift=sshift, sps=sps,
                     kt_per_split=per_split, shared_mem=smem)
