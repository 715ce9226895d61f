"""SIGTERM always ends a rank: one blocked in a collective of a hung (SIGSTOPped) peer never gets back to the
loop's stop flag, so the stop watchdog ends it after `train.stop_grace_s`; a hung peer with no signal at all fails
the run after `train.collective_timeout_s`; the surviving rank exits too, and no checkpoint is left half-written."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY_RUN, _descendants, _rank_logs, cli_env

from hsa_train.training import checkpoint

TINY = [
    *TINY_RUN,
    "train.max_steps=100000",  # never reached: the test stops it
    "train.stop_grace_s=5",
]
GRACE_LINE = (
    "hsa_train: rank {rank} got SIGTERM and could not stop cleanly within 5 s (blocked in a collective? a peer may "
    "be hung): exiting without a checkpoint"
)


def _gone(pid: int) -> bool:
    """Ended (a zombie its parent has not reaped yet counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _wait_gone(pid: int, timeout: float) -> float:
    """Seconds until `pid` ended; fails the test after `timeout`."""
    start = time.monotonic()
    while not _gone(pid):
        assert time.monotonic() - start < timeout, f"pid {pid} still running after {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - start


class Launch:
    """`torchrun` over 2 CPU ranks, not waited for: the test signals its ranks one by one. Leaving the context
    un-stops and kills whatever is left, so a failed assertion leaks no process."""

    def __init__(self, cwd: Path, *args: str):
        self.cwd, self.args = cwd, args
        self.logs = Path(tempfile.mkdtemp(prefix="torchrun-logs-", dir=cwd))
        self.ranks: dict[int, int] = {}  # rank -> pid

    def __enter__(self):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        cmd += ["--log-dir", str(self.logs), "--redirects", "3", "-m", "hsa_train", *self.args]
        self.out = (self.cwd / "torchrun.out").open("w+")
        self.proc = subprocess.Popen(cmd, cwd=self.cwd, env=cli_env(), stdout=self.out, stderr=subprocess.STDOUT)
        return self

    def wait_for(self, log: Path | str, text: str, timeout: float = 120) -> Path:
        """Waits until the run's log (a path, or a glob under cwd) says `text`; then finds both ranks' pids."""
        deadline = time.monotonic() + timeout
        while True:
            found = [log] if isinstance(log, Path) else list(self.cwd.glob(log))
            if any(p.is_file() and text in p.read_text(errors="replace") for p in found):
                break
            assert self.proc.poll() is None, f"torchrun ended early:\n{self.output()[-4000:]}"
            assert time.monotonic() < deadline, f"no {text!r} in the log after {timeout} s:\n{self.output()[-4000:]}"
            time.sleep(0.05)
        for pid in _descendants(self.proc.pid):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            rank = next((int(v[5:]) for v in env if v.startswith(b"RANK=")), None)
            if rank is not None:
                self.ranks[rank] = pid
        assert sorted(self.ranks) == [0, 1], self.ranks
        return found[0]

    def stderr(self, rank: int) -> list[str]:
        logs = sorted(self.logs.glob(f"**/attempt_*/{rank}/stderr.log"))
        return [line for line in logs[0].read_text(errors="replace").splitlines() if line.strip()] if logs else []

    def output(self) -> str:
        self.out.flush()
        return (self.cwd / "torchrun.out").read_text(errors="replace") + _rank_logs(self.logs, "stderr")

    def __exit__(self, *exc):
        for pid in {*self.ranks.values(), *_descendants(self.proc.pid)}:  # ranks first, then the launcher
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=60)
        self.out.close()


