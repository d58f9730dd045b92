"""The programmatic-dependent-launch path of quantkit.kernels.cuda, checked on any machine with the
driver call replaced: the launch configuration and every argument reach cuLaunchKernelEx as the
CUDA headers lay them out; and each named launch wrapper (quantkit.kernels.launch_*) hands the driver
exactly the argument buffer the positional call it replaced did, its keywords named as the kernel's
parameters."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from quantkit.kernels import cuda


class _FakeDriver:
    def __init__(self, result: int = 0, count: int = 5):
        self.result, self.count, self.calls = result, count, []

    def cuLaunchKernelEx(self, config, function, params, extra):
        cfg = ctypes.cast(config, ctypes.POINTER(cuda._Config))[0]
        attr = cfg.attrs[0]
        p = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))
        # the argument buffer lives only for the call: read the values now, by the kernel's types
        kinds = (ctypes.c_uint64, ctypes.c_int64, ctypes.c_int32, ctypes.c_uint32, ctypes.c_float)
        values = [ctypes.cast(p[i], ctypes.POINTER(k))[0] for i, k in enumerate(kinds[:self.count])]
        self.calls.append({"grid": tuple(cfg.grid), "block": tuple(cfg.block), "smem": cfg.shared_mem,
                           "attr": (attr.id, attr.value.flag, cfg.num_attrs), "function": function, "values": values})
        return self.result


def test_arguments_and_configuration_reach_the_driver(monkeypatch):
    driver = _FakeDriver()
    monkeypatch.setattr(cuda, "_driver", lambda: driver)
    args = (np.uint64(2**63 + 5), np.int64(-7), np.int32(-5), np.uint32(4_000_000_000), np.float32(1.5))
    cuda._launch_ex(1234, (3, 2), (256,), args, 4096, 0)
    call = driver.calls[0]
    assert call["grid"] == (3, 2, 1) and call["block"] == (256, 1, 1) and call["smem"] == 4096
    assert call["attr"] == (6, 1, 1) and call["function"] == 1234  # programmatic stream serialization, on
    assert call["values"] == [2**63 + 5, -7, -5, 4_000_000_000, 1.5]


def test_bad_arguments_and_driver_errors_raise(monkeypatch):
    monkeypatch.setattr(cuda, "_driver", lambda: _FakeDriver(result=1, count=1))
    with pytest.raises(TypeError, match="numpy int32"):
        cuda._launch_ex(0, (1,), (1,), (5,), 0, 0)
    with pytest.raises(TypeError, match="float64"):
        cuda._launch_ex(0, (1,), (1,), (np.float64(1.0),), 0, 0)
    with pytest.raises(RuntimeError, match="CUresult 1"):
        cuda._launch_ex(0, (1,), (1,), (np.int32(1),), 0, 0)


def test_layouts_match_the_cuda_headers():
    # sizeof / offsetof from cuda.h (CUDA 12-13): CUlaunchAttribute 72 bytes, value at 8;
    # CUlaunchConfig 56 bytes, hStream at 32, attrs at 40, numAttrs at 48
    assert ctypes.sizeof(cuda._Attr) == 72 and cuda._Attr.value.offset == 8
    assert ctypes.sizeof(cuda._Config) == 56
    assert (cuda._Config.stream.offset, cuda._Config.attrs.offset, cuda._Config.num_attrs.offset) == (32, 40, 48)


# ---- the named launch wrappers (quantkit.kernels.launch_*) --------------------------------------------
class _BytesDriver:
    """Keeps each launch's configuration and its argument buffer, byte for byte."""

    def __init__(self):
        self.count, self.calls = 0, []

    def cuLaunchKernelEx(self, config, function, params, extra):
        cfg = ctypes.cast(config, ctypes.POINTER(cuda._Config))[0]
        p = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))
        assert all(p[i] == p[0] + 8 * i for i in range(self.count)), "one buffer, 8-byte slots"
        self.calls[-1].update(grid=tuple(cfg.grid), block=tuple(cfg.block), smem=cfg.shared_mem,
                              buffer=ctypes.string_at(p[0], 8 * self.count))
        return 0


