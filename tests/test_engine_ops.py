"""The engine's per-layer ops: the torch twins are the transformers math (CPU, exact), the fused
CUDA kernels match the twins (GPU, fresh random inputs, awkward sizes); fused linears equal their
parts and leave the parts working; every op the runner calls is an entry point with a twin."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantkit.engine.fusion import fuse
from quantkit.formats import ActSpec, FloatSpec, IntSpec, pack_int32
from quantkit.formats.activation import dynamic_scales, quantize
from quantkit.formats.qparams import quantize_rtn
from quantkit.kernels import cuda, registry
from quantkit.kernels import engine_ops as ops
from quantkit.kernels import engine_ops_cuda
from quantkit.nn.quant_linear import IntWeightLinear, W8A8Linear

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_rms_norm_twin_is_the_transformers_norm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(96, eps=1e-5)
    norm.weight.data = torch.randn(96)
    x, res = torch.randn(5, 96), torch.randn(5, 96)
    out, h = ops.add_rms_norm(x, res, norm.weight, norm.variance_epsilon)
    assert torch.equal(h, res + x)
    assert torch.equal(out, norm(res + x))
    out0, h0 = ops.add_rms_norm(x, None, norm.weight, norm.variance_epsilon)
    assert torch.equal(out0, norm(x)) and h0 is x


def test_rope_twin_is_the_transformers_rotation_and_fills_the_cache():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    t, hq, hk, d = 6, 4, 2, 16
    q, k, v = torch.randn(t, hq * d), torch.randn(t, hk * d), torch.randn(t, hk * d)
    ang = torch.randn(t, d // 2).repeat(1, 2)
    cos, sin = ang.cos(), ang.sin()
    kc, vc = torch.zeros(20, hk, d), torch.zeros(20, hk, d)
    slots = torch.tensor([3, 4, 5, 11, 12, 19])
    q_rot = ops.rope_cache(q, k, v, cos, sin, kc, vc, slots)
    q_ref, k_ref = apply_rotary_pos_emb(q.view(1, t, hq, d).transpose(1, 2), k.view(1, t, hk, d).transpose(1, 2),
                                        cos[None], sin[None])
    assert torch.equal(q_rot, q_ref[0].transpose(0, 1))
    assert torch.equal(kc[slots], k_ref[0].transpose(0, 1)) and torch.equal(vc[slots], v.view(t, hk, d))
    assert kc[0].abs().sum() == 0, "only the given slots are written"


def test_paged_attention_twin_equals_dense_causal_attention():
    torch.manual_seed(0)
    b, s, hq, hk, d, c = 2, 3, 4, 2, 8, 10
    kc, vc = torch.randn(40, hk, d), torch.randn(40, hk, d)
    context = torch.stack([torch.randperm(40)[:c] for _ in range(b)])  # scattered slots: the paging
    positions = torch.tensor([[4, 5, 6], [7, 8, 9]])
    q = torch.randn(b * s, hq, d)
    out = ops.paged_attention(q, kc, vc, context, positions.reshape(-1), d ** -0.5)
    for bi in range(b):
        for si in range(s):
            p = int(positions[bi, si])
            keys, vals = kc[context[bi, :p + 1]], vc[context[bi, :p + 1]]  # [p + 1, Hk, D]
            for h in range(hq):
                w = torch.softmax(keys[:, h // 2] @ q[bi * s + si, h] * d ** -0.5, 0)
                assert torch.allclose(out[bi * s + si, h * d:(h + 1) * d], w @ vals[:, h // 2], atol=1e-5)


def test_rope_twin_rounds_into_an_fp8_cache_saturating():
    t, hq, hk, d = 4, 2, 2, 8
    q, k, v = torch.randn(t, hq * d), torch.randn(t, hk * d) * 300, torch.randn(t, hk * d) * 300  # some past 448
    ang = torch.randn(t, d // 2).repeat(1, 2)
    cos, sin = ang.cos(), ang.sin()
    slots = torch.tensor([1, 5, 6, 2])
    wide = [torch.zeros(8, hk, d) for _ in range(2)]
    fp8 = [torch.zeros(8, hk, d, dtype=torch.float8_e4m3fn) for _ in range(2)]
    q_wide = ops.rope_cache(q, k, v, cos, sin, *wide, slots)
    q_fp8 = ops.rope_cache(q, k, v, cos, sin, *fp8, slots)
    assert torch.equal(q_wide, q_fp8), "q does not go through the cache"
    for w, f in zip(wide, fp8):
        assert w.abs().max() > 448 and torch.isfinite(f.float()).all() and f.float().abs().max() == 448
        assert torch.equal(f.float(), w.clamp(-448, 448).to(torch.float8_e4m3fn).float())


def test_paged_attention_twin_reads_an_fp8_cache_exactly():
    torch.manual_seed(1)
    b, s, hq, hk, d, c = 2, 2, 4, 2, 16, 9
    kc, vc = (torch.randn(30, hk, d).to(torch.float8_e4m3fn) for _ in range(2))
    context = torch.stack([torch.randperm(30)[:c] for _ in range(b)])
    positions = torch.tensor([3, 4, 7, 8])
    q = torch.randn(b * s, hq, d)
    out = ops.paged_attention(q, kc, vc, context, positions, d ** -0.5)
    assert torch.equal(out, ops.paged_attention(q, kc.float(), vc.float(), context, positions, d ** -0.5))


def _int_linear(spec: IntSpec, n: int, k: int, dtype: torch.dtype = torch.float32, bias: bool = True):
    qw = quantize_rtn(torch.randn(n, k), spec)
    m = IntWeightLinear(k, n, spec, bias=bias, dtype=dtype)
    m.weight_packed.copy_(pack_int32(qw.q, spec.bits, 1))
    m.weight_scale.copy_(qw.scale)
    if not spec.symmetric:
        m.weight_zero_point.copy_(pack_int32(qw.zero_point, spec.bits, 0))
    if bias:
        m.bias.data.copy_(torch.randn(n))
    return m, qw


@pytest.mark.parametrize("spec", [IntSpec(4, True, 32), IntSpec(4, False, 64), IntSpec(3, True, 32)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm_matmul_twin_is_the_unfused_ops(spec, dtype, with_residual):
    """residual add + RMSNorm + int-weight matmul: on the CPU the entry point (the twin) is exactly
    transformers' RMSNorm of x + residual through the quantized linear, and x @ dequantize(W)^T."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(3)
    k, n = 96, 40
    m, qw = _int_linear(spec, n, k, dtype)
    norm = LlamaRMSNorm(k, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(k).to(dtype)
    x = torch.randn(3, k).to(dtype)
    res = torch.randn(3, k).to(dtype) if with_residual else None
    y, h = ops.rms_norm_matmul(x, res, norm.weight, norm.variance_epsilon, m.prepared(), m.bias)
    h_ref = x if res is None else res + x
    assert torch.equal(h, h_ref)
    assert torch.equal(y, m(norm(h_ref)))
    if dtype == torch.float32:  # (in bfloat16 the layer's scales and sums round: the equality above holds)
        torch.testing.assert_close(y, F.linear(norm(h_ref), qw.dequantize(), m.bias), rtol=1e-5, atol=1e-5)
    y2, h2 = ops.rms_norm_matmul_reference(x, res, norm.weight, norm.variance_epsilon, m.prepared(), m.bias)
    assert torch.equal(y2, y) and torch.equal(h2, h)


def test_silu_mul_twin_is_the_transformers_activation():
    gate, up = torch.randn(4, 40), torch.randn(4, 40)
    assert torch.equal(ops.silu_mul(gate, up), F.silu(gate) * up)
    assert torch.equal(ops.silu_mul_reference(gate, up), F.silu(gate) * up)


ACTS = [ActSpec("fp8"), ActSpec("int8"), ActSpec("fp8", dynamic=False), ActSpec("int8", dynamic=False)]


def _static_scale(act: ActSpec) -> torch.Tensor | None:
    return None if act.dynamic else torch.tensor([0.5 / act.half_range])  # |x| > 0.5 saturates


@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_quant_twin_quantizes_the_norms_output(act, offset):
    """The quantizing norm's twin is add_rms_norm, then formats.activation's per-token (or static)
    quantization of its output: what a W8A8 linear does to its input."""
    torch.manual_seed(0)
    x, res, w = torch.randn(5, 96), torch.randn(5, 96), torch.randn(96)
    x[2] = 0.0  # with res: an ordinary row; without: a row of zeros gets the eps scale
    for r in (res, None):
        q, s, h = ops.add_rms_norm_quant(x, r, w, 1e-5, act, offset, _static_scale(act))
        normed, h_ref = ops.add_rms_norm(x, r, w, 1e-5, offset)
        s_ref = dynamic_scales(normed, act) if act.dynamic else _static_scale(act).expand(5, 1)
        assert torch.equal(h, h_ref) and s.shape == (5, 1) and s.dtype == torch.float32
        assert torch.equal(s, s_ref)
        assert torch.equal(q.view(torch.int8), quantize(normed, s_ref, act).view(torch.int8))
    if act.dynamic:
        assert float(s[2]) == torch.finfo(torch.float32).eps


@pytest.mark.parametrize("act", ACTS, ids=str)
def test_silu_mul_quant_twin_quantizes_silu_mul(act):
    gu = torch.randn(4, 80)
    g, u = gu.split([40, 40], -1)  # views of one gate/up output
    q, s = ops.silu_mul_quant(g, u, act, _static_scale(act))
    y = F.silu(g) * u
    s_ref = dynamic_scales(y, act) if act.dynamic else _static_scale(act).expand(4, 1)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.int8), quantize(y, s_ref, act).view(torch.int8))


