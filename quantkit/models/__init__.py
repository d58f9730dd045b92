from quantkit.models.families import FAMILIES, Family, Mapping, family_for, supported_model_types
from quantkit.models.loader import (DEFAULT_MODEL, LoadedModel, check_weight_index, context_length, default_model_path,
                                   empty_model, load_config, load_lazily, load_model, resolve_source)

__all__ = [
    "DEFAULT_MODEL",
    "FAMILIES",
    "Family",
    "LoadedModel",
    "Mapping",
    "check_weight_index",
    "context_length",
    "default_model_path",
    "empty_model",
    "family_for",
    "load_config",
    "load_lazily",
    "load_model",
    "resolve_source",
    "supported_model_types",
]
