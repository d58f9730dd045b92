from quantkit.kernels.int_weight import (
    BACKENDS,
    PreparedIntWeight,
    int_weight_matmul,
    prepare_int_weight,
    register_backend,
    select_backend,
)
from quantkit.kernels import int_weight_cuda  # noqa: F401  (registers the "cuda" backend)
from quantkit.kernels.w8a8 import PreparedW8A8, prepare_w8a8, w8a8_matmul

__all__ = [
    "BACKENDS", "PreparedIntWeight", "PreparedW8A8", "int_weight_matmul", "prepare_int_weight", "prepare_w8a8",
    "register_backend", "select_backend", "w8a8_matmul",
]
