"""Training checkpoints that survive crashes and preemption, resume exactly, and never run code when loaded.

A checkpoint is a folder `step_NNNNNNN/` under the checkpoint root:
- `state/`: model and optimizer, written with `torch.distributed.checkpoint` (sharded under FSDP: each rank
  writes its own shards; the same code path for one process and for DDP);
- `trainer_state.json`: step, scheduler, data position, loss history, counters, the run's config (rank 0);
- `rng_rank<r>.pt`: every rank's RNG states (tensors, ints and lists only);
- `manifest.json`, written last: each file with its size and SHA-256.
Everything is written into `step_NNNNNNN.tmp/` and renamed when complete, so a crash leaves either a whole
checkpoint or a `.tmp` folder that is ignored. Resume checks every file against its checksum and falls back from a
damaged newest checkpoint to the newest intact one, saying which it skipped and why.

Loading executes nothing from the folder: the trainer state is JSON, tensors load with `weights_only=True`, and
DCP's pickled metadata goes through an unpickler that only builds DCP's own metadata classes.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
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
from hsa_train.types import one_line

STEP_DIR = re.compile(r"^step_(\d{7})$")
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
FORMAT = 2  # 1: trainer.pt (pickle) and sizes only; not loadable any more


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST]


_OWNED = re.compile(r"^(?:rng_rank(\d+)\.pt|state/__(\d+)_\d+\.distcp)$")


def owner(name: str, world: int) -> int:
    """The rank that writes file `name` of a checkpoint (and hashes and checks it): its RNG file and its DCP
    shard are each rank's own, the rest rank 0's. Checksums are spread over the ranks like the writing."""
    m = _OWNED.match(name)
    rank = int(m.group(1) or m.group(2)) if m else 0
    return rank if rank < world else 0


def _checksums(folder: Path, rank: int, world: int) -> dict[str, dict[str, Any]]:
    files = [p for p in _files(folder) if owner(str(p.relative_to(folder)), world) == rank]
    return {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}


def problem(folder: Path, contents: bool = True, rank: int = 0, world: int = 1) -> str | None:
    """Why `folder` is not a usable checkpoint (None if it is): no manifest, files missing, truncated or extra,
    or (with `contents`) a file whose bytes do not match its checksum. With `world` > 1 this rank hashes only the
    files it owns (see `verify`)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        expected = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable manifest (an interrupted save or a partial copy)"
    if manifest.get("format") != FORMAT:
        return f"written by an older hsa_train (checkpoint format {manifest.get('format', 1)}, this one reads {FORMAT})"
    actual = {str(p.relative_to(folder)): p for p in _files(folder)}
    missing = sorted(set(expected) - set(actual))
    if missing:
        return f"incomplete: {missing[0]} is missing"
    for name, path in actual.items():
        if name not in expected:
            return f"incomplete: {name} is not in the manifest"
        if path.stat().st_size != expected[name]["size"]:
            return f"incomplete: {name} has {path.stat().st_size} bytes, the manifest says {expected[name]['size']}"
    if contents:
        for name, path in actual.items():
            if owner(name, world) == rank and _sha256(path) != expected[name]["sha256"]:
                return f"corrupt: {name} does not match its checksum"
    return None


def verify(folder: Path, info: D.DistInfo | None = None) -> str | None:
    """`problem(folder)` with the hashing shared by all ranks (each checks the files it writes); every rank gets
    the same answer. A collective: all ranks call it."""
    info = info or D.DistInfo("none")
    answers = D.all_gather(problem(folder, rank=info.rank, world=info.world), info)
    return next((why for why in answers if why is not None), None)


def is_complete(folder: Path) -> bool:
    """Every file of the manifest is there with its size (cheap; `problem` also checks the contents)."""
    return problem(folder, contents=False) is None


def _step_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (sizes checked, not contents)."""
    return [p for p in _step_folders(root) if is_complete(p)]


def newest_intact(root: Path, info: D.DistInfo | None = None) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose every file matches its checksum, and a line for each newer one skipped.
    A collective under several ranks (see `verify`)."""
    skipped = []
    for folder in reversed(_step_folders(root)):
        why = verify(folder, info)
        if why is None:
            return folder, skipped
        skipped.append(f"skipped checkpoint {folder}: {why}")
    return None, skipped


