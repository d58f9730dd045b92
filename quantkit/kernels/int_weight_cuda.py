"""The "cuda" backend of the integer-weight kernel: csrc/int_weight_mma.cu.

y [M, N] = x [M, K] @ dequant(W)^T (+ bias) for 4- and 8-bit weights, symmetric
or asymmetric, any group size that is a multiple of 32 (or one group per row),
act-order (`g_idx`) included, x in float16 or bfloat16 on a CUDA GPU.

Three paths, by the number of tokens M:
  M <= GEMV_MAX_M:       the decode kernel: weights stream straight into registers,
                         dequantized to exact q - z, the tensor cores sum 128
                         columns at a time and the scale multiplies those float32
                         sums (the bound is reading the packed weights once).
  M < DENSE_MIN_M:       the batch kernel: a cp.async ring per warp, weights
                         dequantized to (q - z) * s in half precision.
  M >= DENSE_MIN_M:      the weight is dequantized to a dense [N, K] matrix by one
                         kernel and multiplied by cuBLAS (large batches are
                         compute-bound; cuBLAS's Hopper matmul is the faster one).

Layout (built once by `prepare`, from the on-disk pack-quantized tensors): see the
comment at the top of csrc/int_weight_mma.cu. With act-order, columns are sorted
by group at load time and x's columns are gathered in the same order per call.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from quantkit.formats import IntSpec, unpack_int32
from quantkit.kernels import cuda
from quantkit.kernels.int_weight import Backend, PreparedIntWeight, register_backend

DENSE_MIN_M = 256  # from this many tokens on, dequantize + cuBLAS (scripts/bench_kernels.py measures the crossover)
GEMV_MAX_M = 16  # up to this many tokens, the decode (gemv) kernel ...
GEMV_MIN_STEPS_5_16 = 8  # ... for 5-16 tokens only where each warp gets this many steps (else the row-block
#                          fix-up, M partial sums per warp, costs more than the mma kernel: H200, 4096x4096 at
#                          M=8 8.5 us mma vs 11.2 us gemv, 28672x8192 at M=8 39.9 us gemv vs 67.8 us mma; at
#                          M <= 4 the decode kernel wins everywhere: 11008x4096 at M=2 13.4 vs 17.8 us)
GEMV = (1, 2, 8, 0, 2, 0)  # the decode kernel instantiated for every format: (scale after the mma, steps ahead,
#                            warps, x loaded ahead, least resident blocks, one block per row block);
#                            csrc/NOTES.md has the variants' timings
GEMV_MIN_STEPS_PER_WARP = 2  # each decode warp takes at least this many 4-unit steps
# ... unless the weight has few enough 32-row blocks that one block of 4, 8 or 16 warps per row block gives the
# GPU about this many warps; that variant adds its warps' sums in shared memory, not through a global fix-up
# (H200, 7B shapes at M = 1 after the op before each, with PDL: 12288x4096 12.7 vs 14.7 us with 4 warps,
# 4096x4096 7.1 vs 8.3 and 4096x11008 10.7 vs 11.9 with 16; 22016x4096 keeps stream-K, 19.3 us; dev/w4_engine_shapes.py)
ROW_BLOCK_WARPS = 2048
ROW_BLOCK_GEMV = {16: (1, 2, 16, 0, 1, 1), 8: (1, 2, 8, 0, 2, 1), 4: (1, 2, 4, 0, 4, 1)}
MIN_STEPS_PER_WARP = 4  # K splits never leave a batch-kernel warp fewer 32-column units than this
WARPS = 8  # per block of the mma and dequant kernels, as in the .cu
U = 4  # column units per step, as in the .cu
SMEM_BUDGET = 47104  # as in the .cu
_DTYPES = {torch.float16: "f16", torch.bfloat16: "bf16"}


def unsupported(spec: IntSpec) -> str | None:
    """Why this backend cannot take `spec`, or None."""
    if spec.bits not in (4, 8):
        return f"the CUDA kernel takes 4- or 8-bit weights, not {spec.bits}-bit"
    if spec.group_size is not None and spec.group_size % 32:
        return f"the CUDA kernel takes group sizes that are multiples of 32, not {spec.group_size}"
    return None


def _magic_base(dtype: torch.dtype, bits: int) -> float:
    """The offset the kernel's integer -> float conversion adds (see Magic in the .cu)."""
    if dtype == torch.float16:
        return 1024.0
    return 128.0 if bits == 4 else 0.0


