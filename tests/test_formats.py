"""Tests for quantkit.formats: spec validation, qparams conventions, RTN, int32 packing."""

import pytest
import torch

from quantkit.formats import (
    IntSpec,
    QuantizedWeight,
    compute_qparams,
    default_g_idx,
    dequantize,
    fake_quantize,
    group_minmax,
    pack_int32,
    packed_shape,
    quantize,
    quantize_rtn,
    unpack_int32,
)

ODD_SHAPES = [(7, 13), (1, 1), (3, 31), (33, 32), (5, 100), (16, 576), (9, 577)]


def _randint(shape: tuple[int, int], bits: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, generator=g, dtype=torch.int8)


def _randn(shape: tuple[int, int], seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


# ---------------------------------------------------------------- spec


def test_spec_defaults_and_range():
    spec = IntSpec()
    assert (spec.bits, spec.symmetric, spec.group_size) == (4, True, 128)
    assert (spec.qmin, spec.qmax) == (-8, 7)
    assert (IntSpec(bits=2).qmin, IntSpec(bits=2).qmax) == (-2, 1)
    assert (IntSpec(bits=8).qmin, IntSpec(bits=8).qmax) == (-128, 127)


def test_spec_num_groups():
    assert IntSpec(group_size=128).num_groups(576) == 5  # partial last group of 64
    assert IntSpec(group_size=128).num_groups(512) == 4
    assert IntSpec(group_size=128).num_groups(100) == 1
    assert IntSpec(group_size=None).num_groups(576) == 1


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"bits": 1}, "1"),
        ({"bits": 9}, "9"),
        ({"bits": 4.0}, "4.0"),
        ({"bits": True}, "True"),
        ({"group_size": 0}, "0"),
        ({"group_size": -128}, "-128"),
        ({"symmetric": "yes"}, "yes"),
    ],
)
def test_spec_rejects_bad_values(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        IntSpec(**kwargs)


def test_spec_is_frozen():
    with pytest.raises(AttributeError):
        IntSpec().bits = 8


# ---------------------------------------------------------------- qparams, hand-computed


def test_symmetric_qparams_hand_computed():
    # absmax 7.5 over 4 bits -> s = 7.5 / 7.5 = 1 exactly; +7.5 rounds to 8 and clamps to 7
    w = torch.tensor([[-7.5, 7.5, 2.4, -0.6, 0.5, 1.5]])
    spec = IntSpec(bits=4, symmetric=True, group_size=None)
    scale, zp = compute_qparams(*group_minmax(w, None), spec)
    assert torch.equal(scale, torch.tensor([[1.0]]))
    assert torch.equal(zp, torch.zeros(1, 1, dtype=torch.int8))
    q = quantize(w, scale, zp, spec)
    assert torch.equal(q, torch.tensor([[-8, 7, 2, -1, 0, 2]], dtype=torch.int8))  # half to even
    assert torch.equal(dequantize(q, scale, zp, spec), torch.tensor([[-8.0, 7.0, 2.0, -1.0, 0.0, 2.0]]))


def test_symmetric_scale_uses_larger_side():
    # min -3, max 1.5 -> s = 3 / 7.5 (3 bits: 3 / 3.5)
    w = torch.tensor([[-3.0, 1.5]])
    s4, _ = compute_qparams(*group_minmax(w, None), IntSpec(bits=4, group_size=None))
    s3, _ = compute_qparams(*group_minmax(w, None), IntSpec(bits=3, group_size=None))
    assert torch.equal(s4, torch.tensor([[3.0 / 7.5]]))
    assert torch.equal(s3, torch.tensor([[3.0 / 3.5]]))


def test_asymmetric_qparams_hand_computed():
    # m = -5, M = 10 -> s = 15 / 15 = 1, z = round(-8 - (-5) / 1) = -3
    w = torch.tensor([[-5.0, 10.0, 0.3, 2.5, 1.0]])
    spec = IntSpec(bits=4, symmetric=False, group_size=None)
    scale, zp = compute_qparams(*group_minmax(w, None), spec)
    assert torch.equal(scale, torch.tensor([[1.0]]))
    assert torch.equal(zp, torch.tensor([[-3]], dtype=torch.int8))
    q = quantize(w, scale, zp, spec)
    # round(w / s + z): 2.5 - 3 = -0.5 rounds (half to even) to 0, as compressed-tensors does
    assert torch.equal(q, torch.tensor([[-8, 7, -3, 0, -2]], dtype=torch.int8))
    assert torch.equal(dequantize(q, scale, zp, spec), torch.tensor([[-5.0, 10.0, 0.0, 3.0, 1.0]]))


def test_asymmetric_range_includes_zero():
    # all-positive group: m is widened to 0, so s = 3 / 3 (2 bits) and z = qmin = -2
    w = torch.tensor([[1.0, 3.0]])
    spec = IntSpec(bits=2, symmetric=False, group_size=None)
    scale, zp = compute_qparams(*group_minmax(w, None), spec)
    assert torch.equal(scale, torch.tensor([[1.0]]))
    assert torch.equal(zp, torch.tensor([[-2]], dtype=torch.int8))
    # all-negative group: M is widened to 0, z = round(-2 + 3) = 1 = qmax
    scale, zp = compute_qparams(*group_minmax(-w, None), spec)
    assert torch.equal(scale, torch.tensor([[1.0]]))
    assert torch.equal(zp, torch.tensor([[1]], dtype=torch.int8))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_zero_group(symmetric, dtype):
    w = _randn((3, 8), dtype=dtype)
    w[1, 4:] = 0  # row 1, group 1 is all zero
    spec = IntSpec(bits=4, symmetric=symmetric, group_size=4)
    qw = quantize_rtn(w, spec)
    assert qw.scale.dtype == dtype
    assert bool((qw.scale > 0).all())
    assert qw.scale[1, 1] == torch.finfo(dtype).eps
    assert torch.equal(qw.q[1, 4:], qw.zero_point[1, 1].expand(4))
    assert torch.equal(qw.dequantize()[1, 4:], torch.zeros(4, dtype=dtype))


def test_all_zero_weight():
    w = torch.zeros(2, 6)
    for symmetric in (True, False):
        assert torch.equal(fake_quantize(w, IntSpec(symmetric=symmetric, group_size=4)), w)


# ---------------------------------------------------------------- groups


def test_partial_last_group():
    w = _randn((4, 576))
    w[:, 512:] *= 10  # the last group has its own, wider range
    spec = IntSpec(bits=4, group_size=128)
    mins, maxs = group_minmax(w, 128)
    assert mins.shape == maxs.shape == (4, 5)
    for g in range(5):
        cols = slice(128 * g, min(128 * (g + 1), 576))
        assert torch.equal(mins[:, g], w[:, cols].amin(dim=1))
        assert torch.equal(maxs[:, g], w[:, cols].amax(dim=1))
    qw = quantize_rtn(w, spec)
    assert qw.q.shape == (4, 576) and qw.scale.shape == qw.zero_point.shape == (4, 5)
    # the last group's 64 columns are quantized with the last scale only
    expected_tail = torch.round(w[:, 512:] / qw.scale[:, 4:5]).clamp(-8, 7).to(torch.int8)
    assert torch.equal(qw.q[:, 512:], expected_tail)
    assert torch.equal(default_g_idx(576, 128)[-65:-63], torch.tensor([3, 4], dtype=torch.int32))


def test_per_channel():
    w = _randn((6, 50))
    qw = quantize_rtn(w, IntSpec(bits=4, group_size=None))
    assert qw.scale.shape == (6, 1)
    assert torch.equal(qw.scale[:, 0], w.abs().amax(dim=1) / 7.5)
    assert torch.equal(default_g_idx(50, None), torch.zeros(50, dtype=torch.int32))


def test_group_size_larger_than_row():
    w = _randn((3, 20))
    a = quantize_rtn(w, IntSpec(group_size=128))
    b = quantize_rtn(w, IntSpec(group_size=None))
    assert a.scale.shape == (3, 1) and torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)