# -- RNG --------------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors, ints and lists, so it loads with `weights_only=True`."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- safe DCP loading -------------------------------------------------------------------------------------------
_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    *(
        (_METADATA, name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "ChunkStorageMetadata",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata (dataclasses of sizes, dtypes and offsets) from an explicit list of classes and refuses
    any other global, so a planted `.metadata` cannot call anything. Dotted names are refused outright: pickle
    would follow them through a module's imports (`metadata.os.system`)."""

    def find_class(self, module: str, name: str):
        if "." not in name and (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and "." not in name:
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


def _safe_reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            rank = kwargs.get("rank")
            with open(self._get_metadata_path(rank), "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                from torch.distributed.checkpoint.metadata import StorageMeta

                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _safe_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(DefaultLoadPlanner):
        """DefaultLoadPlanner, but non-tensor entries (the optimizer's hyper-parameters) are read with
        `weights_only=True` instead of a full unpickle."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner()


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


def _states(model: nn.Module, optimizer: torch.optim.Optimizer, frozen_base: bool) -> dict[str, Any]:
    """{"model", "optim"}: what a checkpoint holds. With a frozen base (LoRA) the model part is the trained
    parameters themselves (DCP then loads into them in place), taken by name rather than through the model's
    state dict: a bitsandbytes int8 base adds state-dict entries (its scales) that are no attributes, which DCP's
    state-dict helpers cannot follow."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, get_state_dict

    options = _state_options(frozen_base)
    if not frozen_base:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        return {"model": model_sd, "optim": optim_sd}
    trained = {name: p.detach() for name, p in D.unwrap(model).named_parameters() if p.requires_grad}
    return {"model": trained, "optim": get_optimizer_state_dict(model, optimizer, options=options)}


# -- save / load ------------------------------------------------------------------------------------------------
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
    """Writes checkpoint `step` atomically on every rank; rank 0 prunes to the newest `keep_last` (None keeps all).
    `trainer_state` must be plain data (JSON)."""
    import torch.distributed.checkpoint as dcp

    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash during an earlier save of this step
        tmp.mkdir()
    D.barrier(info)
    with _single_process_is_intended():
        dcp.save(_states(model, optimizer, frozen_base), checkpoint_id=str(tmp / "state"), no_dist=info.world == 1)
    torch.save(rng_state(), tmp / f"rng_rank{info.rank}.pt")
    if info.is_main:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state))
    D.barrier(info)
    files = {}
    for part in D.all_gather(_checksums(tmp, info.rank, info.world), info):  # each rank hashes what it wrote
        files.update(part)
    if info.is_main:
        files = dict(sorted(files.items()))
        manifest = {"format": FORMAT, "step": step, "world": info.world, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep_last:
            for old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    D.barrier(info)
    return final


def trainer_state(folder: Path) -> dict[str, Any]:
    """The trainer state of checkpoint `folder` (plain JSON), read without loading any tensor."""
    try:
        return json.loads((folder / TRAINER_STATE).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"checkpoint {folder}: {TRAINER_STATE} cannot be read ({exc})") from None


def load(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    info: D.DistInfo,
    frozen_base: bool = False,
    verified: bool = False,
) -> dict[str, Any]:
    """Restores model, optimizer and this rank's RNG from `folder`; returns the trainer state. `verified`: the
    caller has already checked every checksum (`verify`, `newest_intact`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict, set_state_dict

    why = problem(folder, contents=False) if verified else verify(folder, info)
    if why is not None:
        raise ValueError(f"checkpoint {folder}: {why}; point train.resume elsewhere")
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("world", 1) != info.world:
        raise ValueError(
            f"checkpoint {folder} was written by {manifest.get('world')} ranks, this run has {info.world}; "
            "resume with the same number of processes"
        )
    try:
        saved = trainer_state(folder)
        rng = torch.load(folder / f"rng_rank{info.rank}.pt", weights_only=True)
    except (ValueError, pickle.UnpicklingError, RuntimeError, OSError) as exc:
        raise ValueError(f"checkpoint {folder} cannot be read ({one_line(exc, limit=200)})") from None
    options = _state_options(frozen_base)
    state = _states(model, optimizer, frozen_base)
    try:  # read it once ourselves: a refused global ends here with one line, not inside DCP's error handling
        with open(folder / "state" / ".metadata", "rb") as f:
            _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, OSError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"checkpoint {folder}: state/.metadata cannot be read ({exc})") from None
    try:
        with _single_process_is_intended():
            dcp.load(
                state, storage_reader=_safe_reader(folder / "state"), planner=_safe_planner(), no_dist=info.world == 1
            )
    except (Exception, CheckpointException) as exc:  # DCP wraps any failure in its own (a BaseException)
        raise ValueError(
            f"checkpoint {folder}: the model / optimizer state cannot be loaded ({one_line(exc, 'last', 300)})"
        ) from None
    if frozen_base:  # the trained parameters were loaded in place
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optim"], options=options)
    else:
        model_sd, optim_sd = state["model"], state["optim"]
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)
    set_rng_state(rng)
    return saved
