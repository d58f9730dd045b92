"""The CUDA integer-weight kernel (csrc/int_weight_mma.cu) against the reference twin.

The kernel tests need a CUDA GPU and CuPy and skip cleanly without them; the layout the
kernels read is tested on any machine in tests/test_int_weight_layout.py.
"""

from __future__ import annotations

import pytest
import torch

from quantkit.formats import IntSpec, pack_int32, quantize_rtn
from quantkit.kernels import cuda, engine_ops, int_weight_matmul, prepare_int_weight, rms_norm_matmul, select_backend
from quantkit.kernels import int_weight_cuda as iwc
from quantkit.kernels.launch_int_weight_wgmma import BITS as WGMMA_BITS
from quantkit.kernels.launch_int_weight_wgmma import KIND_TILES as WGMMA_KIND_TILES
from quantkit.kernels.launch_int_weight_wgmma import KINDS as WGMMA_KINDS
from quantkit.kernels.int_weight_cuda import (GEMV, ROW_BLOCK_GEMV, _gemv_variant, _matmul, _path, fused_rms_norm_matmul,
                                              unsupported)

gpu = pytest.mark.skipif(not cuda.available(), reason="needs a CUDA GPU and CuPy")


def test_unsupported_formats_fall_back_to_the_reference():
    assert unsupported(IntSpec(3, True, 128)) and unsupported(IntSpec(4, True, 16))
    assert unsupported(IntSpec(4, False, 64)) is None and unsupported(IntSpec(8, True, None)) is None
    assert select_backend("int_weight", "cpu", spec=IntSpec(4, True, 128)).name == "reference"


# ---- on the GPU ------------------------------------------------------------------------------

M_VALUES = [1, 2, 3, 4, 8, 12, 16, 24, 32, 48, 64, 118, 128, 256, 1024]
SPECS = [IntSpec(4, True, 128), IntSpec(4, False, 128), IntSpec(4, True, 32), IntSpec(4, False, 64), IntSpec(4, True, 256),
         IntSpec(4, True, None), IntSpec(8, True, 128), IntSpec(8, False, 32), IntSpec(8, True, None)]


def _weights(n, k, spec, dtype, act_order=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g)
    qw = quantize_rtn(w, spec)
    qw.scale = qw.scale.to(dtype)
    if act_order:
        perm = torch.randperm(k, device="cuda", generator=g)
        groups = torch.arange(k, device="cuda") // (spec.group_size or k)
        qw.q, qw.g_idx = qw.q[:, perm].contiguous(), groups[perm].to(torch.int32)
    zp = None if spec.symmetric else pack_int32(qw.zero_point, spec.bits, dim=0)
    args = (pack_int32(qw.q, spec.bits, 1), qw.scale, zp, qw.g_idx, spec, (n, k))
    return prepare_int_weight(*args, backend="cuda"), prepare_int_weight(*args, backend="reference")


def _rel_err(y, ref):
    assert torch.isfinite(y).all()
    return float((y.float() - ref.float()).norm() / ref.float().norm())


@gpu
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_batch_size_matches_the_reference(m, dtype):
    cu, ref = _weights(1056, 4096, IntSpec(4, True, 128), dtype, seed=m)
    x = torch.randn(m, 4096, device="cuda", dtype=dtype)
    bias = torch.randn(1056, device="cuda", dtype=dtype)
    y = int_weight_matmul(x, cu, bias)
    assert y.shape == (m, 1056) and y.dtype == dtype
    assert _rel_err(y, int_weight_matmul(x, ref, bias)) < (2e-3 if dtype == torch.float16 else 1e-2)


@gpu
@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("n,k", [(4096, 4096), (200, 4160), (33, 96), (1000, 1000), (64, 11008)])
@pytest.mark.parametrize("m", [1, 5, 16, 37, 300])
def test_every_format_and_awkward_shapes(spec, n, k, m):
    cu, ref = _weights(n, k, spec, torch.float16, seed=n + k + m)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    assert _rel_err(int_weight_matmul(x, cu), int_weight_matmul(x, ref)) < 2e-3


@gpu
@pytest.mark.parametrize("spec", [IntSpec(4, True, 128), IntSpec(4, False, 32), IntSpec(8, False, 64)], ids=str)
@pytest.mark.parametrize("m", [1, 16, 300])
def test_act_order_matches_the_reference(spec, m):
    cu, ref = _weights(512, 1024, spec, torch.bfloat16, act_order=True, seed=m)
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    assert _rel_err(int_weight_matmul(x, cu), int_weight_matmul(x, ref)) < 1e-2