@pytest.fixture
def driver(monkeypatch):
    """cuda.launch routed through the early-launch path into _BytesDriver; CPU tensors stand for device
    ones (their data pointers go into the buffer as device pointers would)."""
    fake = _BytesDriver()
    monkeypatch.setattr(cuda, "_driver", lambda: fake)
    monkeypatch.setattr(cuda, "_arg", lambda a: np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else a)

    def launch(kernel_name, module_name, grid, block, args, shared_mem=0, dependent=False):
        fake.count = len(args)
        fake.calls.append({"kernel": kernel_name, "module": module_name, "dependent": dependent})
        cuda._launch_ex(0, grid, block, args, shared_mem, 0)

    monkeypatch.setattr(cuda, "launch", launch)
    return fake


def _null(t):
    return np.uint64(0) if t is None else t


def _norm_args(norm):  # as int_weight_cuda had it before the named wrappers
    if norm is None:
        return np.uint64(0), np.uint64(0), np.float32(0.0), np.uint64(0)
    residual, weight, eps, h = norm
    return (_null(residual), weight, np.float32(eps), h if residual is not None else np.uint64(0))


def _t(*shape, dtype=torch.float16):
    return torch.zeros(*shape, dtype=dtype)


def _same(driver, positional, named):
    positional()
    named()
    old, new = driver.calls[-2:]
    assert new == old and len(new["buffer"]) > 0


@pytest.mark.parametrize("norm", ["off", "residual", "no residual"])
@pytest.mark.parametrize("split", [True, False])
def test_int_weight_gemv_wrapper_passes_the_positional_bytes(driver, norm, split):
    from quantkit.kernels import launch_int_weight_mma as w

    x2, words, scales, y = _t(1, 4096), _t(8, 128, 1, 32, 4, dtype=torch.int32), _t(8, 1, 1, 8, 4), _t(1, 256)
    zeros, b = (_t(8, 1, 1, 8, 4), _t(256)) if split else (None, None)
    ws, counters = (_t(8 * 3 * 32, dtype=torch.float32) if split else None), _t(4096, dtype=torch.int32)
    m, n, ns, rb, per, cmax, tr, sshift = 1, 256, 32, 8, 13, 3, np.int32(1), np.int32(31)
    h = _t(1, 4096)
    nargs = {"off": None, "residual": (_t(1, 4096), _t(4096), 1e-5, h), "no residual": (None, _t(4096), 1e-6, h)}[norm]
    common = (x2, words, scales, _null(zeros), _null(b), y)
    kw = {}
    if nargs is not None:
        kw = dict(res=nargs[0], nw=nargs[1], eps=nargs[2], h_out=h if nargs[0] is not None else None)
    _same(driver,
          lambda: cuda.launch("gemv", "int_weight_mma", (11,), (256,),
                              (*common, _null(ws), counters, np.int32(m), np.int32(n), np.int32(x2.shape[1]),
                               np.int32(ns), np.int32(rb), np.int32(x2.stride(0)), np.int32(n), tr, sshift,
                               np.int32(per), np.int32(cmax), *_norm_args(nargs)),
                              shared_mem=0 if nargs is None else 4096 * 2, dependent=split),
          lambda: w.int_weight_gemv("gemv", (11,), (256,), x=x2, w=words, scales=scales, zeros=zeros, bias=b, y=y,
                                    ws=ws, counters=counters, M=m, N=n, K=x2.shape[1], NS=ns, RB=rb, ldx=x2.stride(0),
                                    ldy=n, tr=int(tr), sshift=int(sshift), per=per, cmax=cmax,
                                    shared_mem=0 if nargs is None else 4096 * 2, dependent=split, **kw))


