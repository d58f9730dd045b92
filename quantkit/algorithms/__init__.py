from quantkit.algorithms import awq, gptq, rotation, rtn, smoothquant  # noqa: F401  (importing fills the registry)
from quantkit.algorithms.base import (ALGORITHMS, Chain, NoOptions, Observer, Rotation, Rounder, Rounding, Scales, Step, Transform,
                                      build, build_all, register)

__all__ = ["ALGORITHMS", "Chain", "NoOptions", "Observer", "Rotation", "Rounder", "Rounding", "Scales", "Step", "Transform", "build",
           "build_all", "register"]
