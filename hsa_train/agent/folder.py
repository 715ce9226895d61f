"""A trained model folder opened for use: the model with HSA as trained, its SemanticTokenizer, and the typing
rules and truncation settings it was trained with (`hsa_rules.json`). generate, the agent runtime, the server
and rollouts all open folders here, so they all type and cut as training did."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from hsa_train.data.rules import MessageTyper, SavedRules
from hsa_train.data.tokenizer import SemanticTokenizer
from hsa_train.data.vision import folder_semantic_tokenizer
from hsa_train.model.export import load_exported
from hsa_train.model.hsa import enable_hsa
from hsa_train.model.loading import TORCH_DTYPES
from hsa_train.model.settings import HSASettings

log = logging.getLogger(__name__)


@dataclass
class Trained:
    """What a model folder holds, ready to run."""

    path: Path
    model: nn.Module
    st: SemanticTokenizer
    rules: SavedRules

    @property
    def settings(self) -> HSASettings:
        return HSASettings.of(base_model(self.model))

    @property
    def generated_type(self) -> str:
        """The type of generated tokens (`hsa.generated_type`, else the default type)."""
        return self.settings.generated_type or self.st.types.default

    def typer(self, dataset: str | None = None) -> MessageTyper:
        """Checks and types incoming messages by the saved rules of `dataset` (None: the default set)."""
        return MessageTyper(self.rules, self.st.types, dataset)

    @property
    def name(self) -> str:
        """The folder's name, or its run's for a run's model/ or adapter/."""
        return self.path.parent.name if self.path.name in ("model", "adapter") else self.path.name


def base_model(model: nn.Module) -> nn.Module:
    """A LoRA adapter's base model, else the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def load_trained(
    folder: str | Path, device: str = "cpu", dtype: str = "float32", backend: str | None = None, merge: bool = False
) -> Trained:
    """Opens a folder hsa_train wrote (`<run>/model`, `<run>/adapter`) or any causal LM folder. A run trained with
    hsa.enabled=false wrote λ = 0 for every type and runs plain attention, as it trained; a folder hsa_train did
    not write decodes with the default λ (said once); `backend` switches the attention kernel; `merge` folds a
    LoRA adapter into its base (faster decoding, the same function up to rounding)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder")
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(sorted(TORCH_DTYPES))}")
    model = load_exported(path, merge=merge, dtype=TORCH_DTYPES[dtype])
    base = base_model(model)
    if HSASettings.of(base) is None:
        log.warning("%s was not trained with HSA; running it with the default λ", folder)
    if HSASettings.of(base) is None or backend is not None:
        enable_hsa(base, backend=backend)
    model.to(device).eval()
    st = folder_semantic_tokenizer(str(path), base)
    rules = SavedRules.load(path)
    rules.check(st.types)
    return Trained(path, model, st, rules)
