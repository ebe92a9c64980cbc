"""Model loading (path, hub id or alias), architecture adapters and tiny test models."""

from meg_harness.models.adapters import ADAPTERS, ArchitectureAdapter, get_adapter
from meg_harness.models.loading import (
    ALIASES,
    DTYPES,
    default_cache_dir,
    load_model,
    model_fingerprint,
    parse_dtype,
    resolve_alias,
)
from meg_harness.models.tiny import TINY_ARCHS, make_tiny_model, make_tiny_tokenizer

__all__ = [
    "ADAPTERS",
    "ALIASES",
    "DTYPES",
    "TINY_ARCHS",
    "ArchitectureAdapter",
    "default_cache_dir",
    "get_adapter",
    "load_model",
    "make_tiny_model",
    "make_tiny_tokenizer",
    "model_fingerprint",
    "parse_dtype",
    "resolve_alias",
]
