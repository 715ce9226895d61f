"""The agent runtime: a trained model folder run turn by turn (sessions that keep their KV cache, batched
replies, truncation as training cuts), and the environments agents act in (`envs/`). The server
(`hsa_train.serve`) and rollouts (`hsa_train.rollout`) are CLIs over it."""

from __future__ import annotations

from hsa_train.types import lazy_exports

_EXPORTS = {
    "Agent": "hsa_train.agent.session",
    "Session": "hsa_train.agent.session",
    "Reply": "hsa_train.agent.session",
    "DecodeOptions": "hsa_train.agent.decoding",
    "Trained": "hsa_train.agent.folder",
    "load_trained": "hsa_train.agent.folder",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)  # resolved on first use: light modules stay light
