"""The "cuda" backend of the integer-weight kernel: csrc/int_weight_mma.cu.

y [M, N] = x [M, K] @ dequant(W)^T (+ bias) for 4- and 8-bit weights, symmetric
or asymmetric, any group size that is a multiple of 32 (or one group per row),
act-order (`g_idx`) included, x in float16 or bfloat16 on a CUDA GPU.

Two paths, by the number of tokens M:
  M <= DENSE_MIN_M - 1:  the tensor-core kernel, weights dequantized in registers
                         (decode and small batches: the bound is reading the
                         packed weights once).
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
MIN_STEPS_PER_WARP = 4  # K splits never leave a warp fewer 32-column units than this
WARPS = 8  # per block, as in the .cu
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
    (N padded to 32 * RB, K to 32 * KS; padding is 0 and never reaches an output)."""
    n, k = q.shape
    rb, ks = -(-n // 32), -(-k // 32)
    u = torch.zeros(rb * 32, ks * 32, dtype=torch.uint8, device=q.device)
    u[:n, :k] = (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    # row = 32 rb + 16 rt + 8 hr + g, column = 32 ks + 16 h + 8 hc + 2 t + c
    u = u.view(rb, 2, 2, 8, ks, 2, 2, 4, 2)  # rb rt hr g | ks h hc t c
    if bits == 4:  # word rt*2 + h, nibble c*4 + hc*2 + hr
        fields = u.permute(0, 4, 3, 7, 1, 5, 8, 6, 2).reshape(rb, ks, 1, 32, 4, 8)
    else:  # part rt, word h*2 + hc, byte c*2 + hr
        fields = u.permute(0, 4, 1, 3, 7, 5, 6, 8, 2).reshape(rb, ks, 2, 32, 4, 4)
    return _words(fields, bits).contiguous()


def _lane_table(values: torch.Tensor, step_group: torch.Tensor | None, rb: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-group values [N, G] (float) -> dtype [G', RB, 8, 4], entry [grp, rb, g, j] for
    row 32 rb + g + 8 j; with `step_group`, one entry per 32-column step instead."""
    n = values.shape[0]
    if step_group is not None:
        values = values[:, step_group]
    table = torch.zeros(values.shape[1], rb * 32, dtype=dtype, device=values.device)
    table[:, :n] = values.t().to(dtype)
    return table.view(-1, rb, 4, 8).transpose(2, 3).contiguous()


def _step_groups(spec: IntSpec, g_idx: torch.Tensor | None, k: int) -> tuple[torch.Tensor | None, int]:
    """How the kernel finds the group of its 32-column step ks: (None, steps) when it
    is ks // steps, else (the group of each step, 1). Raises ValueError when a step
    would straddle two groups."""
    ks = -(-k // 32)
    if g_idx is None:
        return None, (ks if spec.group_size is None else spec.group_size // 32)
    groups = torch.sort(g_idx.to(torch.int64)).values
    padded = torch.cat([groups, groups[-1:].expand(ks * 32 - k)]).view(ks, 32)
    if not bool((padded == padded[:, :1]).all()):
        raise ValueError("the CUDA kernel needs each run of 32 act-order-sorted columns to share one group; "
                         "this g_idx mixes groups within 32 columns")
    return padded[:, 0].contiguous(), 1


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
    step_group, group_steps = _step_groups(spec, g_idx, k)
    tensors = {"words": repack(q, spec.bits), "scale": scale, "group_steps": torch.tensor(group_steps)}
    if step_group is not None:
        tensors["step_group"] = step_group
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
        step_group = t.get("step_group")
        t[f"scales_{key}"] = _lane_table(t["scale"].float(), step_group, rb, dtype)
        if "zero_point" in t:
            zeros = t["zero_point"].float() + (1 << (w.spec.bits - 1)) + _magic_base(dtype, w.spec.bits)
            t[f"zeros_{key}"] = _lane_table(zeros, step_group, rb, dtype)
    return t[f"scales_{key}"], t.get(f"zeros_{key}")


_counters: dict[torch.device, torch.Tensor] = {}


def _tile_counters(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed per-tile counters of the split-K fix-up (each last block resets its own)."""
    c = _counters.get(device)
    if c is None or c.numel() < count:
        c = _counters[device] = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
    return c


def _null(t: torch.Tensor | None):
    return np.uint64(0) if t is None else t


def dequantize_dense(w: PreparedIntWeight, dtype: torch.dtype) -> torch.Tensor:
    """The whole weight as dtype [Np, Kp] (padded; rows past N and columns past K are junk-free zeros or
    finite values), by csrc/int_weight_mma.cu's dequant kernel."""
    words = w.tensors["words"]
    rb, ks = words.shape[:2]
    scales, zeros = _tables(w, dtype)
    out = torch.empty(rb * 32, ks * 32, dtype=dtype, device=words.device)
    name = f"int_weight_dequant_{_DTYPES[dtype]}_b{w.spec.bits}_{'asym' if zeros is not None else 'sym'}"
    cuda.launch(name, "int_weight_mma", (-(-rb * ks // WARPS),), (32 * WARPS,),
                (words, scales, _null(zeros), out, np.int32(rb), np.int32(ks), np.int32(int(w.tensors["group_steps"]))))
    return out


def _ring_bytes(bits: int, asym: bool) -> int:
    """Dynamic shared memory of the mma kernel (Ring in the .cu)."""
    lane_bytes = 16 * (bits // 4) + 8 + (8 if asym else 0)
    stages = min(8, SMEM_BUDGET // (WARPS * 32 * lane_bytes))
    return WARPS * stages * 32 * lane_bytes


def _splits(tiles: int, ks: int, slots: int) -> int:
    """How many blocks share one tile's K: the fewest that fill the GPU's resident block
    slots in whole waves to 90% (blocks are equal, so a part-filled last wave idles the
    rest), else the best filling, with at least MIN_STEPS_PER_WARP column units per warp."""
    most = max(1, ks // (MIN_STEPS_PER_WARP * WARPS))

    def filled(s: int) -> float:
        blocks = tiles * s
        return blocks / (math.ceil(blocks / slots) * slots)

    good = [s for s in range(1, most + 1) if filled(s) >= 0.9]
    return good[0] if good else max(range(1, most + 1), key=lambda s: (filled(s), -s))


def _gather_pad(x2: torch.Tensor, perm: torch.Tensor | None, kp: int) -> torch.Tensor:
    """x's columns in the weight's (act-order-sorted) order, zero-padded to the kernel's kp columns."""
    x2 = x2 if perm is None else x2[:, perm]
    return torch.nn.functional.pad(x2, (0, kp - x2.shape[1])) if kp != x2.shape[1] else x2


def _fragment_x(x2: torch.Tensor, perm: torch.Tensor | None, ks: int, nt: int, zchunks: int) -> torch.Tensor:
    """x [M, K] -> the mma B-fragment order the kernel reads for more than 8 tokens
    (permute_x in the .cu; gathers act-order columns on the way)."""
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    words = zchunks * ks * nt * 32 * 4
    xf = torch.empty(2 * words, dtype=x2.dtype, device=x2.device)
    cuda.launch(f"permute_x_{_DTYPES[x2.dtype]}", "int_weight_mma", (-(-words // 256),), (256,),
                (x2, _null(perm), xf, np.int32(x2.shape[0]), np.int32(x2.shape[1]), np.int64(x2.stride(0)),
                 np.int32(ks), np.int32(nt), np.uint64(words)))
    return xf


def _matmul(x: torch.Tensor, w: PreparedIntWeight, bias: torch.Tensor | None, path: str | None = None) -> torch.Tensor:
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
    if (path or ("dense" if m >= DENSE_MIN_M else "mma")) == "dense":
        weight = dequantize_dense(w, x.dtype)[:n]
        x2 = _gather_pad(x2, perm, ks * 32)
        return torch.nn.functional.linear(x2, weight, b).reshape(*lead, n)

    scales, zeros = _tables(w, x.dtype)
    nt = 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8
    zchunks = -(-m // (8 * nt))
    if nt == 1:  # rows read in place: gather, pad and align only when needed
        xf = None
        x2 = _gather_pad(x2, perm, ks * 32)
        if x2.stride(-1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:
            x2 = x2.clone(memory_format=torch.contiguous_format)
    else:
        xf = _fragment_x(x2, perm, ks, nt, zchunks)
    name = f"int_weight_mma_{_DTYPES[x.dtype]}_b{w.spec.bits}_{'asym' if zeros is not None else 'sym'}_nt{nt}"
    smem = _ring_bytes(w.spec.bits, zeros is not None)
    tiles = rb * zchunks
    slots = torch.cuda.get_device_properties(x.device).multi_processor_count * cuda.resident_blocks(
        name, "int_weight_mma", 32 * WARPS, smem)
    per_split = -(-ks // _splits(tiles, ks, slots))
    splits = -(-ks // per_split)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    ws = torch.empty(splits, m, rb * 32, dtype=torch.float32, device=x.device) if splits > 1 else None
    counters = _tile_counters(x.device, tiles)
    cuda.launch(name, "int_weight_mma", (rb, splits, zchunks), (32 * WARPS,),
                (x2, _null(xf), words, scales, _null(zeros), _null(b), y, _null(ws), counters, np.int32(m), np.int32(n),
                 np.int32(ks * 32), np.int32(x2.stride(0)), np.int32(n), np.int32(int(w.tensors["group_steps"])),
                 np.int32(per_split)),
                shared_mem=smem)
    return y.reshape(*lead, n)


def _available(device: torch.device, spec: IntSpec, dtype: torch.dtype | None) -> bool:
    """A CUDA GPU with CuPy, a format the kernel takes, and half precision (it computes in
    fp16 / bf16: a float32 model keeps the reference twin)."""
    return (device.type == "cuda" and cuda.available() and unsupported(spec) is None
            and (dtype is None or dtype in _DTYPES))


register_backend("cuda", Backend(_prepare, _matmul, _available))
