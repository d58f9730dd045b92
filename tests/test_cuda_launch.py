"""The programmatic-dependent-launch path of quantkit.kernels.cuda, checked on any machine with the
driver call replaced: the launch configuration and every argument reach cuLaunchKernelEx as the
CUDA headers lay them out."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

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