def test_quantizing_ops_refuse_scales_that_do_not_fit_the_spec():
    x, w = torch.randn(2, 32), torch.ones(32)
    with pytest.raises(ValueError, match="dynamic.*no input_scale"):
        ops.add_rms_norm_quant(x, None, w, 1e-5, ActSpec("fp8"), input_scale=torch.ones(1))
    with pytest.raises(ValueError, match="static activation scheme needs input_scale"):
        ops.silu_mul_quant(x, x, ActSpec("int8", dynamic=False))
    with pytest.raises(ValueError, match=r"one value.*\(2,\)"):
        ops.silu_mul_quant(x, x, ActSpec("int8", dynamic=False), torch.ones(2))


def _w8a8_linear(n: int, k: int, spec, act: ActSpec, bias: bool = False, input_scale: float = 0.01) -> W8A8Linear:
    qw = quantize_rtn(torch.randn(n, k), spec)
    m = W8A8Linear(k, n, spec, act, bias=bias)
    m.weight.copy_(qw.q)
    m.weight_scale.copy_(qw.scale.reshape(m.weight_scale.shape))
    if m.input_scale is not None:
        m.input_scale.fill_(input_scale)
    if bias:
        m.bias.data.copy_(torch.randn(n))
    return m


@pytest.mark.parametrize("spec,act", [(FloatSpec("channel"), ActSpec("fp8")), (IntSpec(8, True, None), ActSpec("int8")),
                                      (IntSpec(4, True, 32), ActSpec("int8")),
                                      (IntSpec(8, True, None), ActSpec("int8", dynamic=False))], ids=str)
