"""The HSA model side: everything that takes tensors (`semantic_ids`) and HSA settings, and nothing of files,
datasets or training. `enable_hsa` (hsa.py) is the way in; `settings.py` holds the settings, plain Python."""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "enable_hsa": "hsa_train.model.hsa",
    "sync_hsa_config": "hsa_train.model.hsa",
    "HSASettings": "hsa_train.model.settings",
    "check_types": "hsa_train.model.settings",
    "model_types": "hsa_train.model.settings",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Exports resolved on first use, so `hsa_train.model.settings` imports without torch."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hsa_train.model' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
