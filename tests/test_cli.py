"""`python -m hsa_train` as users run it: in a subprocess, from another working directory."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import demo_subset, run_cli
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hsa_train import enable_hsa

SMALL = [
    "model.arch.hidden_size=64",
    "model.arch.intermediate_size=128",
    "model.arch.num_hidden_layers=2",
    "train.micro_batch_size=4",
    "train.log_every=2",
    "train.warmup_steps=2",
    "logging.progress=plain",
]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("cli")
    run_dir = work / "run"
    proc = run_cli(*SMALL, "train.max_steps=12", f"hydra.run.dir={run_dir}", cwd=work)
    return proc, run_dir


def test_default_job_trains_and_saves(default_run):
    proc, run_dir = default_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 12
    assert metrics["train_loss_final"] < metrics["train_loss_first"] - 1.0
    assert set(metrics["eval_loss_per_type"]) == {"GLOBAL_CONDITION", "KEY_EVENT", "PROCESS_NOISE"}
    assert metrics["eval_loss"] > 0 and metrics["tokens_seen"] > 0
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert (run_dir / "model" / "tokenizer.json").is_file()
    assert (run_dir / "config.yaml").is_file()
    assert f"run directory: {run_dir}" in proc.stdout
    assert "eval: loss" in proc.stdout


def test_saved_model_reloads_with_its_hsa_settings(default_run):
    _, run_dir = default_run
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert model.config.hsa["lambdas"] == {"GLOBAL_CONDITION": 0.0, "KEY_EVENT": 0.01, "PROCESS_NOISE": 0.1}
    model = enable_hsa(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert model(input_ids=ids, semantic_ids=torch.zeros_like(ids)).logits.isfinite().all()


def test_finetunes_a_local_checkpoint(default_run, tmp_path):
    """model.name_or_path = a save_pretrained folder: the real-checkpoint path, with its own tokenizer."""
    _, run_dir = default_run
    pretrained = json.loads((run_dir / "metrics.json").read_text())
    data = demo_subset(tmp_path / "small.jsonl", 24)
    proc = run_cli(
        f"model.name_or_path={run_dir / 'model'}",
        f"data.train_files=[{data}]",
        "data.eval_ratio=0.25",
        "train.max_steps=2",
        "train.micro_batch_size=4",
        "hsa.lambdas.PROCESS_NOISE=0.2",
        f"hydra.run.dir={tmp_path / 'ft'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert metrics["samples_train"] == 18 and metrics["samples_eval"] == 6
    assert metrics["hsa"]["PROCESS_NOISE"] == 0.2
    # starts from the trained weights, not from a fresh initialisation
    assert metrics["train_loss_first"] < pretrained["train_loss_first"] - 1.0


def _stderr_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def test_bad_value_exits_with_one_line(tmp_path):
    proc = run_cli("train.lr=-1", cwd=tmp_path)
    assert proc.returncode != 0
    assert _stderr_lines(proc) == ["hsa_train: config error: train.lr=-1.0 must be a positive number"]


def test_unknown_key_exits_with_one_line_and_a_suggestion(tmp_path):
    proc = run_cli("train.max_stepz=3", "hsa.lambdas.PROCESS_NOISE=0.2", cwd=tmp_path)
    assert proc.returncode != 0
    (line,) = _stderr_lines(proc)
    assert line.startswith(
        "hsa_train: config error: unknown config key 'train.max_stepz' in 'train.max_stepz=3'; "
        "did you mean train.max_steps"
    )
    assert line.endswith("(to add a new key, write +train.max_stepz=3)")


def test_bad_data_file_exits_with_one_line(tmp_path):
    good = {"messages": [{"role": "user", "content": "Task"}, {"role": "assistant", "content": "ok"}]}
    bad = {"messages": [{"role": "user", "content": "x", "semantic_type": "URGENT"}]}
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good, good, bad]) + "\n")
    proc = run_cli(f"data.train_files=[{path}]", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode != 0
    lines = _stderr_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"hsa_train: data error: {path}:3: unknown semantic_type")
    assert not (tmp_path / "run" / "model").exists()


def test_plain_attention_and_learnable_lambda_runs(tmp_path):
    data = demo_subset(tmp_path / "small.jsonl", 16)
    common = [*SMALL, f"data.train_files=[{data}]", "data.eval_ratio=0.25", "train.max_steps=3"]
    plain = run_cli(*common, "hsa.enabled=false", f"hydra.run.dir={tmp_path / 'plain'}", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert json.loads((tmp_path / "plain" / "metrics.json").read_text())["hsa"] is None
    config = json.loads((tmp_path / "plain" / "model" / "config.json").read_text())
    # a plain run's folder carries λ = 0 for every type: it runs as it trained (plain), never with the default λ
    assert set(config["hsa"]["lambdas"].values()) == {0.0} and config["hsa"]["learnable"] is False

    learn = run_cli(*common, "hsa.learnable=true", "train.lr=0.05", f"hydra.run.dir={tmp_path / 'learn'}", cwd=tmp_path)
    assert learn.returncode == 0, learn.stderr[-3000:]
    saved = json.loads((tmp_path / "learn" / "model" / "config.json").read_text())["hsa"]
    assert saved["learnable"] is True
    assert saved["lambdas"] != {"GLOBAL_CONDITION": 0.0, "KEY_EVENT": 0.01, "PROCESS_NOISE": 0.1}  # they moved
    assert all(v >= 0 for v in saved["lambdas"].values())
    with safe_open(str(tmp_path / "learn" / "model" / "model.safetensors"), "pt") as weights:
        assert not [k for k in weights.keys() if k.startswith("hsa.")]  # λ live in the config only