def test_fused_w8a8_linears_equal_their_parts_and_parts_still_work(spec, act):
    torch.manual_seed(2)
    parts = [_w8a8_linear(n, 96, spec, act, bias=b) for n, b in ((64, True), (32, False), (32, True))]
    x = torch.randn(5, 96)
    before = [p(x) for p in parts]
    fused = fuse(parts)
    assert type(fused) is W8A8Linear and fused.weight.shape == (128, 96)
    assert torch.equal(fused(x), torch.cat(before, -1))
    assert all(torch.equal(p(x), y) for p, y in zip(parts, before))
    assert parts[1].weight.data_ptr() == fused.weight.data_ptr() + 64 * 96, "the parts are views, not copies"


def test_w8a8_parts_with_per_tensor_or_different_input_scales_are_left_alone():
    tensor = [_w8a8_linear(32, 64, FloatSpec("tensor"), ActSpec("fp8")) for _ in range(2)]
    assert fuse(tensor) is None
    static = [_w8a8_linear(32, 64, IntSpec(8, True, None), ActSpec("int8", dynamic=False), input_scale=s)
              for s in (0.01, 0.02)]
    assert fuse(static) is None
    mixed = [_w8a8_linear(32, 64, FloatSpec(), ActSpec("fp8", dynamic)) for dynamic in (True, False)]
    assert fuse(mixed) is None