def test_g_idx_permuted_groups():
    # act-order: columns visit groups in a shuffled order; explicit g_idx must be honoured
    w = _randn((5, 48))
    spec = IntSpec(bits=3, symmetric=False, group_size=16)
    qw = quantize_rtn(w, spec)
    explicit = default_g_idx(48, 16)
    assert torch.equal(quantize(w, qw.scale, qw.zero_point, spec, explicit), qw.q)
    assert torch.equal(dequantize(qw.q, qw.scale, qw.zero_point, spec, explicit), qw.dequantize())
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(1))
    g_idx = explicit[perm]
    q = quantize(w, qw.scale, qw.zero_point, spec, g_idx)
    s, z = qw.scale[:, g_idx.long()], qw.zero_point[:, g_idx.long()].float()
    assert torch.equal(q, torch.round(w / s + z).clamp(-4, 3).to(torch.int8))
    # a slice of columns with the matching slice of g_idx (how GPTQ quantizes column by column)
    assert torch.equal(quantize(w[:, 7:9], qw.scale, qw.zero_point, spec, g_idx[7:9]), q[:, 7:9])


# ---------------------------------------------------------------- RTN properties


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_dequantize_idempotent(bits, symmetric):
    w = _randn((16, 200), seed=bits)
    spec = IntSpec(bits=bits, symmetric=symmetric, group_size=64)
    qw = quantize_rtn(w, spec)
    assert qw.q.dtype == torch.int8 and qw.zero_point.dtype == torch.int8
    assert int(qw.q.min()) >= spec.qmin and int(qw.q.max()) <= spec.qmax
    if symmetric:
        assert not qw.zero_point.any()
    w2 = qw.dequantize()
    assert torch.equal(quantize(w2, qw.scale, qw.zero_point, spec), qw.q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights(dtype):
    w = _randn((8, 256), dtype=dtype)
    spec = IntSpec(bits=4, symmetric=False, group_size=128)
    qw = quantize_rtn(w, spec)
    assert qw.scale.dtype == dtype and qw.dequantize().dtype == dtype
    assert fake_quantize(w, spec).dtype == dtype
    # quantize divides by the stored scale: same q after a save/load of (q, scale, zp)
    assert torch.equal(quantize(w, qw.scale.clone(), qw.zero_point.clone(), spec), qw.q)
    assert torch.equal(quantize(qw.dequantize(), qw.scale, qw.zero_point, spec), qw.q)
    assert qw.dequantize(torch.float32).dtype == torch.float32


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_q_within_range(bits):
    w = _randn((32, 256)) * 5
    w[0, 0] = 100.0  # an outlier sits exactly at +absmax
    spec = IntSpec(bits=bits, symmetric=True, group_size=32)
    qw = quantize_rtn(w, spec)
    assert int(qw.q.min()) >= spec.qmin and int(qw.q.max()) <= spec.qmax
    assert int(qw.q[0, 0]) == spec.qmax


def test_error_decreases_with_bits():
    w = _randn((64, 512))
    err = {b: (fake_quantize(w, IntSpec(bits=b, group_size=128)) - w).abs().mean().item() for b in (2, 4, 8)}
    assert err[8] < err[4] < err[2]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_raises(bad):
    w = _randn((4, 16))
    w[2, 5] = bad
    with pytest.raises(ValueError, match="NaN|Inf"):
        quantize_rtn(w, IntSpec(group_size=8))
    with pytest.raises(ValueError, match="NaN|Inf"):
        quantize(w, torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.int8), IntSpec(group_size=8))


