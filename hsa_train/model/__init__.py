"""The HSA model side: everything that takes tensors (`semantic_ids`) and HSA settings, and nothing of files,
datasets or training. `enable_hsa` (hsa.py) is the way in; `settings.py` holds the settings, plain Python."""

from __future__ import annotations

from hsa_train.types import lazy_exports

_EXPORTS = {
    "enable_hsa": "hsa_train.model.hsa",
    "sync_hsa_config": "hsa_train.model.hsa",
    "HSASettings": "hsa_train.model.settings",
    "check_types": "hsa_train.model.settings",
    "model_types": "hsa_train.model.settings",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)  # resolved on first use: light modules stay light
