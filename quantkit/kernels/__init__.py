from quantkit.kernels.int_weight import (
    BACKENDS,
    PreparedIntWeight,
    int_weight_matmul,
    prepare_int_weight,
    register_backend,
    select_backend,
)

__all__ = ["BACKENDS", "PreparedIntWeight", "int_weight_matmul", "prepare_int_weight", "register_backend", "select_backend"]
