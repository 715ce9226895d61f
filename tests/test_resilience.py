"""Checkpoints and resume as a preempted cluster job meets them: kill -9, SIGTERM, a truncated checkpoint, NaN."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, cli_env
from safetensors.torch import load_file

from hsa_train.training import checkpoint
from hsa_train.training.distributed import DistInfo

TINY = [
    *TINY_RUN,
    "train.save_every=2",
    "train.keep_last=3",
]
STEPS = 40


def start(run_dir: Path, data: Path, *extra: str) -> subprocess.Popen:
    env = cli_env()
    args = [*TINY, f"data.train_files=[{data}]", f"train.max_steps={STEPS}", f"hydra.run.dir={run_dir}", *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "hsa_train", *args],
        env=env,
        cwd=run_dir.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen) -> Path:
    deadline = time.time() + 300
    while time.time() < deadline:
        found = checkpoint.newest_intact(run_dir / "checkpoints")[0]
        if found is not None:
            return found
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_data) -> Path:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    code, _, err = finish(start(run_dir, small_data))
    assert code == 0, err[-3000:]
    return run_dir


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_kill_9_then_resume_gives_the_uninterrupted_weights(tmp_path, small_data, uninterrupted):
    run_dir = tmp_path / "run"
    proc = start(run_dir, small_data)
    wait_for_checkpoint(run_dir, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (run_dir / "metrics.json").exists()  # it really died mid-run
    code, out, err = finish(start(run_dir, small_data, "train.resume=auto"))
    assert code == 0, err[-3000:]
    assert "resumed from" in (run_dir / "hsa_train.log").read_text()
    same_weights(run_dir, uninterrupted)
    resumed, reference = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, uninterrupted))
    assert resumed["train_losses"] == reference["train_losses"]
    assert resumed["eval_loss"] == reference["eval_loss"]


def test_sigterm_writes_a_loadable_checkpoint_and_exits_cleanly(tmp_path, small_data, uninterrupted):
    run_dir = tmp_path / "run"
    proc = start(run_dir, small_data, "train.save_every=0")  # no periodic checkpoints: the signal's is the only one
    deadline = time.time() + 300
    log = run_dir / "hsa_train.log"
    while not log.is_file() or f"step 1/{STEPS} " not in log.read_text():  # in training (setup's lines say "steps")
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc)
    assert code == 128 + signal.SIGTERM
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    (line,) = lines
    assert line.startswith("hsa_train: stopped: stopped by SIGTERM after step ")
    assert "continue with train.resume=auto" in line
    saved = checkpoint.newest_intact(run_dir / "checkpoints")[0]
    assert saved is not None and not (run_dir / "model").exists()
    code, _, err = finish(start(run_dir, small_data, "train.save_every=0", "train.resume=auto"))
    assert code == 0, err[-3000:]
    same_weights(run_dir, uninterrupted)


def _tiny_state(step: int):
    torch.manual_seed(step)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_truncated_or_partial_checkpoints_are_skipped(tmp_path):
    root, info = tmp_path / "ckpt", DistInfo("none")
    for step in (2, 4, 6):
        model, optimizer = _tiny_state(step)
        checkpoint.save(root, step, model, optimizer, {"step": step}, info, keep_last=None)
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step_0000002", "step_0000004", "step_0000006"]
    # the newest loses the end of a file (a copy cut short), a crash left a .tmp folder behind
    victim = next(p for p in (root / "step_0000006" / "state").iterdir() if p.suffix == ".distcp")
    victim.write_bytes(victim.read_bytes()[:-5])
    (root / "step_0000008.tmp").mkdir()
    assert checkpoint.newest_intact(root)[0].name == "step_0000004"
    model, optimizer = _tiny_state(0)
    with pytest.raises(ValueError, match="incomplete"):
        checkpoint.load(root / "step_0000006", model, optimizer, info)
    state = checkpoint.load(root / "step_0000004", model, optimizer, info)
    reference, _ = _tiny_state(4)
    assert state["step"] == 4 and torch.equal(model.weight, reference.weight)


def test_keep_last_prunes_old_checkpoints(tmp_path):
    root, info = tmp_path / "ckpt", DistInfo("none")
    for step in (1, 2, 3, 4):
        model, optimizer = _tiny_state(step)
        checkpoint.save(root, step, model, optimizer, {"step": step}, info, keep_last=2)
    assert [p.name for p in root.iterdir()] and sorted(p.name for p in root.iterdir()) == [
        "step_0000003",
        "step_0000004",
    ]