def _words(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., 32 / bits] unsigned fields -> int32 [...] words, field i at bits [i*bits, (i+1)*bits)."""
    shifts = torch.arange(fields.shape[-1], device=fields.device, dtype=torch.int64) * bits
    words = (fields.to(torch.int64) << shifts).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def repack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed values int8 [N, K] -> the kernel's words, int32 [RB, KS, PARTS, 32 lanes, 4]
    (N padded to 32 * RB, K to 128 * NS = 32 * KS; padding is 0 and never reaches an output)."""
    n, k = q.shape
    rb, ks = -(-n // 32), -(-k // (32 * U)) * U
    u = torch.zeros(rb * 32, ks * 32, dtype=torch.uint8, device=q.device)
    u[:n, :k] = (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    # row = 32 rb + 16 rt + 8 hr + g, physical column = 32 ks + 8 t + 4 h + 2 hc + c
    u = u.view(rb, 2, 2, 8, ks, 4, 2, 2, 2)  # rb rt hr g | ks t h hc c
    if bits == 4:  # word rt*2 + h, nibble c*4 + hc*2 + hr
        fields = u.permute(0, 4, 3, 5, 1, 6, 8, 7, 2).reshape(rb, ks, 1, 32, 4, 8)
    else:  # part rt, word h*2 + hc, byte c*2 + hr
        fields = u.permute(0, 4, 1, 3, 5, 6, 7, 8, 2).reshape(rb, ks, 2, 32, 4, 4)
    return _words(fields, bits).contiguous()


def _unit_groups(spec: IntSpec, g_idx: torch.Tensor | None, k: int, device) -> torch.Tensor:
    """The group of each 32-column unit (act-order: of the sorted columns), padding units
    included (they repeat the last group). Raises ValueError when a unit would straddle
    two groups."""
    ks = -(-k // 32)
    if g_idx is None:
        steps = ks if spec.group_size is None else spec.group_size // 32
        groups = torch.arange(ks, device=device) // steps
    else:
        cols = torch.sort(g_idx.to(torch.int64)).values
        padded = torch.cat([cols, cols[-1:].expand(ks * 32 - k)]).view(ks, 32)
        if not bool((padded == padded[:, :1]).all()):
            raise ValueError("the CUDA kernel needs each run of 32 act-order-sorted columns to share one group; "
                             "this g_idx mixes groups within 32 columns")
        groups = padded[:, 0]
    ksp = -(-ks // U) * U
    return torch.cat([groups, groups[-1:].expand(ksp - ks)]).contiguous()


def _geometry(unit_group: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """How the kernels find a step's scales: (the group of each table row and set
    [TR, SPS], SPS, sshift), step s reading row s >> sshift. SPS = 1 when the 4 units
    of every step share a group, else 4; sshift is the largest shift that keeps
    every step on its own group's row (31 for one group in all)."""
    sets = unit_group.view(-1, U)
    sps = 1 if bool((sets == sets[:, :1]).all()) else U
    sets = sets[:, :sps]
    if bool((sets == sets[:1]).all()):
        return sets[:1], sps, 31
    steps = torch.arange(sets.shape[0], device=sets.device)
    shift = 0
    while (1 << (shift + 1)) < sets.shape[0] and bool((sets == sets[(steps >> (shift + 1)) << (shift + 1)]).all()):
        shift += 1
    return sets[:: 1 << shift].contiguous(), sps, shift


def _lane_table(values: torch.Tensor, rows: torch.Tensor, rb: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-group values [N, G] (float) -> dtype [RB, TR, SPS, 8, 4], entry [.., g, i] the value
    for row 32 rb + g + 8 i in the group rows[TR, SPS] names."""
    n = values.shape[0]
    table = torch.zeros(rb * 32, *rows.shape, dtype=dtype, device=values.device)
    table[:n] = values[:, rows].to(dtype)
    return table.view(rb, 4, 8, *rows.shape).permute(0, 3, 4, 2, 1).contiguous()


def _prepare(packed, scale, zero_point_packed, g_idx, spec: IntSpec, shape: tuple[int, int]) -> PreparedIntWeight:
    reason = unsupported(spec)
    if reason:
        raise ValueError(reason)
    if not packed.is_cuda:
        raise ValueError(f"the CUDA kernel needs the weight on a CUDA device, got {packed.device}")
    n, k = shape
    q = unpack_int32(packed, spec.bits, (n, k), dim=1)
    perm = None
    if g_idx is not None:
        perm = torch.argsort(g_idx.to(torch.int64), stable=True)
        q = q[:, perm]
    rows, sps, sshift = _geometry(_unit_groups(spec, g_idx, k, packed.device))
    tensors = {"words": repack(q, spec.bits), "scale": scale, "table_rows": rows,
               "table_shape": torch.tensor([sps, sshift])}
    if perm is not None:
        tensors["perm"] = perm
    if zero_point_packed is not None:
        tensors["zero_point"] = unpack_int32(zero_point_packed, spec.bits, tuple(scale.shape), dim=0)
    return PreparedIntWeight("cuda", spec, (n, k), tensors)


def _tables(w: PreparedIntWeight, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scale (and zero) tables in `dtype`, built on first use per dtype."""
    t = w.tensors
    key = _DTYPES[dtype]
    if f"scales_{key}" not in t:
        rb = t["words"].shape[0]
        rows = t["table_rows"]
        t[f"scales_{key}"] = _lane_table(t["scale"].float(), rows, rb, dtype)
        if "zero_point" in t:
            zeros = t["zero_point"].float() + (1 << (w.spec.bits - 1)) + _magic_base(dtype, w.spec.bits)
            t[f"zeros_{key}"] = _lane_table(zeros, rows, rb, dtype)
    return t[f"scales_{key}"], t.get(f"zeros_{key}")


def _table_args(w: PreparedIntWeight) -> tuple[np.int32, np.int32, np.int32]:
    """(TR, sshift, SPS) as the kernels take them."""
    sps, sshift = (int(v) for v in w.tensors["table_shape"])
    return np.int32(w.tensors["table_rows"].shape[0]), np.int32(sshift), np.int32(sps)


def _null(t: torch.Tensor | None):
    return np.uint64(0) if t is None else t


def _suffix(w: PreparedIntWeight, dtype: torch.dtype) -> str:
    return f"{_DTYPES[dtype]}_b{w.spec.bits}_{'asym' if 'zero_point' in w.tensors else 'sym'}"


def dequantize_dense(w: PreparedIntWeight, dtype: torch.dtype) -> torch.Tensor:
    """The whole weight as dtype [Np, Kp] (padded; rows past N and columns past K hold finite
    values that meet only zero-padded x), by csrc/int_weight_mma.cu's dequant kernel."""
    words = w.tensors["words"]
    rb, ks = words.shape[:2]
    scales, zeros = _tables(w, dtype)
    tr, sshift, sps = _table_args(w)
    out = torch.empty(rb * 32, ks * 32, dtype=dtype, device=words.device)
    cuda.launch(f"int_weight_dequant_{_suffix(w, dtype)}", "int_weight_mma", (-(-rb * ks // WARPS),),
                (32 * WARPS,), (words, scales, _null(zeros), out, np.int32(rb), np.int32(ks // U), tr, sshift, sps))
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
        name, "int_weight_mma", threads, smem)


def _gemv_name(w: PreparedIntWeight, dtype: torch.dtype, m: int, variant: tuple[int, ...], norm: bool = False) -> str:
    epi, depth, warps, xp, mb, rbk = variant
    sps = int(w.tensors["table_shape"][0])
    return (f"int_weight_gemv_{_suffix(w, dtype)}_nt{1 if m <= 8 else 2}_s{sps}_e{epi}_d{depth}_w{warps}_x{xp}"
            f"_b{mb}_r{rbk}_n{int(norm)}")


def _gemv_per(w: PreparedIntWeight, name: str, warps: int, device: torch.device) -> int:
    """Steps per warp of the decode kernel: the RB * NS steps spread over every warp the GPU holds at once."""
    rb, ks = w.tensors["words"].shape[:2]
    return max(GEMV_MIN_STEPS_PER_WARP, -(-rb * (ks // U) // (warps * _launch_blocks(name, 32 * warps, 0, device))))


def _engine_kernels(w: PreparedIntWeight) -> bool:
    """Whether the row-block and fused-RMSNorm decode kernels are instantiated for this weight:
    4-bit, one scale set per step (groups of 128 columns or more; GEMV_ENGINE in the .cu)."""
    return w.spec.bits == 4 and int(w.tensors["table_shape"][0]) == 1


def _gemv_variant(w: PreparedIntWeight, m: int) -> tuple[int, ...]:
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


def _path(m: int, w: PreparedIntWeight, dtype: torch.dtype, device: torch.device) -> str:
    if m >= DENSE_MIN_M:
        return "dense"
    if m > GEMV_MAX_M:
        return "mma"
    if m <= 4:
        return "gemv"
    name = _gemv_name(w, dtype, m, GEMV)
    return "gemv" if _gemv_per(w, name, GEMV[2], device) >= GEMV_MIN_STEPS_5_16 else "mma"


NORM_MAX_K = 12288  # the fused RMSNorm keeps the normalized token in shared memory: 24 KB, beside the 16 KB of
#                    the row-block variant's sums (48 KB in all without an opt-in)


def rms_norm_matmul(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    w: PreparedIntWeight, bias: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One token's residual add, RMSNorm and matmul in one decode-kernel launch:
    h = x + residual (x when residual is None), y = RMSNorm(h) * norm_weight @ dequant(w)^T (+ bias);
    returns (y, h), rounded as quantkit.kernels.engine_ops.add_rms_norm and then the matmul would.
    None where the fused kernel does not apply (more than one token, act-order, K past NORM_MAX_K,
    unaligned rows, formats without the fused kernel: see _engine_kernels): the caller runs the two
    steps."""
    if not _engine_kernels(w):
        return None
    k = w.shape[1]
    kp = w.tensors["words"].shape[1] * 32
    rows = [x] + ([residual] if residual is not None else [])
    if (x.dtype not in _DTYPES or x.shape != (1, k) or "perm" in w.tensors or kp > NORM_MAX_K or k % 8
            or any(t.dtype != x.dtype or t.shape != x.shape or t.stride(-1) != 1 or t.data_ptr() % 16 for t in rows)):
        return None
    h = torch.empty_like(x) if residual is not None else x
    y = _matmul(x, w, bias, path="gemv", norm=(residual, norm_weight.to(x.dtype).contiguous(), float(eps), h))
    return y, h


def _matmul(x: torch.Tensor, w: PreparedIntWeight, bias: torch.Tensor | None, path: str | None = None,
            variant: tuple[int, ...] | None = None, norm: tuple | None = None) -> torch.Tensor:
    """path: "gemv" (M <= 16), "mma" or "dense"; None picks by M. variant: the gemv kernel's
    (EPI, D, W, XP, MB, RBK), for benchmarks of the instantiated alternatives (None: the
    production choice, _gemv_variant)."""
    if x.dtype not in _DTYPES:
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
    path = path or _path(m, w, x.dtype, x.device)
    if path == "dense":
        weight = dequantize_dense(w, x.dtype)[:n]
        x2 = _gather_pad(x2, perm, ks * 32)
        return torch.nn.functional.linear(x2, weight, b).reshape(*lead, n)

    scales, zeros = _tables(w, x.dtype)
    tr, sshift, sps = _table_args(w)
    x2 = _rows_in_place(x2, perm)
    suffix = _suffix(w, x.dtype)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    counters = cuda.counters("int_weight", x.device, rb)
    common = (x2, words, scales, _null(zeros), _null(b), y)
    if path == "gemv":
        if m > 16:
            raise ValueError(f"the gemv kernel takes at most 16 tokens, got {m}")
        variant = variant or _gemv_variant(w, m)
        warps = variant[2]
        name = _gemv_name(w, x.dtype, m, variant, norm is not None)
        ns = ks // U
        total = rb * ns
        if variant[5]:  # one block per row block, each warp `per` of its steps
            per, cmax, ws, blocks = -(-ns // warps), 0, None, rb
        else:
            per = _gemv_per(w, name, warps, x.device)
            cmax = (ns - 1) // per + 2
            ws = torch.empty(rb * cmax * m * 32, dtype=torch.float32, device=x.device) if per % ns else None
            blocks = -(-total // (per * warps))
        # launched early (PDL) the kernel reads its weights and scales before waiting for the previous
        # kernel: only once they were settled by an ordinary launch (the first, per dtype's tables)
        settled = f"gemv_{_DTYPES[x.dtype]}"
        cuda.launch(name, "int_weight_mma", (blocks,), (32 * warps,),
                    (*common, _null(ws), counters, np.int32(m), np.int32(n), np.int32(x2.shape[1]), np.int32(ns),
                     np.int32(rb), np.int32(x2.stride(0)), np.int32(n), tr, sshift, np.int32(per), np.int32(cmax),
                     *_norm_args(norm)),
                    shared_mem=0 if norm is None else ks * 32 * x.element_size(), dependent=settled in w.state)
        w.state[settled] = True
        return y.reshape(*lead, n)

    nt = 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8
    name = f"int_weight_mma_{suffix}_nt{nt}"
    smem = _ring_bytes(w.spec.bits, zeros is not None)
    zchunks = -(-m // (8 * nt))
    tiles = rb * zchunks
    per_split = -(-ks // _splits(tiles, ks, _launch_blocks(name, 32 * WARPS, smem, x.device),
                                 WARPS * MIN_STEPS_PER_WARP))
    splits = -(-ks // per_split)
    ws = torch.empty(splits, m, rb * 32, dtype=torch.float32, device=x.device) if splits > 1 else None
    cuda.launch(name, "int_weight_mma", (rb, splits, zchunks), (32 * WARPS,),
                (*common, _null(ws), cuda.counters("int_weight", x.device, tiles), np.int32(m), np.int32(n), np.int32(x2.shape[1]),
                 np.int32(ks // U), np.int32(x2.stride(0)), np.int32(n), tr, sshift, sps, np.int32(per_split)),
                shared_mem=smem)
    return y.reshape(*lead, n)


def _norm_args(norm: tuple | None) -> tuple:
    """The decode kernel's fused-RMSNorm arguments (residual, weight, eps, h out), null when off."""
    if norm is None:
        return np.uint64(0), np.uint64(0), np.float32(0.0), np.uint64(0)
    residual, weight, eps, h = norm
    return (_null(residual), weight, np.float32(eps), h if residual is not None else np.uint64(0))


def _available(device: torch.device, spec: IntSpec, dtype: torch.dtype | None) -> bool:
    """A CUDA GPU with CuPy, a format the kernel takes, and half precision (it computes in
    fp16 / bf16: a float32 model keeps the reference twin)."""
    return (device.type == "cuda" and cuda.available() and unsupported(spec) is None
            and (dtype is None or dtype in _DTYPES))


register_backend("cuda", Backend(_prepare, _matmul, _available))