def test_qparam_shape_errors():
    w = _randn((4, 16))
    spec = IntSpec(group_size=8)
    with pytest.raises(ValueError, match="3"):
        quantize(w, torch.ones(4, 3), torch.zeros(4, 3, dtype=torch.int8), spec)
    with pytest.raises(ValueError, match="g_idx"):
        quantize(w, torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.int8), spec, torch.full((16,), 2))
    with pytest.raises(ValueError):
        q = torch.zeros(4, 16, dtype=torch.int8)
        QuantizedWeight(q, torch.ones(4, 3), torch.zeros(4, 3, dtype=torch.int8), spec)


# ---------------------------------------------------------------- compressed-tensors conventions


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_compressed_tensors_qdq(bits, symmetric):
    ct_helpers = pytest.importorskip("compressed_tensors.quantization.utils.helpers")
    ct_forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
    from compressed_tensors.quantization import QuantizationArgs

    w = _randn((16, 256), seed=bits)
    spec = IntSpec(bits=bits, symmetric=symmetric, group_size=64)
    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy="group", group_size=64)
    w_min, w_max = group_minmax(w, 64)
    scale, zp = compute_qparams(w_min, w_max, spec)
    ct_scale, ct_zp = ct_helpers.calculate_qparams(w_min, w_max, args)
    assert torch.equal(scale, ct_scale)
    assert torch.equal(zp, ct_zp.to(torch.int8))
    ct_q = ct_forward.quantize(w, scale, zp, args, dtype=torch.int8)
    assert torch.equal(quantize(w, scale, zp, spec), ct_q)
    ct_w = ct_forward.dequantize(ct_q, scale, zp, args)
    assert torch.equal(dequantize(ct_q, scale, zp, spec), ct_w)


