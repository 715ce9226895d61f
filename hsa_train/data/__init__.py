"""The data side, file to batch: sources → formats → typing → render → SemanticTokenizer → truncation → Arrow
store and cache → collator. It uses the HSA settings (types), never attention."""

from __future__ import annotations

from hsa_train.types import lazy_exports

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

__getattr__ = lazy_exports(__name__, _EXPORTS)  # resolved on first use: light modules stay light
