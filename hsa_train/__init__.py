"""hsa_train: fine-tuning with Hierarchical Semantic Attention."""

from hsa_train.model.hsa import HSASettings, enable_hsa
from hsa_train.types import SemanticTypes

__all__ = ["enable_hsa", "HSASettings", "SemanticTypes"]
__version__ = "0.1.0"
