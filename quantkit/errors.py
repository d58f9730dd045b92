"""Errors a user can cause. The CLI turns each into one red line and exit code 1."""


class QuantkitError(Exception):
    """Base class for every user-facing quantkit error."""


class ModelLoadError(QuantkitError):
    """A model path, file or id that cannot be loaded."""


class UnsupportedModelError(QuantkitError):
    """An architecture quantkit has no family table for."""


class CheckpointError(QuantkitError):
    """A checkpoint that is missing, corrupted or not one quantkit can read."""


class OutputExistsError(QuantkitError):
    """An output directory that already exists (pass force=True / --force)."""


class NumericalError(QuantkitError):
    """NaN or Inf in a weight or an activation."""