# ---------------------------------------------------------------- packing


def test_pack_docstring_example():
    v = torch.tensor([[-4, 3, 0, -1, 1, 2, 3, 2, -3, -2, 1]], dtype=torch.int8)
    assert torch.equal(pack_int32(v, 3), torch.tensor([[0x51DF5738, 1]], dtype=torch.int32))


def test_pack_high_bit_gives_negative_word():
    v = torch.full((1, 8), 7, dtype=torch.int8)  # 4 bits: u = 15 everywhere -> all 32 bits set
    assert torch.equal(pack_int32(v, 4), torch.tensor([[-1]], dtype=torch.int32))
    v = torch.full((1, 8), -8, dtype=torch.int8)  # u = 0 everywhere
    assert torch.equal(pack_int32(v, 4), torch.zeros(1, 1, dtype=torch.int32))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_pack_roundtrip(bits, dim, shape):
    q = _randint(shape, bits, seed=bits)
    packed = pack_int32(q, bits, dim)
    assert packed.dtype == torch.int32 and packed.is_contiguous()
    assert tuple(packed.shape) == packed_shape(shape, bits, dim)
    out = unpack_int32(packed, bits, shape, dim)
    assert out.dtype == torch.int8 and out.is_contiguous()
    assert torch.equal(out, q)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_matches_compressed_tensors(bits, dim):
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    for i, shape in enumerate(ODD_SHAPES + [(64, 576)]):
        q = _randint(shape, bits, seed=100 + i)
        packed = pack_int32(q, bits, dim)
        assert torch.equal(packed, ct.pack_to_int32(q, bits, dim)), shape
        assert torch.equal(ct.unpack_from_int32(packed, bits, torch.Size(shape), dim), q), shape


def test_packed_shape():
    assert packed_shape((576, 1536), 4) == (576, 192)
    assert packed_shape((7, 13), 3) == (7, 2)  # 39 bits -> 2 words
    assert packed_shape((576, 5), 4, dim=0) == (72, 5)
    assert packed_shape(torch.Size([7, 13]), 5, dim=0) == (2, 13)


def test_pack_validation():
    with pytest.raises(ValueError, match="8"):
        pack_int32(torch.tensor([[8]], dtype=torch.int8), 4)  # 4-bit max is 7
    with pytest.raises(ValueError, match="-9"):
        pack_int32(torch.tensor([[-9, 0]], dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="int32"):
        pack_int32(torch.zeros(2, 2, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="9"):
        pack_int32(torch.zeros(2, 2, dtype=torch.int8), 9)
    with pytest.raises(ValueError, match="0"):
        pack_int32(torch.zeros(2, 2, dtype=torch.int8), 0)
    with pytest.raises(ValueError, match="int8"):
        unpack_int32(torch.zeros(2, 1, dtype=torch.int8), 4, (2, 8))
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        unpack_int32(torch.zeros(2, 3, dtype=torch.int32), 4, (2, 8))