@pytest.mark.parametrize("split", [True, False])
def test_int_weight_mma_and_dequant_wrappers_pass_the_positional_bytes(driver, split):
    from quantkit.kernels import launch_int_weight_mma as w

    x2, words, scales, y = _t(40, 1000), _t(3, 32, 2, 32, 4, dtype=torch.int32), _t(3, 8, 4, 8, 4), _t(40, 70)
    zeros, b = (_t(3, 8, 4, 8, 4), None) if split else (None, _t(70))
    ws = _t(2, 40, 96, dtype=torch.float32) if split else None
    counters, m, n, ks, per_split = _t(4096, dtype=torch.int32), 40, 70, 32, 16
    tr, sshift, sps = np.int32(8), np.int32(0), np.int32(4)
    common = (x2, words, scales, _null(zeros), _null(b), y)
    _same(driver,
          lambda: cuda.launch("mma", "int_weight_mma", (3, 2, 5), (256,),
                              (*common, _null(ws), counters, np.int32(m), np.int32(n), np.int32(x2.shape[1]),
                               np.int32(ks // 4), np.int32(x2.stride(0)), np.int32(n), tr, sshift, sps,
                               np.int32(per_split)), shared_mem=46080),
          lambda: w.int_weight_mma("mma", (3, 2, 5), (256,), x=x2, w=words, scales=scales, zeros=zeros, bias=b, y=y,
                                   ws=ws, counters=counters, M=m, N=n, K=x2.shape[1], NS=ks // 4, ldx=x2.stride(0),
                                   ldy=n, tr=int(tr), sshift=int(sshift), sps=int(sps), steps_per_split=per_split,
                                   shared_mem=46080))
    out, rb = _t(96, 1024), 3
    _same(driver,
          lambda: cuda.launch("dequant", "int_weight_mma", (12,), (256,),
                              (words, scales, _null(zeros), out, np.int32(rb), np.int32(ks // 4), tr, sshift, sps)),
          lambda: w.int_weight_dequant("dequant", (12,), (256,), w=words, scales=scales, zeros=zeros, out=out, RB=rb,
                                       NS=ks // 4, tr=int(tr), sshift=int(sshift), sps=int(sps)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_engine_op_wrappers_pass_the_positional_bytes(driver, dtype):
    from quantkit.kernels import launch_engine_ops as e

    sfx = {torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
    t, h = 3, 576
    x, out, res_out, weight = _t(t, 2 * h, dtype=dtype)[:, :h], _t(t, h, dtype=dtype), _t(t, h, dtype=dtype), _t(h, dtype=dtype)
    for r in (_t(t, h, dtype=dtype), None):
        _same(driver,
              lambda: cuda.launch(f"add_rms_norm_{sfx}", "engine_ops", (t,), (1024,),
                                  (x, np.int32(x.stride(0)), r if r is not None else np.uint64(0),
                                   np.int32(r.stride(0) if r is not None else 0), weight, np.float32(1e-5), out,
                                   np.int32(h), res_out, np.int32(h), np.int32(h)), dependent=True),
              lambda: e.add_rms_norm((t,), (1024,), x=x, ldx=x.stride(0), res=r, ldr=r.stride(0) if r is not None else 0,
                                     w=weight, eps=1e-5, out=out, ldo=h, res_out=res_out, ldro=h, H=h))
    gu, i = _t(t, 2 * 1536, dtype=dtype), 1536
    gate, up, sout = gu[:, :i], gu[:, i:], _t(t, i, dtype=dtype)
    _same(driver,
          lambda: cuda.launch(f"silu_mul_{sfx}", "engine_ops", (18,), (256,),
                              (gate, up, np.int32(gate.stride(0)), sout, np.int32(i), np.int32(t)), dependent=True),
          lambda: e.silu_mul((18,), (256,), g=gate, u=up, ld_in=gate.stride(0), out=sout, I=i, rows=t))
    hq, hk, d = 9, 3, 64
    qkv = _t(t, (hq + 2 * hk) * d, dtype=dtype)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], -1)
    cos, sin, slots, q_out = _t(t, d, dtype=dtype), _t(t, d, dtype=dtype), _t(t, dtype=torch.int64), _t(t, hq, d, dtype=dtype)
    kc, vc = _t(32, hk, d, dtype=dtype), _t(32, hk, d, dtype=dtype)
    _same(driver,
          lambda: cuda.launch(f"rope_cache_{sfx}", "engine_ops", (5,), (256,),
                              (q, k, v, np.int32(q.stride(0)), cos, sin, np.int32(cos.stride(0)), slots, q_out, kc, vc,
                               np.int32(t), np.int32(hq), np.int32(hk), np.int32(d)), dependent=True),
          lambda: e.rope_cache((5,), (256,), q=q, k=k, v=v, ld_in=q.stride(0), cos=cos, sin=sin, ld_cs=cos.stride(0),
                               slots=slots, q_out=q_out, kc=kc, vc=vc, rows=t, Hq=hq, Hk=hk, D=d))
    rows, b, c = 6, 3, 130
    qa, ctx, pos, aout = _t(rows, hq, d, dtype=dtype), _t(b, c, dtype=torch.int64), _t(rows, dtype=torch.int64), _t(rows, hq, d, dtype=dtype)
    for splits in (1, 3):
        ws = counters = np.uint64(0)
        if splits > 1:
            ws, counters = _t(rows * hq, splits, d + 2, dtype=torch.float32), _t(4096, dtype=torch.int32)
        _same(driver,
              lambda: cuda.launch(f"paged_attention_{sfx}_g8", "engine_ops", (rows * hq, splits), (128,),
                                  (qa, kc, vc, ctx, np.int32(c), pos, aout, ws, counters, np.int32(rows // b),
                                   np.int32(hq), np.int32(hk), np.int32(d), np.int32(64), np.float32(0.125)),
                                  dependent=True),
              lambda: e.paged_attention((rows * hq, splits), (128,), G=8, q=qa, kc=kc, vc=vc, context=ctx, C=c, pos=pos,
                                        out=aout, ws=ws if splits > 1 else None,
                                        counters=counters if splits > 1 else None, S=rows // b, Hq=hq, Hk=hk, D=d,
                                        kps=64, scale=0.125))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("qdtype", [torch.float8_e4m3fn, torch.int8])
def test_quantizing_engine_op_wrappers_pass_the_signatures_bytes(driver, dtype, qdtype):
    from quantkit.kernels import launch_engine_ops as e

    sfx, qn = {torch.float16: "f16", torch.bfloat16: "bf16"}[dtype], {torch.int8: "int8"}.get(qdtype, "fp8")
    t, h = 3, 576
    x, res_out, weight = _t(t, 2 * h, dtype=dtype)[:, :h], _t(t, h, dtype=dtype), _t(h, dtype=dtype)
    q, scale, given = torch.zeros(t, h, dtype=qdtype), _t(t, 1, dtype=torch.float32), _t(1, dtype=torch.float32)
    for r, g in ((_t(t, h, dtype=dtype), None), (None, given)):
        _same(driver,
              lambda: cuda.launch(f"add_rms_norm_quant_{qn}_{sfx}", "engine_ops", (t,), (1024,),
                                  (x, np.int32(x.stride(0)), _null(r), np.int32(r.stride(0) if r is not None else 0),
                                   weight, np.float32(1e-5), np.float32(1.0), _null(g), q, scale, res_out, np.int32(h),
                                   np.int32(h)), dependent=True),
              lambda: e.add_rms_norm_quant((t,), (1024,), x=x, ldx=x.stride(0), res=r,
                                           ldr=r.stride(0) if r is not None else 0, w=weight, eps=1e-5, offset=1.0,
                                           given=g, q=q, scale=scale, res_out=res_out, ldro=h, H=h))
    gu, i = _t(t, 2 * 1536, dtype=dtype), 1536
    gate, up, qa = gu[:, :i], gu[:, i:], torch.zeros(t, i, dtype=qdtype)
    _same(driver,
          lambda: cuda.launch(f"silu_mul_quant_{qn}_{sfx}", "engine_ops", (t,), (384,),
                              (gate, up, np.int32(gate.stride(0)), np.uint64(0), qa, scale, np.int32(i)), dependent=True),
          lambda: e.silu_mul_quant((t,), (384,), g=gate, u=up, ld_in=gate.stride(0), given=None, q=qa, scale=scale, I=i))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_wrappers_pass_the_positional_bytes(driver, dtype):
    from quantkit.kernels.launch_quantize_rows import quantize_rows
    from quantkit.kernels.launch_scale_epilogue import scale_epilogue

    sfx = {torch.float32: "f32", torch.bfloat16: "bf16"}[dtype]
    x2, scales = _t(8, 256, dtype=dtype)[:, :200], _t(8, 1, dtype=torch.float32)
    for kind, qdtype in (("int8", torch.int8), ("fp8", torch.float8_e4m3fn)):
        q = torch.zeros(8, 200, dtype=qdtype)
        _same(driver,
              lambda: cuda.launch(f"quantize_rows_{kind}_{sfx}", "quantize_rows", (8,), (64,),
                                  (x2, np.int64(x2.stride(0)), q, scales, np.int32(200))),
              lambda: quantize_rows((8,), (64,), x=x2, ld=x2.stride(0), q=q, s=scales, K=200))
    acc, sx, sw, out = _t(20, 96, dtype=torch.int32)[:17], _t(17), _t(96), _t(17, 96, dtype=dtype)
    for bias in (None, _t(96, dtype=torch.float32)):
        b = bias if bias is not None else sw
        _same(driver,
              lambda: cuda.launch(f"scale_epilogue_{sfx}", "scale_epilogue", (7,), (256,),
                                  (acc, np.int64(acc.stride(0)), sx, sw, b, np.int32(bias is not None), out, np.int32(17),
                                   np.int32(96))),
              lambda: scale_epilogue((7,), (256,), acc=acc, lda=acc.stride(0), sx=sx, sw=sw, bias=b,
                                     has_bias=bias is not None, out=out, M=17, N=96))


def _cu_parameters(source: str, head: str) -> list[str]:
    """The parameter names of the extern "C" kernel whose signature follows `head` in a .cu file."""
    text = source[source.index(head) + len(head):]
    params = text[text.index("(") + 1:text.index(")")].replace("\\", " ")
    return [p.split()[-1].lstrip("*") for p in params.split(",")]


@pytest.mark.parametrize("cu,head,wrapper", [
    ("int_weight_mma", "int_weight_gemv_##SUFFIX##_nt##NT##_s##SPS##_e##EPI##_d##D##_w##W##_x##XP##_b##MB##_r##RBK##_n##NORM",
     "int_weight_mma.int_weight_gemv"),
    ("int_weight_mma", "__launch_bounds__(256) NAME", "int_weight_mma.int_weight_mma"),
    ("int_weight_mma", "int_weight_dequant_##SUFFIX", "int_weight_mma.int_weight_dequant"),
    ("int_weight_wgmma", "(256, BN > 128 ? 1 : 2)", "int_weight_wgmma.int_weight_wgmma"),
    ("int_weight_wgmma_ws", "(128 * WGS + 128, MINB)", "int_weight_wgmma.int_weight_wgmma_ws"),
    ("engine_ops", "add_rms_norm_##SUFFIX", "engine_ops.add_rms_norm"),
    ("engine_ops", "silu_mul_##SUFFIX", "engine_ops.silu_mul"),
    ("engine_ops", "rope_cache_##SUFFIX", "engine_ops.rope_cache"),
    ("engine_ops", "paged_attention_##SUFFIX##_g##G", "engine_ops.paged_attention"),
    ("engine_ops", "paged_attention_window_##SUFFIX##_g##G", "engine_ops.paged_attention_window"),
    ("engine_ops", "add_rms_norm_quant_##QN##_##SUFFIX", "engine_ops.add_rms_norm_quant"),
    ("engine_ops", "silu_mul_quant_##QN##_##SUFFIX", "engine_ops.silu_mul_quant"),
    ("quantize_rows", "quantize_rows_int8_##NAME", "quantize_rows.quantize_rows"),
    ("scale_epilogue", "scale_epilogue_##NAME", "scale_epilogue.scale_epilogue"),
    ("gptq_columns", "__global__ void gptq_columns", "gptq_columns.gptq_columns"),
    ("hadamard", "hadamard_blocks_##NAME", "hadamard.hadamard_blocks"),
])
def test_wrappers_name_the_kernels_parameters_in_order(cu, head, wrapper):
    import importlib
    import inspect

    module, name = wrapper.split(".")
    fn = getattr(importlib.import_module(f"quantkit.kernels.launch_{module}"), name)
    named = [p.name for p in inspect.signature(fn).parameters.values()
             if p.kind is p.KEYWORD_ONLY and p.name not in ("shared_mem", "dependent", "E", "G")]
    assert named == _cu_parameters((cuda.CSRC / f"{cu}.cu").read_text(), head)


def test_local_includes_are_pasted_once_into_the_compiled_text(tmp_path, monkeypatch):
    """cuda.source() gives CuPy the text with csrc/ headers in place (its cache key then covers
    them), each header once however often it is included."""
    (tmp_path / "a.cuh").write_text("int a;")
    (tmp_path / "b.cuh").write_text('#include "a.cuh"\nint b;')
    (tmp_path / "k.cu").write_text('#include <cuda_fp16.h>\n#include "a.cuh"\n  #include "b.cuh"\nint k;')
    monkeypatch.setattr(cuda, "CSRC", tmp_path)
    assert cuda.source("k") == "#include <cuda_fp16.h>\nint a;\nint b;\nint k;"


def test_shipped_sources_hold_no_local_include_after_pasting():
    for cu in sorted(cuda.CSRC.glob("*.cu")):
        text = cuda.source(cu.stem)
        assert not [line for line in text.splitlines() if cuda._LOCAL_INCLUDE.match(line)], cu.name
    assert "struct Magic" in cuda.source("int_weight_wgmma") and "struct Magic" in cuda.source("int_weight_mma")
