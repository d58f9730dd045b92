from quantkit.algorithms import awq, gptq, rtn, smoothquant  # noqa: F401  (importing fills the registry)
from quantkit.algorithms.base import ALGORITHMS, Algorithm, NoOptions, build, build_all, register

__all__ = ["ALGORITHMS", "Algorithm", "NoOptions", "build", "build_all", "register"]
