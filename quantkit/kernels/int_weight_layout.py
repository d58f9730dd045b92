"""The weight layout csrc/int_weight_mma.cu reads, computed from the on-disk tensors at load time.

Pure torch on any device (the CUDA backend builds it on the GPU; the tests build it on the CPU
and decode it the way the kernels' mma fragments read it). The layout itself is described at
the top of csrc/int_weight_mma.cu; in short, for a weight of N rows and K columns:

    words       int32 [RB, KS, PARTS, 32 lanes, 4]   the values u = q + 2^(bits-1), N padded to
                32 * RB rows and K to 128 * NS = 32 * KS columns (zeros), PARTS = bits / 4
    scale / zero tables  T [RB, TR, SPS, 8, 4]   step s (4 units of 32 columns) reads table row
                s >> sshift, set j of the step (SPS = 1: one set per step; SPS = 4: one per unit),
                entry [g, i] for weight row 32 rb + g + 8 i; a zero is stored as BASE + z + 2^(bits-1)
    act-order   columns sorted by group (perm); x's columns are gathered in the same order per call
"""

from __future__ import annotations

import torch

from quantkit.formats import IntSpec, unpack_int32

U = 4  # column units of 32 per step, as in the .cu


def magic_base(dtype: torch.dtype, bits: int) -> float:
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


def unit_groups(spec: IntSpec, g_idx: torch.Tensor | None, k: int, device) -> torch.Tensor:
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


def geometry(unit_group: torch.Tensor) -> tuple[torch.Tensor, int, int]:
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


def lane_table(values: torch.Tensor, rows: torch.Tensor, rb: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-group values [N, G] (float) -> dtype [RB, TR, SPS, 8, 4], entry [.., g, i] the value
    for row 32 rb + g + 8 i in the group rows[TR, SPS] names."""
    n = values.shape[0]
    table = torch.zeros(rb * 32, *rows.shape, dtype=dtype, device=values.device)
    table[:n] = values[:, rows].to(dtype)
    return table.view(rb, 4, 8, *rows.shape).permute(0, 3, 4, 2, 1).contiguous()


def layout(packed: torch.Tensor, scale: torch.Tensor, zero_point_packed: torch.Tensor | None,
           g_idx: torch.Tensor | None, spec: IntSpec, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """On-disk pack-quantized tensors (as quantkit.kernels.prepare_int_weight takes them) -> the
    kernels' tensors:

    words        int32 [RB, KS, PARTS, 32, 4]   repack() of q (act-order: columns sorted by group)
    scale        the on-disk scale [N, G], kept: the tables are built from it per compute dtype
    table_rows   int64 [TR, SPS]                 the group of each table row and set (geometry())
    table_shape  int64 [2] = (SPS, sshift)
    perm         int64 [K]                       act-order only: the sorted columns' order
    zero_point   int8 [N, G]                     asymmetric only
    """
    n, k = shape
    q = unpack_int32(packed, spec.bits, (n, k), dim=1)
    perm = None
    if g_idx is not None:
        perm = torch.argsort(g_idx.to(torch.int64), stable=True)
        q = q[:, perm]
    rows, sps, sshift = geometry(unit_groups(spec, g_idx, k, packed.device))
    tensors = {"words": repack(q, spec.bits), "scale": scale, "table_rows": rows,
               "table_shape": torch.tensor([sps, sshift])}
    if perm is not None:
        tensors["perm"] = perm
    if zero_point_packed is not None:
        tensors["zero_point"] = unpack_int32(zero_point_packed, spec.bits, tuple(scale.shape), dim=0)
    return tensors


def scale_tables(tensors: dict[str, torch.Tensor], bits: int, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """layout()'s scales (and zeros, asymmetric) as the kernels read them, in the compute dtype:
    T [RB, TR, SPS, 8, 4] each (lane_table), a zero stored as magic_base + z + 2^(bits-1)."""
    rb = tensors["words"].shape[0]
    rows = tensors["table_rows"]
    scales = lane_table(tensors["scale"].float(), rows, rb, dtype)
    zeros = None
    if "zero_point" in tensors:
        values = tensors["zero_point"].float() + (1 << (bits - 1)) + magic_base(dtype, bits)
        zeros = lane_table(values, rows, rb, dtype)
    return scales, zeros
