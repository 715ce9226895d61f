"""Resume trusts nothing it finds: no code runs from a checkpoint, damaged contents are caught by checksum and
skipped with a reason, and a config or data change that would train differently is refused, naming the keys."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest
import torch
from test_resilience import _tiny_state
from test_training import tiny_run

from hsa_train.training import checkpoint
from hsa_train.training.distributed import DistInfo

INFO = DistInfo("none")


class Planted:
    """Unpickling this creates a file: the stand-in for any code an attacker plants in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _save(root: Path, step: int) -> Path:
    model, optimizer = _tiny_state(step)
    return checkpoint.save(root, step, model, optimizer, {"step": step}, INFO, keep_last=None)


def _reseal(folder: Path) -> None:
    """Rewrites the manifest for the folder's current files, as an attacker who edits a checkpoint would."""
    manifest = json.loads((folder / checkpoint.MANIFEST).read_text())
    manifest["files"] = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": checkpoint._sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != checkpoint.MANIFEST
    }
    (folder / checkpoint.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch notices the foreign pickle: that is the point
@pytest.mark.parametrize("target", ["rng_rank0.pt", "state/.metadata", "state/__0_0.distcp"])
def test_a_planted_pickle_runs_nothing_on_load(tmp_path, target):
    folder = _save(tmp_path / "ckpt", 2)
    marker = tmp_path / "pwned"
    (folder / target).write_bytes(pickle.dumps(Planted(marker)))
    _reseal(folder)
    model, optimizer = _tiny_state(0)
    with pytest.raises((ValueError, RuntimeError)):
        checkpoint.load(folder, model, optimizer, INFO)
    assert not marker.exists(), "loading a checkpoint executed code from it"


def test_overwritten_bytes_are_caught_by_checksum_and_the_older_checkpoint_is_used(tmp_path):
    root = tmp_path / "ckpt"
    for step in (2, 4):
        _save(root, step)
    shard = root / "step_0000004" / "state" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[64:128] = bytes(64)  # same size, other bytes: a bad disk block, a botched copy
    shard.write_bytes(bytes(data))
    assert checkpoint.is_complete(root / "step_0000004")  # sizes alone cannot tell
    assert "corrupt" in checkpoint.problem(root / "step_0000004")
    folder, skipped = checkpoint.newest_intact(root)
    assert folder.name == "step_0000002"
    assert skipped == [
        f"skipped checkpoint {root / 'step_0000004'}: corrupt: state/__0_0.distcp does not match its checksum"
    ]
    model, optimizer = _tiny_state(0)
    with pytest.raises(ValueError, match="corrupt"):
        checkpoint.load(root / "step_0000004", model, optimizer, INFO)


def test_trainer_state_and_rng_are_plain_data(tmp_path):
    folder = _save(tmp_path / "ckpt", 3)
    assert json.loads((folder / checkpoint.TRAINER_STATE).read_text()) == {"step": 3}
    torch.load(folder / "rng_rank0.pt", weights_only=True)  # raises if anything but tensors and plain data
    assert not (folder / "trainer.pt").exists()


# -- whole runs: config and data compared on resume -------------------------------------------------------------
def _train(tmp_path: Path, run_dir: Path, *extra: str) -> dict:
    from hsa_train.training.loop import train

    run, resolved = tiny_run(tmp_path, "train.save_every=1", "train.keep_last=null", *extra)
    return train(run, resolved, run_dir)


@pytest.fixture
def finished(tmp_path) -> Path:
    run_dir = tmp_path / "run"
    _train(tmp_path, run_dir)
    return run_dir


def test_resume_refuses_a_config_that_trains_differently(tmp_path, finished):
    ckpt = finished / "checkpoints" / "step_0000002"
    with pytest.raises(ValueError) as err:
        _train(tmp_path, tmp_path / "b", f"train.resume={ckpt}", "hsa.lambdas.PROCESS_NOISE=0.3", "train.lr=1e-3")
    message = str(err.value)
    assert "would train differently" in message and "\n" not in message
    assert "hsa.lambdas.PROCESS_NOISE: 0.1 -> 0.3" in message and "train.lr: 0.003 -> 0.001" in message
    assert "train.resume_allow_changes=[hsa.lambdas.PROCESS_NOISE,train.lr]" in message


def test_resume_refuses_other_training_data(tmp_path, finished):
    from conftest import demo_subset

    other = demo_subset(tmp_path / "other.jsonl", 10)
    ckpt = finished / "checkpoints" / "step_0000002"
    with pytest.raises(
        ValueError, match=r"\(data: 9 samples, sha256 \w+ -> 8 samples, sha256 \w+\);.*resume_allow_changes=\[data\]"
    ):
        _train(tmp_path, tmp_path / "b", f"train.resume={ckpt}", f"data.train_files=[{other}]")


def test_resume_accepts_more_steps_logging_and_named_changes(tmp_path, finished, caplog):
    ckpt = finished / "checkpoints" / "step_0000002"
    more = _train(tmp_path, tmp_path / "b", f"train.resume={ckpt}", "train.max_steps=4", "train.log_every=1")
    assert more["resumed_from"] == str(ckpt) and len(more["train_losses"]) == 4
    reference = json.loads((finished / "metrics.json").read_text())
    assert more["train_losses"][:2] == reference["train_losses"][:2]
    with caplog.at_level(logging.INFO, logger="hsa_train"):
        _train(
            tmp_path,
            tmp_path / "c",
            f"train.resume={ckpt}",
            "hsa.lambdas.PROCESS_NOISE=0.3",
            "train.resume_allow_changes=[hsa.lambdas]",
        )
    assert "resume: accepted change hsa.lambdas.PROCESS_NOISE: 0.1 -> 0.3" in caplog.text


def test_auto_resume_says_which_checkpoint_it_skipped(tmp_path, finished, caplog):
    newest = finished / "checkpoints" / "step_0000003"
    (newest / "trainer_state.json").write_text('{"step": 3, "oops": true}')  # same file, other content
    with caplog.at_level(logging.INFO, logger="hsa_train"):
        metrics = _train(tmp_path, finished, "train.resume=auto")
    assert metrics["resumed_from"] == str(finished / "checkpoints" / "step_0000002")
    assert f"skipped checkpoint {newest}: " in caplog.text


def test_a_garbled_trainer_state_is_one_line(tmp_path):
    folder = _save(tmp_path / "ckpt", 2)
    (folder / checkpoint.TRAINER_STATE).write_text("{not json")
    _reseal(folder)  # intact by checksum, unreadable by content
    model, optimizer = _tiny_state(0)
    with pytest.raises(ValueError, match=r"trainer_state.json cannot be read") as err:
        checkpoint.load(folder, model, optimizer, INFO)
    assert "\n" not in str(err.value)


def test_metadata_globals_cannot_reach_through_a_module(tmp_path):
    """Protocol 4 resolves dotted names: an allowed module's own imports (metadata.os.system) must not be reachable."""
    folder = _save(tmp_path / "ckpt", 2)
    marker = tmp_path / "pwned"
    payload = (
        b"\x80\x04"  # PROTO 4
        + b"\x8c\x25torch.distributed.checkpoint.metadata"  # SHORT_BINUNICODE module
        + b"\x8c\x07os.open"  # SHORT_BINUNICODE dotted name
        + b"\x93"  # STACK_GLOBAL
        + b"\x8c"
        + bytes([len(str(marker))])
        + str(marker).encode()
        + b"K\x41"  # BININT1 0o101 = O_WRONLY | O_CREAT
        + b"\x86R."  # TUPLE2, REDUCE, STOP
    )
    (folder / "state" / ".metadata").write_bytes(payload)
    _reseal(folder)
    model, optimizer = _tiny_state(0)
    with pytest.raises(ValueError, match="refusing to load torch.distributed.checkpoint.metadata.os.open"):
        checkpoint.load(folder, model, optimizer, INFO)
    assert not marker.exists()
