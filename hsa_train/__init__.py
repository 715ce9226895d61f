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

One sample, file to loss, in the names the code uses (the README's layout section says the same):

    record      a dict as a source holds it, in any format (data/sources.py)
    Record      our messages (role, content with typed spans, semantic_type, tool calls, images) and tools, typed
                by the dataset's rules, with its file:line (data/loader.py)
    Sample      input_ids, labels, semantic_ids (+ pixel_values, image_grid_thw) as int32 arrays, the final
                answer's span, file:line (data/store.py); stored as one Arrow row, read back memory-mapped
    batch       samples padded (or packed) into tensors by the collator, with the attention mask and the one
                filler that keeps ranks in step: the model's inputs (data/collator.py)

Everything between (the tokenizer's render segments and pieces, the pipeline's pools and rows) is a view or a
helper of one of these four, named where it is used.
"""

from __future__ import annotations

from hsa_train.types import SemanticTypes, lazy_exports

__all__ = ["enable_hsa", "HSASettings", "SemanticTypes"]
__version__ = "0.1.0"

# `hsa_train.enable_hsa` and `hsa_train.HSASettings` without importing torch for the package itself: the config
# schema and the CLIs' --help stay light
__getattr__ = lazy_exports(__name__, {"enable_hsa": "hsa_train.model.hsa", "HSASettings": "hsa_train.model.settings"})
