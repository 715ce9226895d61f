"""Model side: the HSA bias, its attention backends, `enable_hsa`, and building / loading models."""

from hsa_train.model.hsa import HSASettings, enable_hsa, hsa_settings, sync_hsa_config

__all__ = ["enable_hsa", "HSASettings", "hsa_settings", "sync_hsa_config"]
