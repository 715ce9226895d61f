"""Tokenized datasets kept on disk as Arrow files, memory-mapped when read, and found again by a key over
everything that decides their content.

The key covers the source's bytes (a SHA-256 of every file, remembered by path, size and modification time so an
unchanged file is not read again), the tokenizer (its vocabulary, merges, normaliser, special tokens and chat
template), the types, the dataset entry (format, columns, tags, type rules), the preprocessing settings (cutoff,
overlong, keep_types, train_on, on_error, ignore_keys) and the source code of the data pipeline itself: a change to
any of them builds a new entry, and nothing else does. An entry is written to a temporary folder and renamed into
place when complete, so a crash or a concurrent run never leaves a half-written entry that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from hsa_train.model.compat import fast_backend

CACHE_FORMAT = 1  # bump when the stored layout changes
META = "meta.json"


def default_root() -> Path:
    env = os.environ.get("HSA_TRAIN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "hsa_train" / "datasets"


def digest_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


class FileDigests:
    """SHA-256 of files, remembered in `<root>/file_digests.json` by (absolute path, size, mtime_ns): a rerun over
    unchanged files reads none of them, and any write to a file changes its size or time."""

    def __init__(self, root: Path | None):
        self.path = root / "file_digests.json" if root is not None else None
        self.memo: dict[str, list] = {}
        if self.path is not None and self.path.is_file():
            try:
                self.memo = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.memo = {}
        self.changed = False

    def __call__(self, path: Path) -> str:
        st = path.stat()
        key = str(path.resolve())
        seen = self.memo.get(key)
        if seen is not None and seen[0] == st.st_size and seen[1] == st.st_mtime_ns:
            return seen[2]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        self.memo[key] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
        self.changed = True
        return h.hexdigest()

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.memo))
        os.replace(tmp, self.path)
        self.changed = False


def source_digest(path: str, digests: FileDigests) -> str:
    """The content of a local file or folder (every file in it, by relative path), or, for a name that is not a
    local path (a `load_dataset` name), the name itself: the datasets library keeps and versions those."""
    p = Path(path)
    if p.is_file():
        return digests(p)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return digest_json([[str(f.relative_to(p)), digests(f)] for f in files])
    return digest_json(["name", path])


def tokenizer_digest(tokenizer: Any) -> str:
    """Everything of the tokenizer that changes ids: the backend (vocabulary, merges, normaliser, pre-tokenizer,
    added tokens), special tokens, chat template."""
    backend = fast_backend(tokenizer)
    parts = {
        "class": type(tokenizer).__name__,
        "backend": hashlib.sha256(backend.to_str().encode()).hexdigest() if backend is not None else None,
        "vocab": None if backend is not None else digest_json(sorted(tokenizer.get_vocab().items())),
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "template": tokenizer.chat_template,
    }
    return digest_json(parts)


def code_digest() -> str:
    """The data pipeline's own source (and the compat module it tokenizes through): a fix to how records become
    tokens invalidates what it built before. prepare.py reads it once, as it is imported with the modules it builds
    through: a long-running process (a benchmark's driver) whose files are edited under it keys what it builds by
    the code it runs, not by the newer files."""
    root = Path(str(resources.files("hsa_train")))
    files = sorted((root / "data").glob("*.py")) + [root / "types.py", root / "model" / "compat.py"]
    return digest_json([[f.name, hashlib.sha256(f.read_bytes()).hexdigest()] for f in files])


def entry_key(parts: Mapping[str, Any]) -> str:
    return digest_json({"format": CACHE_FORMAT, **parts})[:32]


def find(root: Path, key: str) -> Path | None:
    """The finished entry for `key`, or None."""
    folder = root / key
    return folder if (folder / META).is_file() else None


def staging(root: Path) -> Path:
    """A fresh folder to build an entry in (next to where it will live, so the final rename stays on one disk).
    Folders a crashed build left behind more than a day ago are removed on the way."""
    root.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in root.glob(".building-*"):
        if old.is_dir() and now - old.stat().st_mtime > 86400:
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=".building-", dir=root))


def publish(folder: Path, root: Path, key: str, meta: Mapping[str, Any]) -> Path:
    """Moves a built entry into place (its meta.json written last); if another process finished the same key
    first, keeps theirs: both hold the same content."""
    (folder / META).write_text(json.dumps(meta))
    final = root / key
    try:
        os.rename(folder, final)
    except OSError:
        if find(root, key) is None:
            raise
        shutil.rmtree(folder, ignore_errors=True)
    return final


def read_meta(folder: Path) -> dict[str, Any]:
    return json.loads((folder / META).read_text())
