"""Training checkpoints that survive crashes and preemption, and resume exactly.

A checkpoint is a folder `step_NNNNNNN/` under the checkpoint root:
- `state/`: model and optimizer, written with `torch.distributed.checkpoint` (sharded under FSDP: each rank
  writes its own shards; the same code path for one process and for DDP);
- `trainer.pt`: step, scheduler, data position, loss history, counters (rank 0);
- `rng_rank<r>.pt`: every rank's RNG states;
- `manifest.json`, written last: each file and its size.
Everything is written into `step_NNNNNNN.tmp/` and renamed when complete, so a crash leaves either a whole
checkpoint or a `.tmp` folder that is ignored. A folder whose files do not match its manifest (truncated,
half-copied) is skipped in favour of the newest complete one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hsa_train.training import distributed as D

STEP_DIR = re.compile(r"^step_(\d{7})$")
MANIFEST = "manifest.json"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def _manifest(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def is_complete(folder: Path) -> bool:
    """The manifest exists and every file it lists is there with its recorded size."""
    try:
        expected = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    actual = _manifest(folder)
    actual.pop(MANIFEST, None)
    return actual == expected


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if is_complete(p)]


def latest(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def _single_process_is_intended():
    """DCP warns that it assumes one process when no process group exists; for us that is the plan."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _state_options(frozen_base: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # With LoRA the frozen base weights come from model.name_or_path: only what trains is checkpointed.
    return StateDictOptions(ignore_frozen_params=frozen_base, strict=not frozen_base)


def save(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    info: D.DistInfo,
    keep_last: int | None,
    frozen_base: bool = False,
) -> Path:
    """Writes checkpoint `step` atomically on every rank; rank 0 prunes to the newest `keep_last` (None keeps all)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash during an earlier save of this step
        tmp.mkdir()
    D.barrier(info)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_options(frozen_base))
    with _single_process_is_intended():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "state"), no_dist=info.world == 1)
    torch.save(rng_state(), tmp / f"rng_rank{info.rank}.pt")
    if info.is_main:
        torch.save(trainer_state, tmp / "trainer.pt")
    D.barrier(info)
    if info.is_main:
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "world": info.world, "files": _manifest(tmp)}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep_last:
            for old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    D.barrier(info)
    return final


def load(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    info: D.DistInfo,
    frozen_base: bool = False,
) -> dict[str, Any]:
    """Restores model, optimizer and this rank's RNG from `folder`; returns the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not is_complete(folder):
        raise ValueError(
            f"checkpoint {folder} is incomplete (files missing or truncated); point train.resume elsewhere"
        )
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("world", 1) != info.world:
        raise ValueError(
            f"checkpoint {folder} was written by {manifest.get('world')} ranks, this run has {info.world}; "
            "resume with the same number of processes"
        )
    options = _state_options(frozen_base)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    state = {"model": model_sd, "optim": optim_sd}
    with _single_process_is_intended():
        dcp.load(state, checkpoint_id=str(folder / "state"), no_dist=info.world == 1)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
    set_rng_state(torch.load(folder / f"rng_rank{info.rank}.pt", weights_only=False))
    return torch.load(folder / "trainer.pt", weights_only=False)
