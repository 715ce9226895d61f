"""Shared fixtures: the shipped tokenizer, tiny random models, and the third-party data folder."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hsa_train.model.loading import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
PEER_DATA = ROOT.parent / "shared" / "peer-data" / "llamafactory"
# Runs started by the tests (in process or as subprocesses) keep their tokenized data here, not in ~/.cache.
os.environ["HSA_TRAIN_CACHE"] = tempfile.mkdtemp(prefix="hsa_train_test_cache_")


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
    worker itself)."""
    import os

    return dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1")


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    return demo_subset(tmp_path_factory.mktemp("data") / "small.jsonl", 40)
