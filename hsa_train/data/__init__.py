"""The data side, file to batch: sources → formats → typing → render → SemanticTokenizer → truncation → Arrow
store and cache → collator. It uses the HSA settings (types), never attention."""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "SemanticTokenizer": "hsa_train.data.tokenizer",
    "SemanticCollator": "hsa_train.data.collator",
    "DataError": "hsa_train.data.sources",
    "LoadReport": "hsa_train.data.loader",
    "Record": "hsa_train.data.loader",
    "load_records": "hsa_train.data.loader",
    "IGNORE_INDEX": "hsa_train.types",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Exports resolved on first use, so `hsa_train.data.spec` (which the config schema reads) imports without
    torch."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hsa_train.data' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
