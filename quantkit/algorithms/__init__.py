from quantkit.algorithms import rtn  # noqa: F401  (fills the registry)
from quantkit.algorithms.base import ALGORITHMS, Algorithm, NoOptions, build, build_all, register

__all__ = ["ALGORITHMS", "Algorithm", "NoOptions", "build", "build_all", "register"]
