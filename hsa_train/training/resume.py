"""Resume only what can continue: a checkpoint remembers the config and the training data it was written under,
and a resumed run that would train differently is refused, naming what changed.

A change alters the run's trajectory unless it is listed in SAFE_TO_CHANGE (more steps, logging, evaluation,
checkpoint cadence, the device or the wrapper). The training data are compared by a fingerprint of the encoded
samples (tokens, labels and types, in order), so a moved file with the same content resumes and a different file
behind the same name does not. `train.resume_allow_changes=[key, ...]` accepts named changes (a key, or a prefix
such as `hsa.lambdas`; `data` for the training data) for users who mean them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from hsa_train.config import flatten

# Keys (or prefixes) whose change leaves every step up to the checkpoint, and the ones after it, as they were.
SAFE_TO_CHANGE = (
    "train.max_steps",  # more steps: the schedule then decays to the new end
    "train.epochs",
    "train.log_every",
    "train.eval_every",
    "train.eval_batch_size",
    "train.save_every",
    "train.keep_last",
    "train.checkpoint_dir",
    "train.resume",
    "train.resume_allow_changes",
    "train.save_model",
    "train.skip_nonfinite",
    "train.stop_grace_s",
    "train.collective_timeout_s",
    "train.device",
    "train.distributed",
    "train.compile",
    "train.gradient_checkpointing",
    "hsa.backend",  # the same formula, another kernel
    "hsa.debug",  # logs and checks only
    "hsa.generated_type",  # generation only
    "eval",  # how the final evaluation scores answers
    "data.eval_files",  # evaluation only; a change to the training split shows in the data fingerprint
    "data.eval_sets",
    "data.pad_to_multiple_of",
    "logging",
    "export",
    "objective",
)
DATA = "data"  # the pseudo-key of the training data fingerprint


def _covered(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def trajectory_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (saved value, current value)} for every config key that differs and would change training. Data keys
    are left to the fingerprint; a new split of the same global batch (micro_batch_size x grad_accum) is no
    change, since the loss is normalised over the whole global batch."""
    old, new = flatten(saved), flatten(current)
    changed = {
        key: (old.get(key), new.get(key))
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key) and not _covered(key, SAFE_TO_CHANGE) and not _covered(key, (DATA,))
    }
    split = ("train.micro_batch_size", "train.grad_accum")
    if any(k in changed for k in split):
        product = [(o.get(split[0]) or 0) * (o.get(split[1]) or 0) for o in (old, new)]
        if product[0] == product[1]:
            for key in split:
                changed.pop(key, None)
    return changed


def check_resume(
    saved_config: Mapping[str, Any] | None,
    saved_data: Mapping[str, Any] | None,
    config: Mapping[str, Any],
    data: Mapping[str, Any],
    allowed: Iterable[str],
    where: str,
) -> list[str]:
    """Raises ValueError (one line) if resuming would train differently; returns a note per accepted change."""
    allowed = list(allowed)
    if saved_config is None or saved_data is None:
        raise ValueError(
            f"checkpoint {where} holds no config to compare with; resume it with the hsa_train that wrote it"
        )
    changes = {k: f"{_show(a)} -> {_show(b)}" for k, (a, b) in trajectory_changes(saved_config, config).items()}
    if saved_data != data:
        old = f"{saved_data.get('samples')} samples, sha256 {str(saved_data.get('sha256'))[:12]}"
        changes[DATA] = f"{old} -> {data['samples']} samples, sha256 {data['sha256'][:12]}"
    refused = {k: v for k, v in changes.items() if not _covered(k, allowed)}
    if refused:
        listed = "; ".join(f"{k}: {v}" for k, v in refused.items())
        raise ValueError(
            f"resuming {where} would train differently from the run that wrote it ({listed}); resume with the "
            f"same settings, or accept the change with train.resume_allow_changes=[{','.join(refused)}]"
        )
    return [f"resume: accepted change {k}: {v}" for k, v in changes.items()]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
