"""Errors a user can cause. The CLI turns each into one red line and exit code 1."""


class QuantkitError(Exception):
    """Base class for every user-facing quantkit error."""


class RecipeError(QuantkitError, ValueError):
    """A problem in a recipe or an algorithm's options that the user caused (and can fix).
    Also a ValueError, as it was before it joined QuantkitError."""


class ModelLoadError(QuantkitError):
    """A model path, file or id that cannot be loaded."""


class UnsupportedModelError(QuantkitError):
    """An architecture quantkit has no family table for."""


class CheckpointError(QuantkitError):
    """A checkpoint that is missing, corrupted or not one quantkit can read."""


class OutputError(QuantkitError):
    """An output location quantkit must not or cannot write: an input's folder, the
    home folder, the current directory, a filesystem root, an unwritable place."""


class OutputExistsError(OutputError):
    """An output folder that already exists and may not be replaced (force=True
    replaces only an empty folder or one quantkit wrote)."""


class NumericalError(QuantkitError):
    """NaN or Inf in a weight or an activation, or a quantized model whose
    perplexity blew up against the float model's."""


class DistributedError(QuantkitError):
    """A rank of a run over several processes failed: its message, and the kind of error it was."""

    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.kind = kind
