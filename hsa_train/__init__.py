"""hsa_train: fine-tuning with Hierarchical Semantic Attention.

The layers, bottom to top (an import only ever points down; tests/test_imports.py checks it):

    types      SemanticTypes, IGNORE_INDEX, every choice tuple, one_line (no torch, no transformers)
    model/     the HSA model side: settings, bias, forward context, mask plan, attention backends (eager / sdpa /
               flex), enable_hsa, generation, debug, loading and saving model folders, transformers compat
    data/      sources -> formats -> typing -> render -> SemanticTokenizer -> truncation -> Arrow store / cache ->
               collator
    config     the run config's schema and its early validation (no torch, no transformers)
    training/  the recipe, its step, loss, evaluation, checkpoints, distributed, export of a run's model
    CLIs       __main__ (train), generate, inspect, diagnose, sweep: thin mains over the library

One sample, file to loss, in the names the code uses:

    record      a dict as a source holds it, in any format (data/sources.py)
    Record      our messages: role, content parts, semantic_type, tools, and where it came from (data/loader.py)
    Sample      the encoded conversation: input_ids, labels, semantic_ids (+ media) as int32 arrays, the final
                answer's span, file:line (data/store.py); stored as one Arrow row, read back memory-mapped
    batch       samples padded (or packed) into tensors by the collator, the model's keyword arguments
"""

from __future__ import annotations

from typing import Any

from hsa_train.types import SemanticTypes

__all__ = ["enable_hsa", "HSASettings", "SemanticTypes"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`hsa_train.enable_hsa` and `hsa_train.HSASettings` without importing torch for the package itself (the
    config schema and the CLIs' --help stay light)."""
    if name == "enable_hsa":
        from hsa_train.model.hsa import enable_hsa

        return enable_hsa
    if name == "HSASettings":
        from hsa_train.model.settings import HSASettings

        return HSASettings
    raise AttributeError(f"module 'hsa_train' has no attribute {name!r}")