def test_sigterm_ends_a_rank_blocked_on_a_hung_peer(tmp_path, small_data):
    run_dir = tmp_path / "run"
    args = [*TINY, f"data.train_files=[{small_data}]", f"hydra.run.dir={run_dir}", "train.save_every=1"]
    # collectives wait longer than the grace period: what ends rank 0 is the stop watchdog, not gloo's timeout
    args += ["train.keep_last=3", "train.collective_timeout_s=120"]
    with Launch(tmp_path, *args) as run:
        run.wait_for(run_dir / "hsa_train.log", "checkpoint: ")  # both ranks step and save
        os.kill(run.ranks[1], signal.SIGSTOP)  # a hung peer: rank 0 blocks in the step's (or a save's) collective
        os.kill(run.ranks[0], signal.SIGTERM)
        took = _wait_gone(run.ranks[0], 60)
        print(f"rank 0 exited {took:.1f} s after SIGTERM")
        assert 4 < took < 60
        lines = run.stderr(0)
        assert [line for line in lines if "hsa_train" in line] == [GRACE_LINE.format(rank=0)], lines
        os.kill(run.ranks[1], signal.SIGCONT)  # the peer wakes to a dead rank 0 (and torchrun's SIGTERM)
        took = _wait_gone(run.ranks[1], 30)
        print(f"rank 1 exited {took:.1f} s after SIGCONT")
        (said,) = [line for line in run.stderr(1) if "hsa_train" in line]
        # gloo mostly notices the closed connection at once; a recv posted after it waits until the stop watchdog
        assert said.startswith("hsa_train: collective failed: ") or said == GRACE_LINE.format(rank=1), said
        assert run.proc.wait(timeout=60) != 0
        assert re.search(rf"exitcode\s*:\s*143 \(pid: {run.ranks[0]}\)", run.output()), run.output()[-4000:]
    root = run_dir / "checkpoints"
    saved = [p for p in root.iterdir() if checkpoint.STEP_DIR.match(p.name)]
    assert saved, sorted(root.iterdir())
    for folder in saved:  # what resume would take is whole; an interrupted save is only ever a .tmp folder
        assert checkpoint.problem(folder) is None, folder
    assert checkpoint.newest_intact(root)[0] == max(saved)


def test_a_hung_peer_fails_the_run_after_the_collective_timeout(tmp_path, small_data):
    """No signal: rank 0 waits `train.collective_timeout_s` on its frozen peer, not the 30 minutes of setup. No
    hydra.run.dir: the ranks join the process group before the config is read, and training still takes the
    config's timeout."""
    args = [*TINY, f"data.train_files=[{small_data}]", "train.save_every=0", "train.collective_timeout_s=3"]
    with Launch(tmp_path, *args) as run:
        run.wait_for("outputs/*/*/hsa_train.log", "step 1/")
        os.kill(run.ranks[1], signal.SIGSTOP)
        took = _wait_gone(run.ranks[0], 60)
        print(f"rank 0 failed {took:.1f} s after its peer froze")
        assert took < 30
        (said,) = [line for line in run.stderr(0) if "hsa_train" in line]
        assert said.startswith("hsa_train: collective failed: ") and "Timed out" in said, said
        assert "another rank died or hung" in said
        os.kill(run.ranks[1], signal.SIGCONT)
        _wait_gone(run.ranks[1], 30)
        assert run.proc.wait(timeout=60) != 0


SCRIPT = """
import os, sys
from hsa_train.training.loop import StopFlag
with StopFlag(grace_s=float(sys.argv[1])):
    print("ready", flush=True)
    os.read(os.pipe()[0], 1)  # never returns, as a collective of a hung peer: the flag is set but never read
"""


@pytest.mark.parametrize("case", ["grace", "second signal"])
def test_the_stop_watchdog_exits_when_the_loop_cannot(case):
    """One process, no torchrun: after the grace period, or on a signal that comes over a second after the first
    (one that comes at once is the same preemption forwarded twice), the watchdog exits with 128 + the signal."""
    grace = 2 if case == "grace" else 60
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(grace)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline() == "ready\n"
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        if case == "second signal":
            proc.send_signal(signal.SIGTERM)  # at once: not a second request
            time.sleep(1.5)
            assert proc.poll() is None
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - start
    finally:
        proc.kill()
        proc.wait()
    if case == "grace":
        assert proc.returncode == 128 + signal.SIGTERM and grace <= took < grace + 5
        expected = (
            "hsa_train: got SIGTERM and could not stop cleanly within 2 s (blocked in a collective? a peer may be "
            "hung): exiting without a checkpoint"
        )
    else:
        assert proc.returncode == 128 + signal.SIGINT and took < 5
        expected = "hsa_train: got a second SIGINT while stopping: exiting without a checkpoint"
    assert err.strip() == expected, err
