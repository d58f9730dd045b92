"""Dense int32 packing of b-bit integers: compressed-tensors' "pack-quantized" layout.

Each signed value v in [-2**(b-1), 2**(b-1) - 1] is first offset to the unsigned
u = v + 2**(b-1) in [0, 2**b - 1]. A row of n values is then one little-endian
bit stream: element i occupies stream bits [i*b, (i+1)*b), least significant bit
first, and word k of the row holds stream bits [32k, 32k + 32) (bit 0 of the word
= stream bit 32k). There is no padding between elements, so for b = 3, 5, 6, 7 an
element can straddle two words; the row takes ceil(n*b / 32) int32 words and the
unused high bits of its last word are 0. Words are stored as torch.int32, so a
word whose bit 31 is set reads as a negative number.

Worked example, b = 3, row v = [-4, 3, 0, -1, 1, 2, 3, 2, -3, -2, 1] (n = 11):

    u = v + 4 = [0, 7, 4, 3, 5, 6, 7, 6, 1, 2, 5]
    element i at bits 3i..3i+2:  u0 -> 0..2, u1 -> 3..5, ..., u9 -> 27..29,
    u10 = 0b101 -> bits 30..32: its low two bits (0b01) are word 0 bits 30..31,
                                its high bit (0b1) is word 1 bit 0.
    word 0 = sum(u_i << 3i for i < 10) + (0b01 << 30) = 0x51DF5738 (bit 31 = 0)
    word 1 = 0b1 = 1
    packed row = [0x51DF5738, 1]  (ceil(11*3/32) = 2 words)

For b in {1, 2, 4, 8} (b divides 32) word k simply holds elements
k*(32/b) .. (k+1)*(32/b) - 1, element j of the word at bits [j*b, (j+1)*b).

`dim=1` packs along each row ([out, in] -> [out, ceil(in*b/32)], used for
weights); `dim=0` packs along each column ([rows, cols] -> [ceil(rows*b/32), cols],
used for zero points [out, n_groups]).
"""

from __future__ import annotations

import math
import sys

import torch

_WORD = 32


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")


def _check_dim(dim: int) -> None:
    if dim not in (0, 1):
        raise ValueError(f"dim must be 0 or 1, got {dim!r}")


def packed_shape(shape: tuple[int, int] | torch.Size, bits: int, dim: int = 1) -> tuple[int, int]:
    """Shape of the int32 tensor that `pack_int32` makes from an int8 tensor of `shape`."""
    _check_bits(bits)
    _check_dim(dim)
    if len(shape) != 2:
        raise ValueError(f"shape must be 2-D, got {tuple(shape)}")
    rows, cols = int(shape[0]), int(shape[1])
    if dim == 1:
        return rows, math.ceil(cols * bits / _WORD)
    return math.ceil(rows * bits / _WORD), cols


def _bytes_to_words(stream: torch.Tensor) -> torch.Tensor:
    """Little-endian byte stream uint8 [R, 4W] -> int32 [R, W] (word k = bytes 4k..4k+3)."""
    stream = stream.contiguous()
    if sys.byteorder == "big":
        stream = stream.view(stream.shape[0], -1, 4).flip(2).reshape(stream.shape[0], -1)
    return stream.view(torch.int32)


def _words_to_bytes(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, W] -> its little-endian byte stream uint8 [R, 4W]."""
    stream = words.contiguous().view(torch.uint8)
    if sys.byteorder == "big":
        stream = stream.view(stream.shape[0], -1, 4).flip(2).reshape(stream.shape[0], -1)
    return stream


# The row's bit stream is built byte by byte: with b | 8 a byte holds 8/b whole
# elements; otherwise 8 elements make exactly b bytes, assembled in an int64.


def _pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed values int8 [R, n] -> words int32 [R, ceil(n*bits/32)]."""
    rows, n = q.shape
    mask = (1 << bits) - 1
    n_pad = math.ceil(n / _WORD) * _WORD  # 32 elements fill exactly `bits` words
    u = torch.zeros(rows, n_pad, dtype=torch.uint8, device=q.device)  # padding bits stay 0
    # v + 2**(b-1), computed mod 256 on the raw byte and cut to b bits
    u[:, :n] = (q.view(torch.uint8) + (1 << (bits - 1))) & mask
    if 8 % bits == 0:
        per = 8 // bits
        lanes = u.view(rows, -1, per)  # [R, n_pad/per, per]
        stream = lanes[:, :, 0].clone()
        for j in range(1, per):
            stream |= lanes[:, :, j] << (j * bits)
    else:
        lanes = u.view(rows, -1, 8)  # [R, n_pad/8, 8] -> 8*b bits per lane group
        acc = lanes[:, :, 0].to(torch.int64)
        for j in range(1, 8):
            acc |= lanes[:, :, j].to(torch.int64) << (j * bits)
        stream = torch.stack([(acc >> (8 * m)) & 0xFF for m in range(bits)], dim=2).to(torch.uint8)
    words = _bytes_to_words(stream.view(rows, -1))  # [R, n_pad*bits/32]
    n_words = math.ceil(n * bits / _WORD)
    return words if n_words == words.shape[1] else words[:, :n_words].contiguous()