@gpu
def test_leading_dims_strided_input_and_repeat_calls_are_stable():
    cu, ref = _weights(768, 2048, IntSpec(4, False, 128), torch.float16, seed=7)
    base = torch.randn(3, 5, 4096, device="cuda", dtype=torch.float16)
    x = base[..., 1:2049]  # strided, misaligned start
    y1, y2 = int_weight_matmul(x, cu), int_weight_matmul(x, cu)
    assert y1.shape == (3, 5, 768)
    assert torch.equal(y1, y2), "the split-K sum must be deterministic"
    assert _rel_err(y1, int_weight_matmul(x.contiguous(), ref)) < 2e-3


ENGINE_SPECS = [IntSpec(4, True, 128), IntSpec(4, False, 256), IntSpec(4, True, None)]  # the row-block / fused kernels


@gpu
@pytest.mark.parametrize("spec", [IntSpec(4, False, 32), IntSpec(4, True, 64), IntSpec(8, True, 128)], ids=str)
def test_formats_without_the_engine_kernels_take_the_stream_k_kernel(spec):
    cu, ref = _weights(4096, 4096, spec, torch.float16)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    nw = torch.ones(4096, device="cuda", dtype=torch.float16)
    assert _gemv_variant(cu, 1) == GEMV
    assert fused_rms_norm_matmul(x, None, nw, 1e-5, cu) is None
    y, h = rms_norm_matmul(x, None, nw, 1e-5, cu)  # the entry point: the two ops, unfused
    normed, h_ref = engine_ops.add_rms_norm(x, None, nw, 1e-5)
    assert h is x and torch.equal(y, int_weight_matmul(normed, cu))
    assert _rel_err(int_weight_matmul(x, cu), int_weight_matmul(x, ref)) < 2e-3


@gpu
@pytest.mark.parametrize("warps", [4, 8, 16])
@pytest.mark.parametrize("spec", ENGINE_SPECS, ids=str)
@pytest.mark.parametrize("n,k", [(4096, 4096), (200, 4160), (33, 11008)])
def test_row_block_decode_variants_match_the_reference(warps, spec, n, k):
    """The one-block-per-row-block decode kernel (chosen by _gemv_variant for some shapes), forced."""
    cu, ref = _weights(n, k, spec, torch.float16, seed=warps + n)
    for m in (1, 3, 4):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        y = _matmul(x, cu, None, path="gemv", variant=ROW_BLOCK_GEMV[warps])
        assert _rel_err(y, int_weight_matmul(x, ref)) < 2e-3


