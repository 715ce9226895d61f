"""Model side: the HSA bias, its attention backends, `enable_hsa`, and building / loading models."""

from hsa_train.model.hsa import HSASettings, check_types, enable_hsa, hsa_settings, model_types, sync_hsa_config

__all__ = ["enable_hsa", "HSASettings", "check_types", "hsa_settings", "model_types", "sync_hsa_config"]
