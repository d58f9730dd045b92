"""Where quantkit's data lives: the shipped recipes, the CUDA sources, the bundled corpora.

They sit at the repository root (``recipes/``, ``csrc/``, ``calibration/``) and
ship inside the wheel as package data (pyproject.toml maps them to
``quantkit/recipes``, ``quantkit/csrc`` and ``quantkit/data/calibration``). The
package's own folder comes from ``importlib.resources``; each folder is looked
up inside it first (an installed wheel), then beside it (a checkout: an
editable install, or ``PYTHONPATH=.`` as on the GPU machine). setuptools'
editable installs cannot import data folders that package-dir maps from
elsewhere, so the checkout needs that second place. Callers never build these
paths from ``__file__``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["calibration_dir", "csrc_dir", "recipes_dir"]


def _folder(packaged: str, checkout: str) -> Path:
    """`packaged` inside the quantkit package if it is there, else `checkout` beside the
    package; the packaged place when neither exists, so that errors name where an
    installed quantkit keeps it."""
    root = resources.files("quantkit")
    if not isinstance(root, Path):  # a zipped install: CuPy and the loaders need real files
        raise RuntimeError(f"quantkit is installed as {root!r}; it needs a plain folder install (pip install)")
    inside = root.joinpath(*packaged.split("/"))
    beside = root.parent / checkout
    return inside if inside.is_dir() or not beside.is_dir() else beside


def recipes_dir() -> Path:
    """The shipped recipes (``*.yaml``; benchmark variants in ``ablations/``)."""
    return _folder("recipes", "recipes")


def csrc_dir() -> Path:
    """The CUDA sources (``*.cu``, ``*.cuh``) compiled at run time by quantkit.kernels.cuda."""
    return _folder("csrc", "csrc")


def calibration_dir() -> Path:
    """The bundled corpora: ``datasets.json`` and the texts it names."""
    return _folder("data/calibration", "calibration")
