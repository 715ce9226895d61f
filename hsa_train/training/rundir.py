"""One run per folder: a run holds an exclusive lock on its run directory (and checkpoint directory) while it
lives, a run that starts from step 0 refuses a folder that already holds a finished run or checkpoints, and both
folders are checked for writing before any training, instead of failing at the first save."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK = ".hsa_train.lock"


class RunDirError(ValueError):
    """The run folder cannot be used; the message is one line."""


def _writable(folder: Path, what: str) -> None:
    """`folder` exists or can be created, and a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_probe_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"{what} {folder} is not writable ({exc.strerror or exc}); choose another folder") from None


class FolderLock:
    """An exclusive `flock` on `<folder>/.hsa_train.lock`, released when the process ends (even by kill -9)."""

    def __init__(self, folder: Path, what: str, override: str):
        self.folder, self.what, self.override = folder, what, override
        self._fd: int | None = None

    def acquire(self) -> None:
        path = self.folder / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirError(
                f"{self.what} {self.folder} is in use by a running run ({holder}); wait for it to end or choose "
                f"another folder ({self.override})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def claim(run_dir: Path, ckpt_root: Path) -> list[FolderLock]:
    """Locks the run folder (and the checkpoint folder when it lies elsewhere) for this run, after checking that
    both can be written; rank 0 only."""
    _writable(run_dir, "run directory")
    locks = [FolderLock(run_dir, "run directory", "hydra.run.dir=...")]
    if ckpt_root.resolve() not in (run_dir.resolve(), (run_dir / "checkpoints").resolve()):
        _writable(ckpt_root, "checkpoint directory")
        locks.append(FolderLock(ckpt_root, "checkpoint directory", "train.checkpoint_dir=..."))
    elif ckpt_root.exists():
        _writable(ckpt_root, "checkpoint directory")
    held: list[FolderLock] = []
    try:
        for lock in locks:
            lock.acquire()
            held.append(lock)
    except BaseException:
        for lock in held:
            lock.release()
        raise
    return held


def require_fresh(run_dir: Path, ckpt_root: Path, resume: str | None) -> None:
    """A run that starts from step 0 must not write over another run: refuses a folder whose run finished
    (metrics.json) or that holds checkpoints (with `train.resume=auto` that found none intact, too)."""
    continue_it = "continue it with train.resume=auto" if not resume else "check its checkpoints"
    if (run_dir / "metrics.json").exists():
        found = " and no checkpoint to continue from" if resume else ""
        raise RunDirError(
            f"run directory {run_dir} already holds a finished run (metrics.json){found}; choose another "
            f"hydra.run.dir{', or ' + continue_it if not resume else ''}"
        )
    if ckpt_root.is_dir() and any(p.name.startswith("step_") for p in ckpt_root.iterdir()):
        raise RunDirError(
            f"checkpoint directory {ckpt_root} already holds checkpoints of another run; {continue_it}, or choose "
            "another hydra.run.dir / train.checkpoint_dir"
        )