def _unpack_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """words int32 [R, ceil(n*bits/32)] -> signed values int8 [R, n]."""
    rows = words.shape[0]
    mask = (1 << bits) - 1
    n_pad = math.ceil(n / _WORD) * _WORD
    stream = torch.zeros(rows, n_pad * bits // 8, dtype=torch.uint8, device=words.device)
    packed_bytes = _words_to_bytes(words)
    stream[:, : packed_bytes.shape[1]] = packed_bytes
    if 8 % bits == 0:
        per = 8 // bits
        u = torch.stack([(stream >> (j * bits)) & mask for j in range(per)], dim=2)  # [R, bytes, per]
    else:
        groups = stream.view(rows, -1, bits)  # [R, n_pad/8, b]: b bytes = 8 elements
        acc = groups[:, :, 0].to(torch.int64)
        for m in range(1, bits):
            acc |= groups[:, :, m].to(torch.int64) << (8 * m)
        u = torch.stack([(acc >> (j * bits)) & mask for j in range(8)], dim=2).to(torch.uint8)
    u = u.view(rows, n_pad)[:, :n]
    # u - 2**(b-1) mod 256, read back as a signed byte
    return (u - (1 << (bits - 1))).view(torch.int8)


def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed b-bit values (int8 [rows, cols]) densely into int32 words.

    dim=1 -> [rows, ceil(cols*bits/32)]; dim=0 -> [ceil(rows*bits/32), cols].
    Layout: see the module docstring. Raises ValueError for a non-int8 or non-2-D
    input, bits outside 1..8, or values outside [-2**(bits-1), 2**(bits-1) - 1].
    """
    _check_bits(bits)
    _check_dim(dim)
    if q.dtype != torch.int8:
        raise ValueError(f"pack_int32 needs an int8 tensor, got {q.dtype}")
    if q.ndim != 2:
        raise ValueError(f"pack_int32 needs a 2-D tensor, got shape {tuple(q.shape)}")
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if q.numel() == 0:
        return torch.zeros(packed_shape(q.shape, bits, dim), dtype=torch.int32, device=q.device)
    lo, hi = (int(x) for x in torch.aminmax(q))
    if lo < qmin or hi > qmax:
        raise ValueError(f"{bits}-bit values must lie in [{qmin}, {qmax}], got min {lo} and max {hi}")
    if dim == 0:
        return _pack_rows(q.t().contiguous(), bits).t().contiguous()
    return _pack_rows(q.contiguous(), bits)


def unpack_int32(
    packed: torch.Tensor, bits: int, shape: tuple[int, int] | torch.Size, dim: int = 1
) -> torch.Tensor:
    """Inverse of `pack_int32`: int32 words -> int8 [shape] of signed b-bit values.

    `shape` is the unpacked shape; packed.shape must equal packed_shape(shape, bits, dim).
    """
    expected = packed_shape(shape, bits, dim)  # validates bits, dim, shape
    if packed.dtype != torch.int32:
        raise ValueError(f"unpack_int32 needs an int32 tensor, got {packed.dtype}")
    if tuple(packed.shape) != expected:
        raise ValueError(
            f"packed shape {tuple(packed.shape)} does not match {expected} for "
            f"{bits}-bit values of shape {tuple(shape)} packed along dim {dim}"
        )
    rows, cols = int(shape[0]), int(shape[1])
    if rows * cols == 0:
        return torch.zeros(rows, cols, dtype=torch.int8, device=packed.device)
    if dim == 0:
        return _unpack_rows(packed.t().contiguous(), bits, rows).t().contiguous()
    return _unpack_rows(packed.contiguous(), bits, cols)