def test_every_op_the_runner_calls_is_an_entry_point_with_a_twin():
    """The runner's kernels (quantkit.engine.runner: ops.<name>) each select a registered backend,
    and "reference" (the torch twin) is registered for every one of them."""
    import ast
    import inspect

    from quantkit.engine import runner

    called = {node.attr for node in ast.walk(ast.parse(inspect.getsource(runner)))
              if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ops"}
    assert called == {"add_rms_norm", "rms_norm_matmul", "rope_cache", "silu_mul", "paged_attention",
                      "add_rms_norm_quant", "silu_mul_quant"}
    for op in called:
        assert callable(getattr(ops, op))
        assert registry.backends(op)["reference"].run is getattr(ops, f"{op}_reference"), op
        assert "cuda" in registry.backends(op), op


def test_fused_float_linears_equal_their_parts_and_parts_still_work():
    parts = [nn.Linear(24, n, bias=b) for n, b in ((16, True), (8, False), (8, True))]
    x = torch.randn(3, 24)
    before = [p(x) for p in parts]
    fused = fuse(parts)
    assert torch.allclose(fused(x), torch.cat(before, -1), atol=1e-6)
    assert all(torch.equal(p(x), y) for p, y in zip(parts, before))
    assert parts[0].weight.data_ptr() == fused.weight.data_ptr(), "the parts are views, not copies"


@pytest.mark.parametrize("spec", [IntSpec(4, True, 32), IntSpec(4, False, 32), IntSpec(8, False, None)], ids=str)
def test_fused_int_linears_equal_their_parts(spec):
    torch.manual_seed(1)
    parts = []
    for n in (64, 32, 32):
        qw = quantize_rtn(torch.randn(n, 96), spec)
        m = IntWeightLinear(96, n, spec)
        m.weight_packed.copy_(pack_int32(qw.q, spec.bits, 1))
        m.weight_scale.copy_(qw.scale)
        if not spec.symmetric:
            m.weight_zero_point.copy_(pack_int32(qw.zero_point, spec.bits, 0))
        parts.append(m)
    x = torch.randn(5, 96)
    before = [p(x) for p in parts]
    fused = fuse(parts)
    assert torch.equal(fused(x), torch.cat(before, -1))
    assert all(torch.equal(p(x), y) for p, y in zip(parts, before))


def test_mixed_or_act_order_parts_are_left_alone():
    spec = IntSpec(4, True, 32)
    a, b = IntWeightLinear(64, 32, spec, has_g_idx=True), IntWeightLinear(64, 32, spec, has_g_idx=True)
    b.weight_g_idx.copy_(torch.arange(64).flip(0) // 32)
    assert fuse([a, b]) is None
    assert fuse([nn.Linear(64, 32), IntWeightLinear(64, 32, spec)]) is None


# ---- the fused CUDA kernels against the twins --------------------------------------------------
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t,h", [(1, 576), (7, 4096), (33, 100)])
def test_fused_rms_norm_matches_its_twin(dtype, t, h):
    x, res, w = (torch.randn(t, h, device="cuda", dtype=dtype) for _ in range(2)), None, None
    x, res = list(x)
    w = torch.randn(h, device="cuda", dtype=dtype)
    for r in (res, None):
        out, hh = ops.add_rms_norm(x, r, w, 1e-5)
        ref_out, ref_h = ops.add_rms_norm_reference(x, r, w, 1e-5)
        assert torch.equal(hh, ref_h)
        tol = 1e-2 if dtype == torch.float16 else 4e-2
        assert torch.allclose(out.float(), ref_out.float(), rtol=tol, atol=tol)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_silu_mul_and_rope_match_their_twins(dtype):
    t, hq, hk, d, inter = 5, 9, 3, 64, 1536
    gu = torch.randn(t, 2 * inter, device="cuda", dtype=dtype)
    g, u = gu.split([inter, inter], -1)
    assert torch.equal(ops.silu_mul(g, u), torch.nn.functional.silu(g) * u)
    qkv = torch.randn(t, (hq + 2 * hk) * d, device="cuda", dtype=dtype)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], -1)
    ang = torch.randn(t, d // 2, device="cuda").repeat(1, 2)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    slots = torch.tensor([9, 2, 30, 31, 0], device="cuda")
    caches = [torch.zeros(32, hk, d, device="cuda", dtype=dtype) for _ in range(4)]
    q1 = ops.rope_cache(q, k, v, cos, sin, caches[0], caches[1], slots)
    q2 = ops.rope_cache_reference(q, k, v, cos, sin, caches[2], caches[3], slots)
    assert torch.equal(q1, q2) and torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,s,hq,hk,d,c", [(1, 1, 32, 32, 128, 300), (5, 3, 9, 3, 64, 77), (64, 1, 8, 2, 64, 1030)])
def test_fused_paged_attention_matches_its_twin(dtype, b, s, hq, hk, d, c):
    slots = b * c + 16
    kc, vc = (torch.randn(slots, hk, d, device="cuda", dtype=dtype) for _ in range(2))
    context = torch.stack([torch.randperm(slots, device="cuda")[:c] for _ in range(b)])
    positions = torch.stack([torch.randint(s - 1, c - s + 1, (1,), device="cuda") + torch.arange(s, device="cuda")
                             for _ in range(b)]).reshape(-1)
    q = torch.randn(b * s, hq, d, device="cuda", dtype=dtype)
    out = ops.paged_attention(q, kc, vc, context, positions, d ** -0.5)
    ref = ops.paged_attention_reference(q, kc, vc, context, positions, d ** -0.5)
    err = float((out.float() - ref.float()).norm() / ref.float().norm())
    assert err < (3e-3 if dtype == torch.float16 else 2e-2)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d,c,window,softcap", [(64, 77, None, None), (128, 300, None, None), (256, 65, None, None),
                                                (128, 1000, 100, None), (80, 63, None, 5.0)])
