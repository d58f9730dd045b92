from quantkit.models.families import FAMILIES, Family, Mapping, family_for, supported_model_types
from quantkit.models.loader import DEFAULT_MODEL, LoadedModel, default_model_path, load_config, load_model, resolve_source

__all__ = [
    "DEFAULT_MODEL",
    "FAMILIES",
    "Family",
    "LoadedModel",
    "Mapping",
    "default_model_path",
    "family_for",
    "load_config",
    "load_model",
    "resolve_source",
    "supported_model_types",
]
