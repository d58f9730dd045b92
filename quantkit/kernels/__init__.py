"""Kernel entry points, each over the backends of one op in quantkit.kernels.registry.

    int_weight_matmul / prepare_int_weight   int_weight.py; backend "cuda": int_weight_cuda.py, the weight
                                             layout its kernels read (built at load): int_weight_layout.py
    w8a8_matmul / prepare_w8a8               w8a8.py; backend "torch": w8a8_torch.py
    engine_ops.add_rms_norm, rms_norm_matmul, silu_mul, rope_cache, paged_attention
                                             engine_ops.py; backends "cuda": engine_ops_cuda.py
                                             and (rms_norm_matmul) int_weight_cuda.py

The torch twins ("reference") live beside their entry points. The CUDA backends launch the
kernels of csrc/<name>.cu through launch_<name>.py: one wrapper per kernel, whose keyword
arguments are the kernel's parameters, named and ordered as in its `extern "C"` signature and
documented with dtype, shape and layout; it builds the argument tuple quantkit.kernels.cuda.launch
passes (tensors as device pointers, None as a null pointer, numbers as the signature's C types).
Launch policy (grid, block, shared memory, which instantiation) stays with the backend.
Importing this package registers every backend.
"""

from quantkit.kernels import engine_ops_cuda, gptq_columns_cuda, hadamard_cuda, int_weight_cuda, w8a8_torch  # noqa: F401  (register their backends)
from quantkit.kernels.engine_ops import rms_norm_matmul
from quantkit.kernels.int_weight import PreparedIntWeight, int_weight_matmul, prepare_int_weight
from quantkit.kernels.registry import Backend, backend, backends, register_backend, select_backend
from quantkit.kernels.w8a8 import PreparedW8A8, prepare_w8a8, w8a8_matmul

__all__ = [
    "Backend", "PreparedIntWeight", "PreparedW8A8", "backend", "backends", "int_weight_matmul", "prepare_int_weight",
    "prepare_w8a8", "register_backend", "rms_norm_matmul", "select_backend", "w8a8_matmul",
]