def test_fp8_kv_cache_kernels_match_their_twins(dtype, d, c, window, softcap):
    # rope_cache writes the same FP8 bytes as its twin (values past 448 saturate), and paged
    # attention over that cache matches its twin reading the same bytes (one split and several)
    torch.manual_seed(d + c)
    t, hq, hk = 5, 12, 4
    qkv = torch.randn(t, (hq + 2 * hk) * d, device="cuda", dtype=dtype) * 200
    q, k, v = qkv.split([hq * d, hk * d, hk * d], -1)
    ang = torch.randn(t, d // 2, device="cuda").repeat(1, 2)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    slots = torch.tensor([9, 2, 30, 31, 0], device="cuda")
    caches = [torch.zeros(32, hk, d, device="cuda", dtype=torch.float8_e4m3fn) for _ in range(4)]
    q1 = ops.rope_cache(q, k, v, cos, sin, caches[0], caches[1], slots)
    q2 = ops.rope_cache_reference(q, k, v, cos, sin, caches[2], caches[3], slots)
    assert torch.equal(q1, q2)
    for mine, twin in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(mine.view(torch.uint8), twin.view(torch.uint8))
        assert float(mine.float().abs().max()) == 448.0
    b, s = 3, 2
    positions = [[c - 2, c - 1], [0, 1], [c // 2, c // 2 + 1]]
    q, kc, vc, context, pos = _attention_case(dtype, b, s, hq, hk, d, c, positions)
    kc, vc = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
    out = ops.paged_attention(q, kc, vc, context, pos, d ** -0.5, window, softcap)
    ref = ops.paged_attention_reference(q, kc, vc, context, pos, d ** -0.5, window, softcap)
    assert torch.isfinite(out).all()
    err = float((out.float() - ref.float()).norm() / ref.float().norm())
    assert err < (3e-3 if dtype == torch.float16 else 2e-2)


def _attention_case(dtype, b, s, hq, hk, d, c, positions):
    """Random q and caches, scattered context slots; positions [B, S] -> the case's tensors."""
    slots = b * c + 16
    kc, vc = (torch.randn(slots, hk, d, device="cuda", dtype=dtype) for _ in range(2))
    context = torch.stack([torch.randperm(slots, device="cuda")[:c] for _ in range(b)])
    q = torch.randn(b * s, hq, d, device="cuda", dtype=dtype)
    return q, kc, vc, context, torch.as_tensor(positions, device="cuda").reshape(-1)


def test_the_attention_block_shape_is_the_kernels():
    from quantkit.kernels.cuda import CSRC

    text = (CSRC / "engine_ops.cu").read_text()
    assert f"ATTN_WARPS = {engine_ops_cuda.ATTN_WARPS};" in text
    assert f"ATTN_ROUNDS = {engine_ops_cuda.ATTN_ROUNDS};" in text


@pytest.mark.parametrize("d,dtype,g", [(64, torch.float16, 8), (128, torch.bfloat16, 16), (256, torch.float16, 32),
                                       (80, torch.float16, 16), (96, torch.float8_e4m3fn, 8),
                                       (128, torch.float8_e4m3fn, 8), (32, torch.float8_e4m3fn, 4),
                                       (72, torch.float8_e4m3fn, None), (60, torch.float16, None),
                                       (512, torch.float16, None)])
def test_attention_lanes_cover_the_head_in_16_byte_reads(d, dtype, g):
    assert engine_ops_cuda.attention_lanes(d, dtype) == g


@pytest.mark.parametrize("pairs,c,g", [(32, 257, 16), (2048, 257, 16), (8192, 300, 8), (24, 4000, 16),
                                       (1, 10 ** 7, 16), (300, 1, 16)])
def test_keys_per_split_fill_the_gpu_and_no_more(pairs, c, g):
    wave = 132 * 6
    kps = engine_ops_cuda.keys_per_split(pairs, c, g, wave)
    first = engine_ops_cuda.ATTN_WARPS * engine_ops_cuda.ATTN_ROUNDS * 32 // g  # one block iteration's keys
    splits = -(-c // kps)
    assert kps % first == 0 and (kps // first).bit_count() == 1 and splits <= engine_ops_cuda.ATTN_MAX_SPLITS
    if splits > 1 and c <= first * engine_ops_cuda.ATTN_MAX_SPLITS:
        # one doubling more would have left part of the GPU idle (or it is at its smallest)
        assert kps == first or pairs * -(-c // (2 * kps)) < wave or pairs * splits < wave
    if pairs * -(-c // first) >= 2 * wave:  # enough (row, head) pairs: fewer, longer blocks
        assert kps > first or c <= first


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [80, 128, 256])
@pytest.mark.parametrize("c", [1, 63, 64, 65, 256, 1000])
def test_split_paged_attention_matches_its_twin(dtype, d, c):
    # one split (C <= 64) and several, with rows at the context's end, at its start (all splits
    # but the first empty) and between; GQA, and S > 1 tokens per sequence where C allows
    torch.manual_seed(c)
    s = 2 if c > 1 else 1
    starts = [c - s, 0, int(torch.randint(0, c - s + 1, (1,))), min(c - s, 5)]
    positions = [[p + i for i in range(s)] for p in starts]
    q, kc, vc, context, pos = _attention_case(dtype, len(starts), s, 12, 4, d, c, positions)
    out = ops.paged_attention(q, kc, vc, context, pos, d ** -0.5)
    ref = ops.paged_attention_reference(q, kc, vc, context, pos, d ** -0.5)
    assert torch.isfinite(out).all()
    err = float((out.float() - ref.float()).norm() / ref.float().norm())
    assert err < (3e-3 if dtype == torch.float16 else 2e-2)


@gpu
def test_split_paged_attention_is_deterministic_and_resets_its_counters():
    # 16 splits per (row, head), merged in split order: the same bits whatever order the blocks
    # finish in; the last block of each (row, head) zeroes its counter, so any later launch works
    torch.manual_seed(0)
    b, s, hq, hk, d, c = 8, 2, 32, 8, 128, 1000
    starts = torch.randint(0, c - s + 1, (b,)).tolist()
    case = _attention_case(torch.float16, b, s, hq, hk, d, c, [[p + i for i in range(s)] for p in starts])
    first = ops.paged_attention(*case, d ** -0.5)
    assert torch.equal(ops.paged_attention(*case, d ** -0.5), first)
    # another row count, past the counters' first size (4096 (row, head) pairs) so they grow
    b2 = 4096 // hq + 3
    other = _attention_case(torch.float16, b2, 1, hq, hk, d, 300, torch.randint(0, 300, (b2, 1)))
    out, ref = ops.paged_attention(*other, d ** -0.5).float(), ops.paged_attention_reference(*other, d ** -0.5).float()
    assert float((out - ref).norm() / ref.norm()) < 3e-3
    assert torch.equal(ops.paged_attention(*case, d ** -0.5), first)
    torch.cuda.synchronize()
    assert all(int(t.count_nonzero()) == 0 for t in cuda._counters[("paged_attention", first.device)])


# ---- the kernels of the families beyond Llama (Gemma, Qwen3) ----------------------------------------
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t,h", [(1, 640), (7, 2304), (33, 100)])
def test_fused_offset_rms_norm_matches_its_twin(dtype, t, h):
    # Gemma's (1 + w) norm, product in float and rounded once: the twin's rounding exactly, up to
    # the order of the sum of squares
    x, res = (torch.randn(t, h, device="cuda", dtype=dtype) for _ in range(2))
    w = 0.3 * torch.randn(h, device="cuda", dtype=dtype)
    for r in (res, None):
        out, hh = ops.add_rms_norm(x, r, w, 1e-6, 1.0)
        ref_out, ref_h = ops.add_rms_norm_reference(x, r, w, 1e-6, 1.0)
        assert torch.equal(hh, ref_h)
        tol = 1e-2 if dtype == torch.float16 else 4e-2
        torch.testing.assert_close(out.float(), ref_out.float(), rtol=tol, atol=tol)
        assert not torch.allclose(out.float(), ops.add_rms_norm_reference(x, r, w, 1e-6)[0].float(), atol=0.1)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_gelu_tanh_mul_matches_its_twin(dtype):
    t, inter = 5, 2048 + 7
    gu = 3 * torch.randn(t, 2 * inter, device="cuda", dtype=dtype)
    g, u = gu.split([inter, inter], -1)
    out, ref = ops.gelu_tanh_mul(g, u), ops.gelu_tanh_mul_reference(g, u)
    # one rounding step of T apart at most (tanhf against torch's tanh)
    step = 2 ** -10 if dtype == torch.float16 else 2 ** -7
    assert float(((out.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-3)).max()) <= 2 * step


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_fused_qk_rms_norm_matches_its_twin(dtype, offset, d):
    # q / k / v as views of one fused output (the engine's case) and as separate tensors
    t, hq, hk = 6, 8, 2
    qkv = torch.randn(t, (hq + 2 * hk) * d, device="cuda", dtype=dtype)
    qw, kw = (0.5 * torch.randn(d, device="cuda", dtype=dtype) for _ in range(2))
    views = qkv.split([hq * d, hk * d, hk * d], -1)
    for q, k, v in (views, [x.contiguous() for x in views]):
        out = ops.qk_rms_norm(q, k, v, qw, kw, 1e-6, offset)
        ref = ops.qk_rms_norm_reference(q, k, v, qw, kw, 1e-6, offset)
        assert out[0].stride(0) == out[1].stride(0) == out[2].stride(0)
        assert torch.equal(out[2], v)
        tol = 1e-2 if dtype == torch.float16 else 4e-2
        for a, b in zip(out[:2], ref[:2]):
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window,softcap", [(8, None), (None, 5.0), (100, 2.0), (1, None), (4096, 50.0)])
@pytest.mark.parametrize("c", [1, 63, 65, 1000])
def test_windowed_capped_paged_attention_matches_its_twin(dtype, window, softcap, c):
    # rows at the context's end, at its start and between; windows shorter than a split, longer
    # than the context, of one key; scores scaled up so that capping bends them
    torch.manual_seed(c)
    s = 2 if c > 1 else 1
    starts = [c - s, 0, int(torch.randint(0, c - s + 1, (1,))), min(c - s, 5)]
    positions = [[p + i for i in range(s)] for p in starts]
    q, kc, vc, context, pos = _attention_case(dtype, len(starts), s, 8, 2, 128, c, positions)
    q = 4 * q
    out = ops.paged_attention(q, kc, vc, context, pos, 128 ** -0.5, window, softcap)
    ref = ops.paged_attention_reference(q, kc, vc, context, pos, 128 ** -0.5, window, softcap)
    assert torch.isfinite(out).all()
    err = float((out.float() - ref.float()).norm() / ref.float().norm())
    assert err < (3e-3 if dtype == torch.float16 else 2e-2)
    if c > 8 and (window or c) < c:  # the window matters: attention over every key differs
        full = ops.paged_attention_reference(q, kc, vc, context, pos, 128 ** -0.5, None, softcap)
        assert float((full.float() - ref.float()).norm() / ref.float().norm()) > 0.05


# ---- the quantizing ops in front of a W8A8 linear, bit for bit --------------------------------------
def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.int8)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("t,h", [(1, 4096), (7, 576), (33, 100), (256, 8192), (3, 8200)])
def test_fused_rms_norm_quant_is_its_twin_bit_for_bit(dtype, act, offset, t, h):
    """The fused kernel quantizes the very values add_rms_norm's kernel writes (the same block, the
    same sums), as formats.activation does on the GPU: equal scales and equal bytes. H 8200: past
    the kernel's rows, the twin."""
    torch.manual_seed(t)
    x, res = (torch.randn(t, h, device="cuda", dtype=dtype) for _ in range(2))
    x[0, h // 3] = 300.0  # an outlier: the row's scale follows it
    w = torch.randn(h, device="cuda", dtype=dtype)
    given = None if act.dynamic else torch.tensor([0.5 / act.half_range], device="cuda")
    for r in (res, None):
        q, s, hh = ops.add_rms_norm_quant(x, r, w, 1e-5, act, offset, given)
        q_ref, s_ref, h_ref = ops.add_rms_norm_quant_reference(x, r, w, 1e-5, act, offset, given)
        assert torch.equal(hh, h_ref) and torch.equal(s, s_ref)
        assert torch.equal(_bits(q), _bits(q_ref))


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("t,i", [(1, 11008), (5, 1536), (17, 100), (256, 14336), (2, 16384 + 32)])
def test_fused_silu_mul_quant_is_its_twin_bit_for_bit(dtype, act, t, i):
    # gate and up as views of one gate/up output (the engine's case); I past the kernel's 16384: the twin
    torch.manual_seed(i)
    gu = 3 * torch.randn(t, 2 * i, device="cuda", dtype=dtype)
    g, u = gu.split([i, i], -1)
    given = None if act.dynamic else torch.tensor([0.5 / act.half_range], device="cuda")
    q, s = ops.silu_mul_quant(g, u, act, given)
    q_ref, s_ref = ops.silu_mul_quant_reference(g, u, act, given)
    assert torch.equal(s, s_ref) and torch.equal(_bits(q), _bits(q_ref))


@gpu
@pytest.mark.parametrize("act", ACTS[:2], ids=str)
def test_fused_quant_ops_carry_a_nan_row_into_its_scale(act):
    x = torch.randn(3, 256, device="cuda", dtype=torch.float16)
    x[1, 7] = float("nan")
    _, s, _ = ops.add_rms_norm_quant(x, None, torch.ones(256, device="cuda", dtype=torch.float16), 1e-5, act)
    assert torch.isnan(s[1]).all() and torch.isfinite(s[[0, 2]]).all()
    _, s = ops.silu_mul_quant(x, x, act)
    assert torch.isnan(s[1]).all() and torch.isfinite(s[[0, 2]]).all()