@gpu
@pytest.mark.parametrize("spec", ENGINE_SPECS, ids=str)
@pytest.mark.parametrize("n,k", [(4096, 4096), (12288, 4096), (200, 4160), (40, 64)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_fused_rms_norm_matmul_equals_the_two_steps(spec, n, k, with_residual):
    """One token through residual add + RMSNorm + matmul in one launch (the row-block and stream-K
    variants, by shape): h bit-identical to add_rms_norm's, y as close as the float sums allow."""
    cu, ref = _weights(n, k, spec, torch.float16, seed=n + k)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    r = torch.randn(1, k, device="cuda", dtype=torch.float16) if with_residual else None
    nw = torch.rand(k, device="cuda", dtype=torch.float16) + 0.5
    assert fused_rms_norm_matmul(x, r, nw, 1e-5, cu) is not None  # the fused launch applies
    y, h = rms_norm_matmul(x, r, nw, 1e-5, cu)
    normed, h_ref = engine_ops.add_rms_norm(x, r, nw, 1e-5)
    assert torch.equal(h, h_ref)
    assert _rel_err(y, int_weight_matmul(normed, ref)) < 2e-3
    y2, _ = rms_norm_matmul(x, r, nw, 1e-5, cu)
    assert torch.equal(y, y2)


@gpu
def test_fused_rms_norm_matmul_declines_what_it_cannot_take():
    """The fused launch declines; the entry point then runs the two ops it fuses."""
    cu, _ = _weights(256, 512, IntSpec(4, True, 128), torch.float16)
    nw = torch.ones(512, device="cuda", dtype=torch.float16)
    two = torch.randn(2, 512, device="cuda", dtype=torch.float16)
    assert fused_rms_norm_matmul(two, None, nw, 1e-5, cu) is None
    y, h = rms_norm_matmul(two, None, nw, 1e-5, cu)
    assert h is two and torch.equal(y, int_weight_matmul(engine_ops.add_rms_norm(two, None, nw, 1e-5)[0], cu))
    assert fused_rms_norm_matmul(torch.randn(1, 512, device="cuda", dtype=torch.float32), None, nw, 1e-5, cu) is None
    big, _ = _weights(64, 16384, IntSpec(4, True, 128), torch.float16)
    assert fused_rms_norm_matmul(torch.randn(1, 16384, device="cuda", dtype=torch.float16), None,
                                 torch.ones(16384, device="cuda", dtype=torch.float16), 1e-5, big) is None


@gpu
def test_early_launched_chains_equal_ordinary_launches():
    """Programmatic dependent launch: each kernel reads the previous one's output (norm -> decode
    kernel -> norm -> ...), captured in a CUDA graph; bit-identical to ordinary launches."""
    weights = [_weights(1024, 1024, IntSpec(4, True, 128), torch.float16, seed=s)[0] for s in range(4)]
    x0 = torch.randn(1, 1024, device="cuda", dtype=torch.float16)
    norm_w = torch.rand(1024, device="cuda", dtype=torch.float16) + 0.5

    def chain():
        x, r = x0, None
        for w in weights * 3:
            h, r = engine_ops.add_rms_norm(x, r, norm_w, 1e-5)
            x = int_weight_matmul(h, w)
        return x

    results = {}
    for pdl in (False, True):
        saved, cuda.pdl_enabled = cuda.pdl_enabled, pdl
        try:
            eager = chain()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = chain()
            graph.replay()
            torch.cuda.synchronize()
            results[pdl] = (eager, out.clone())
        finally:
            cuda.pdl_enabled = saved
    for y in (results[True][0], results[True][1], results[False][1]):
        assert torch.equal(y, results[False][0])


@gpu
def test_cuda_backend_is_chosen_only_for_half_precision():
    spec = IntSpec(4, True, 128)
    assert select_backend("int_weight", "cuda", torch.float16, spec).name == "cuda"
    assert select_backend("int_weight", "cuda", torch.float32, spec).name == "reference"
    with pytest.raises(ValueError, match="float32"):
        select_backend("int_weight", "cuda", torch.float32, spec, override="cuda")


@gpu
def test_dense_and_mma_paths_agree_and_bad_inputs_raise():
    cu, _ = _weights(256, 512, IntSpec(4, True, 128), torch.float16, seed=3)
    x = torch.randn(40, 512, device="cuda", dtype=torch.float16)
    assert _rel_err(_matmul(x, cu, None, path="mma"), _matmul(x, cu, None, path="dense")) < 2e-3
    with pytest.raises(ValueError, match="40"):
        _matmul(x, cu, None, path="gemv")  # the decode kernel takes at most 16 tokens
    with pytest.raises(ValueError, match="511"):
        int_weight_matmul(x[:, :511], cu)
    with pytest.raises(ValueError, match="float32"):
        int_weight_matmul(x.float(), cu)
    with pytest.raises(ValueError, match="multiples of 32"):
        _weights(64, 64, IntSpec(4, True, 16), torch.float16)


# ---- the Hopper GEMM (csrc/int_weight_wgmma.cu) ----------------------------------------------

hopper = pytest.mark.skipif(not cuda.arch_specific_ok(), reason="needs a compute capability 9.0 GPU (wgmma) and CuPy")
WGMMA_SPECS = [IntSpec(4, True, 128), IntSpec(4, False, 128), IntSpec(4, True, 32), IntSpec(4, False, 64),
               IntSpec(4, True, None)]


@hopper
@pytest.mark.parametrize("spec", WGMMA_SPECS, ids=str)
@pytest.mark.parametrize("n,k", [(4096, 4096), (200, 4160), (33, 96), (1000, 1000), (8192, 1024)])
@pytest.mark.parametrize("m", [1, 17, 31, 64, 65, 100, 257, 1024])
@pytest.mark.parametrize("kind", WGMMA_KINDS)
def test_wgmma_kernel_matches_the_reference(spec, n, k, m, kind):
    cu, ref = _weights(n, k, spec, torch.float16, seed=n + k + m)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    bias = torch.randn(n, device="cuda", dtype=torch.float16)
    assert _rel_err(_matmul(x, cu, bias, path="wgmma", kind=kind), int_weight_matmul(x, ref, bias)) < 2e-3


@hopper
@pytest.mark.parametrize("kind,bn", [(kind, bn) for kind in WGMMA_KINDS for bn in WGMMA_KIND_TILES[kind]])
@pytest.mark.parametrize("m", [3, 16, 77, 129, 300, 513])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_wgmma_token_tile_matches_the_reference(kind, bn, m, dtype):
    cu, ref = _weights(1056, 4096, IntSpec(4, False, 128), dtype, seed=m)
    x = torch.randn(m, 4096, device="cuda", dtype=dtype)
    y = _matmul(x, cu, None, path="wgmma", bn=bn, kind=kind)
    assert y.shape == (m, 1056) and y.dtype == dtype
    assert _rel_err(y, int_weight_matmul(x, ref)) < (2e-3 if dtype == torch.float16 else 1e-2)


@hopper
@pytest.mark.parametrize("spec", [IntSpec(4, True, 128), IntSpec(4, False, 32)], ids=str)
@pytest.mark.parametrize("kind", WGMMA_KINDS)
def test_wgmma_kernel_takes_act_order_strided_inputs_and_is_deterministic(spec, kind):
    cu, ref = _weights(512, 1024, spec, torch.bfloat16, act_order=True, seed=5)
    base = torch.randn(3, 40, 1100, device="cuda", dtype=torch.bfloat16)
    x = base[..., 3:1027]  # leading dims, strided, misaligned start
    y1, y2 = _matmul(x, cu, None, path="wgmma", kind=kind), _matmul(x, cu, None, path="wgmma", kind=kind)
    assert y1.shape == (3, 40, 512)
    assert torch.equal(y1, y2), "the split-K sum must be deterministic"
    assert _rel_err(y1, int_weight_matmul(x.contiguous(), ref)) < 1e-2


@hopper
@pytest.mark.parametrize("spec", [IntSpec(8, True, 128), IntSpec(8, False, 32), IntSpec(8, True, None)], ids=str)
@pytest.mark.parametrize("kind,bn", [(kind, bn) for kind in WGMMA_KINDS for bn in WGMMA_KIND_TILES[kind]
                                     if 8 in WGMMA_BITS[kind]])
@pytest.mark.parametrize("m", [17, 100, 513])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ws_kernels_take_8_bit_weights(spec, kind, bn, m, dtype):
    cu, ref = _weights(1000, 1000, spec, dtype, seed=m + bn)
    x = torch.randn(m, 1000, device="cuda", dtype=dtype)
    bias = torch.randn(1000, device="cuda", dtype=dtype)
    y = _matmul(x, cu, bias, path="wgmma", bn=bn, kind=kind)
    assert _rel_err(y, int_weight_matmul(x, ref, bias)) < (2e-3 if dtype == torch.float16 else 1e-2)


@hopper
@pytest.mark.parametrize("bn", [32, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ws_x_tiles_kernel_matches_its_twin(bn, dtype):
    from quantkit.kernels.launch_int_weight_wgmma import x_tiles, x_tiles_reference

    x = torch.randn(77, 1000, device="cuda", dtype=dtype)[:, :992]  # strided rows, K a multiple of 8
    assert torch.equal(x_tiles(x, 992, 32, bn), x_tiles_reference(x, 992, 32, bn))


@hopper
def test_the_dispatcher_follows_the_measured_table_and_rs_refuses_8_bit():
    cu4, _ = _weights(256, 512, IntSpec(4, True, 128), torch.float16)
    cu8, _ = _weights(256, 512, IntSpec(8, True, 128), torch.float16)
    choice = iwc.measured_choice(64, 256, 512, *iwc._gpu(torch.device("cuda")))
    assert _path(64, cu4, torch.float16, torch.device("cuda")) == (choice or "mma")
    assert not _path(64, cu8, torch.float16, torch.device("cuda")).startswith("wgmma")
    x = torch.randn(64, 512, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="4-bit"):
        _matmul(x, cu8, None, path="wgmma", kind="rs")
    with pytest.raises(ValueError, match="token tile"):
        _matmul(x, cu4, None, path="wgmma", bn=48)
    with pytest.raises(ValueError, match="variants"):
        _matmul(x, cu4, None, path="wgmma", kind="ss")


def test_measured_dispatch_takes_the_nearest_shape_and_the_largest_measured_m(tmp_path, monkeypatch):
    """The table scripts/tune_int_weight.py writes: per GPU name, shape -> [[from M, choice]]."""
    table = {"Card A": {"shapes": {"4096x4096": [[17, "mma"], [64, "wgmma:rs:64"], [256, "wgmma:ss:256"]],
                                   "28672x8192": [[17, "wgmma:rs:64"], [1024, "dense"]]}}}
    (tmp_path / "int_weight_dispatch.json").write_text(__import__("json").dumps(table))
    monkeypatch.setattr(iwc, "csrc_dir", lambda: tmp_path)
    iwc.dispatch_table.cache_clear()
    try:
        assert iwc.measured_choice(40, 4096, 4096, "Card B") is None
        assert iwc.measured_choice(40, 4096, 4096, "Card A") == "mma"
        assert iwc.measured_choice(64, 4000, 4200, "Card A") == "wgmma:rs:64"
        assert iwc.measured_choice(5000, 4096, 4096, "Card A") == "wgmma:ss:256"
        assert iwc.measured_choice(20, 14336, 8192, "Card A") == "wgmma:rs:64"  # nearer 28672x8192 in log N + log K
        assert iwc.measured_choice(2048, 30000, 8000, "Card A") == "dense"
        table["Card A"]["capability"] = "9.0"
        (tmp_path / "int_weight_dispatch.json").write_text(__import__("json").dumps(table))
        iwc.dispatch_table.cache_clear()
        assert iwc.measured_choice(64, 4096, 4096, "Card B", "9.0") == "wgmma:rs:64"  # the same capability's table
        assert iwc.measured_choice(64, 4096, 4096, "Card B", "10.0") is None
        # 8-bit weights have a table of their own; a GPU without one takes a same-capability GPU's
        assert iwc.measured_choice(64, 4096, 4096, "Card A", bits=8) is None
        table["Card C"] = {"capability": "9.0", "shapes": {},
                           "shapes_b8": {"4096x4096": [[17, "mma"], [128, "wgmma:ws:128"]]}}
        (tmp_path / "int_weight_dispatch.json").write_text(__import__("json").dumps(table))
        iwc.dispatch_table.cache_clear()
        assert iwc.measured_choice(200, 4096, 4096, "Card C", bits=8) == "wgmma:ws:128"
        assert iwc.measured_choice(200, 4096, 4096, "Card A", "9.0", bits=8) == "wgmma:ws:128"
        assert iwc.measured_choice(200, 4096, 4096, "Card A", "9.0") == "wgmma:rs:64"  # 4-bit: its own table
    finally:
        iwc.dispatch_table.cache_clear()


def test_the_tuners_table_file_keeps_each_widths_shapes_and_round_trips(monkeypatch):
    """scripts/tune_int_weight.py writes one line per shape, each width's table under its own key, and
    rewrites the shipped table byte for byte."""
    import importlib.util
    import json
    import pathlib

    scripts = pathlib.Path(__file__).resolve().parents[1] / "scripts"
    monkeypatch.syspath_prepend(str(scripts))  # it imports bench_kernels from there
    spec = importlib.util.spec_from_file_location("tune_int_weight_script", scripts / "tune_int_weight.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    data = {"Card": {"capability": "9.0", "command": "c", "measured": "d", "shapes": {"1x2": [[17, "mma"]]},
                     "shapes_b8": {"3x4": [[17, "dense"], [64, "wgmma:ws:64"]]}}}
    assert json.loads(tune.dump_table(data)) == data
    shipped = (scripts.parent / "csrc" / "int_weight_dispatch.json").read_text()
    assert tune.dump_table(json.loads(shipped)) == shipped
    # a run over a few Ms changes the table at those Ms only
    old = [[17, "wgmma:rs:32"], [64, "wgmma:rs:64"], [128, "wgmma:rs:128"], [256, "wgmma:rs:256"], [512, "dense"]]
    assert tune.merge_rows(old, [[64, "wgmma:rs:64"], [256, "wgmma:ws:256"], [1024, "dense"]]) == [
        [17, "wgmma:rs:32"], [64, "wgmma:rs:64"], [128, "wgmma:rs:128"], [256, "wgmma:ws:256"], [512, "dense"]]
    assert tune.merge_rows([], [[17, "mma"], [64, "mma"]]) == [[17, "mma"]]
    assert tune.merge_rows([[17, "mma"]], [[17, "dense"]]) == [[17, "dense"]]
