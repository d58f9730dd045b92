"""The weight layout of the CUDA integer-weight kernels (quantkit.kernels.int_weight_layout), on the CPU:
decoded the way the kernels' mma fragments read it, it gives back every weight; and it is, byte for
byte, the layout the CUDA backend built before the layout left the launch module."""

from __future__ import annotations

import hashlib

import pytest
import torch

from quantkit.formats import IntSpec, dequantize, pack_int32, unpack_int32
from quantkit.kernels.int_weight_layout import (geometry, lane_table, layout, magic_base, repack, scale_tables,
                                               unit_groups)


def _decode(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned values [32 RB, 32 KS] from the kernel's words, through the A-fragment
    rules the .cu documents: register r of tile (rt, h) holds rows g + 8 (r & 1),
    fragment columns 2t + 8 (r >> 1) (lower half) and + 1 (upper half), which are
    physical columns 8t + 4h + 2 (r >> 1) (+ 1)."""
    rb, ks = words.shape[:2]
    u = torch.full((rb * 32, ks * 32), -1, dtype=torch.int64)
    w = words.to(torch.int64) & 0xFFFFFFFF
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for rt in range(2):
            for h in range(2):
                for r in range(4):
                    if bits == 4:
                        word = w[:, :, 0, lane, rt * 2 + h] >> (4 * r)
                        lo, hi = word & 0xF, (word >> 16) & 0xF
                    else:
                        word = w[:, :, rt, lane, h * 2 + (r >> 1)] >> (8 * (r & 1))
                        lo, hi = word & 0xFF, (word >> 16) & 0xFF
                    row = rt * 16 + g + 8 * (r & 1)
                    col = 8 * t + 4 * h + 2 * (r >> 1)
                    u.view(rb, 32, ks, 32)[:, row, :, col] = lo
                    u.view(rb, 32, ks, 32)[:, row, :, col + 1] = hi
    return u


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k", [(32, 64), (50, 100), (96, 32), (40, 300)])
def test_repacked_words_hold_each_value_where_the_kernel_reads_it(bits, n, k):
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), dtype=torch.int8)
    u = _decode(repack(q, bits), bits)
    assert (u >= 0).all(), "some position of the padded weight was never written"
    torch.testing.assert_close(u[:n, :k], q.to(torch.int64) + (1 << (bits - 1)), rtol=0, atol=0)
    assert (u[n:] == 0).all() and (u[:, k:] == 0).all()


@pytest.mark.parametrize("spec,k,act_order", [
    (IntSpec(4, True, 128), 1000, False), (IntSpec(4, True, 32), 96, False), (IntSpec(4, False, 64), 4160, False),
    (IntSpec(8, True, 256), 2048, False), (IntSpec(4, True, 384), 3072, False), (IntSpec(4, True, None), 576, False),
    (IntSpec(4, True, 96), 960, False), (IntSpec(4, True, 128), 1024, True), (IntSpec(8, False, 32), 512, True)])
def test_scale_tables_give_every_weight_its_own_group(spec, k, act_order):
    """Decode the words and the [RB, TR, SPS, 8, 4] tables the way the kernels index them
    (step s = unit // 4 reads table row s >> sshift, set unit % 4 when SPS = 4) and
    compare with the reference dequantization (q - z) * s of the same weight."""
    n, bits = 70, spec.bits
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), dtype=torch.int8)
    groups = -(-k // (spec.group_size or k))
    scale = torch.rand(n, groups) + 0.5
    zero = torch.randint(-2, 3, (n, groups))
    col_group = torch.arange(k) // (spec.group_size or k)
    g_idx = None
    if act_order:
        perm = torch.randperm(k)
        q, col_group = q[:, perm], col_group[perm]
        g_idx = col_group
    ref = (q.float() - zero.float().gather(1, col_group.expand(n, k))) * scale.gather(1, col_group.expand(n, k))
    order = torch.argsort(col_group, stable=True) if act_order else torch.arange(k)

    rows, sps, sshift = geometry(unit_groups(spec, g_idx, k, "cpu"))
    rb = -(-n // 32)
    s_tab = lane_table(scale, rows, rb, torch.float32)  # [RB, TR, SPS, 8, 4]
    z_tab = lane_table(zero.float(), rows, rb, torch.float32)
    u = _decode(repack(q[:, order], bits), bits)[:n, :]
    unit = torch.arange(u.shape[1]) // 32
    row_of = (unit // 4) >> sshift
    set_of = (unit % 4) if sps == 4 else torch.zeros_like(unit)
    r = torch.arange(n)
    idx = ((r // 32)[:, None], row_of[None], set_of[None], (r % 8)[:, None], ((r % 32) // 8)[:, None])
    s_w, z_w = s_tab[idx], z_tab[idx]
    got = (u.float() - (1 << (bits - 1)) - z_w) * s_w
    torch.testing.assert_close(got[:, :k], ref[:, order], rtol=0, atol=0)
    assert sps == (1 if spec.group_size is None or spec.group_size % 128 == 0 else 4)


def _decode_weight(tensors: dict[str, torch.Tensor], bits: int, n: int, k: int) -> torch.Tensor:
    """(q - z) * s of every weight in sorted column order, read from layout()'s words and
    scale_tables()'s float32 tables as the kernels index them."""
    sps, sshift = (int(v) for v in tensors["table_shape"])
    s_tab, z_tab = scale_tables(tensors, bits, torch.float32)
    u = _decode(tensors["words"], bits)[:n, :k]
    unit = torch.arange(k) // 32
    row_of, set_of = (unit // 4) >> sshift, (unit % 4) if sps == 4 else torch.zeros_like(unit)
    r = torch.arange(n)
    idx = ((r // 32)[:, None], row_of[None], set_of[None], (r % 8)[:, None], ((r % 32) // 8)[:, None])
    # a zero is stored as magic_base + z + 2^(bits-1), the stored value's offset
    zeros = z_tab[idx] - (1 << (bits - 1)) - magic_base(torch.float32, bits) if z_tab is not None else 0.0
    return (u.float() - (1 << (bits - 1)) - zeros) * s_tab[idx]


@pytest.mark.parametrize("spec,n,k,act_order", [
    (IntSpec(4, True, 128), 70, 1000, False), (IntSpec(4, False, 64), 33, 4160, False),
    (IntSpec(8, False, 32), 70, 512, True), (IntSpec(4, True, None), 96, 576, False)], ids=str)
def test_layout_round_trips_to_the_reference_dequantization(spec, n, k, act_order):
    g = torch.Generator().manual_seed(n + k)
    bits = spec.bits
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), dtype=torch.int8, generator=g)
    groups = spec.num_groups(k)
    scale = torch.rand(n, groups, generator=g) + 0.5
    zero = torch.randint(-2, 3, (n, groups), dtype=torch.int8, generator=g)
    g_idx = None
    if act_order:
        g_idx = (torch.randperm(k, generator=g) // spec.group_size).to(torch.int32)
    zp = None if spec.symmetric else pack_int32(zero, bits, dim=0)
    tensors = layout(pack_int32(q, bits, 1), scale, zp, g_idx, spec, (n, k))
    ref = dequantize(q, scale, zero if zp is not None else torch.zeros_like(zero), spec, g_idx, torch.float32)
    order = tensors["perm"] if act_order else torch.arange(k)
    assert ("perm" in tensors) == act_order and ("zero_point" in tensors) == (not spec.symmetric)
    torch.testing.assert_close(_decode_weight(tensors, bits, n, k), ref[:, order], rtol=0, atol=0)
    if zp is not None:
        assert torch.equal(tensors["zero_point"], unpack_int32(zp, bits, (n, groups), dim=0))


# RNG-free weights, and the digest of the layout the CUDA backend built for them before the layout
# code moved here (int_weight_cuda._prepare and _tables at commit 27db7b8, float16 and bfloat16 tables)
GOLDEN = {  # (bits, symmetric, group_size, n, k, act_order) -> digest
    (4, True, 128, 70, 1000, False): "98c44112e0753579b6f5",
    (4, False, 64, 33, 4160, False): "445cf1cff41df1f4d152",
    (8, True, 256, 40, 2048, False): "f2591d3d8de38852e084",
    (4, True, None, 96, 576, False): "eeaa51b37fa1a53a8263",
    (4, True, 32, 50, 96, False): "2465e349a0b3ddb96560",
    (4, True, 128, 64, 1024, True): "a433584014bbbc795ec5",
    (8, False, 32, 70, 512, True): "4ba47c9c96e4b551b968",
    (4, True, 96, 32, 960, False): "cd7e6b81404d35bb9f13",
}


def _golden_case(bits, symmetric, group_size, n, k, act_order):
    spec = IntSpec(bits, symmetric, group_size)
    rows, cols = torch.arange(n)[:, None], torch.arange(k)[None, :]
    q = ((rows * 7 + cols * 13 + rows * cols) % (1 << bits) - (1 << (bits - 1))).to(torch.int8)
    gr, gc = torch.arange(n)[:, None], torch.arange(spec.num_groups(k))[None, :]
    scale = (0.001 + ((gr * 31 + gc * 17) % 97) * 1e-4).to(torch.float16)
    zp = None if symmetric else pack_int32(((gr * 5 + gc * 3) % 7 - 3).to(torch.int8), bits, dim=0)
    g_idx = ((torch.arange(k) * 7) % k // (group_size or k)).to(torch.int32) if act_order else None
    return spec, pack_int32(q, bits, 1), scale, zp, g_idx


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


@pytest.mark.parametrize("case", list(GOLDEN), ids=str)
def test_layout_is_byte_for_byte_the_one_the_kernels_were_given(case):
    spec, packed, scale, zp, g_idx = _golden_case(*case)
    tensors = layout(packed, scale, zp, g_idx, spec, case[3:5])
    for dtype, key in ((torch.float16, "f16"), (torch.bfloat16, "bf16")):
        tensors[f"scales_{key}"], zeros = scale_tables(tensors, spec.bits, dtype)
        if zeros is not None:
            tensors[f"zeros_{key}"] = zeros
    assert _digest(tensors) == GOLDEN[case]


@pytest.mark.parametrize("bits,n,k", [(4, 32, 32), (4, 64, 128), (4, 50, 300), (8, 32, 128), (8, 70, 300)])
def test_wgmma_kernels_k_order_matches_their_permuted_x(bits, n, k):
    """csrc/int_weight_wgmma.cu feeds each warp's dequantized words straight to wgmma as the A fragments
    of k16 step h (register r: row 16 rt + g + 8 (r & 1), fragment columns 16 h + 8 (r >> 1) + 2 t + c)
    and reads x through fragment_order: the two K orders agree, so the product is q @ x^T.
    4 bits (Tile16): nibbles 4 r and 16 + 4 r of lane (g, t)'s word rt * 2 + h.
    8 bits (Tile16x8, the ws kernel): bytes r & 1 and 2 + (r & 1) of part rt's word h * 2 + (r >> 1)."""
    from quantkit.kernels.launch_int_weight_wgmma import fragment_order

    half = 1 << (bits - 1)
    q = torch.randint(-half, half, (n, k), dtype=torch.int8)
    words = repack(q, bits).to(torch.int64) & 0xFFFFFFFF
    rb, ks = words.shape[:2]
    mask = (1 << bits) - 1
    a = torch.zeros(rb * 32, ks * 32, dtype=torch.float64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for rt in range(2):
            for h in range(2):
                for r in range(4):
                    if bits == 4:
                        word = words[:, :, 0, lane, rt * 2 + h] >> (4 * r)
                    else:
                        word = words[:, :, rt, lane, h * 2 + (r >> 1)] >> (8 * (r & 1))
                    row = 16 * rt + g + 8 * (r & 1)
                    for c, value in enumerate((word & mask, (word >> 16) & mask)):
                        a.view(rb, 32, ks, 32)[:, row, :, 16 * h + 8 * (r >> 1) + 2 * t + c] = (value - half).double()
    x = torch.randn(5, ks * 32, dtype=torch.float64)
    x[:, k:] = 0
    torch.testing.assert_close((a @ fragment_order(x).T)[:n], q.double() @ x[:, :k].T)


@pytest.mark.parametrize("m,k,bn", [(5, 96, 32), (70, 256, 64), (33, 1000, 128)])
def test_ws_kernel_x_tiles_hold_x_where_the_wgmma_descriptors_read_it(m, k, bn):
    """The "ws" kernel's slot of k-tile kt for token tile i is x_tiles(...)[i, kt], read by wgmma through
    a 128-byte-swizzled descriptor: token n's 16-byte chunk c at chunk c ^ (n & 7) of its 128-byte row.
    Unswizzled, each row is the k-tile's 64 columns of fragment_order(x), zeros past M and K."""
    from quantkit.kernels.launch_int_weight_wgmma import fragment_order, x_tiles_reference

    ks = -(-k // 64) * 2
    x = torch.randn(m, k, dtype=torch.float64)
    xt = x_tiles_reference(x, k, ks, bn)
    assert xt.shape == (-(-m // bn), ks // 2, bn, 64)
    xf = fragment_order(torch.nn.functional.pad(x, (0, ks * 32 - k)))
    for token in range(xt.shape[0] * bn):
        rows = xt[token // bn, :, token % bn].reshape(ks // 2, 8, 8)  # [k-tile, physical chunk, 8]
        logical = rows[:, [c ^ (token % bn & 7) for c in range(8)]].reshape(-1)
        expected = xf[token] if token < m else torch.zeros(ks * 32, dtype=x.dtype)
        assert torch.equal(logical, expected)
