"""What stops a run before it does damage or wastes time: one line for a model that cannot be trained as asked,
types that disagree with the checkpoint's, a run folder in use or already finished, a folder that cannot be
written, and warnings for settings that defeat themselves."""

from __future__ import annotations

import functools
import logging
import subprocess
import sys
import time
from pathlib import Path

import conftest
import pytest
from conftest import cli_env, demo_subset
from test_training import tiny_run

from hsa_train.config import ConfigError, validate
from hsa_train.model.loading import check_model_source
from hsa_train.training.rundir import RunDirError, claim
from hsa_train.types import SemanticTypes

run_cli = functools.partial(conftest.run_cli, timeout=300)


def one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


# -- the model, checked before the data ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.arch.type=vit", "model.arch.type='vit' is not a causal language model"),
        ("model.arch.type=qwen2x", "model.arch.type='qwen2x' is not an architecture transformers knows; did you mean"),
        ("model.name_or_path=/no/such/model", "model.name_or_path=/no/such/model: no such folder"),
        ("model.name_or_path=nobody-xyz/no-such-model", "model.name_or_path=nobody-xyz/no-such-model: cannot read"),
    ],
)
def test_a_model_that_cannot_be_trained_is_one_line_before_the_data_loads(tmp_path, override, expected):
    """The data file does not exist: had the data been loaded first, that would be the error."""
    proc = run_cli(override, f"data.train_files=[{tmp_path / 'absent.jsonl'}]", cwd=tmp_path)
    assert proc.returncode == 2
    line = one_line(proc)
    assert line.startswith("hsa_train: error: " + expected), line
    assert "absent.jsonl" not in line


def _hsa_model_folder(path: Path, types: list[str], default: str) -> Path:
    from conftest import tiny_model

    from hsa_train import enable_hsa

    model = enable_hsa(tiny_model(), lambdas=dict.fromkeys(types, 0.05), types=types, default_type=default)
    model.save_pretrained(path)
    return path


def test_types_stored_in_the_checkpoint_must_match_the_run(tmp_path):
    folder = _hsa_model_folder(tmp_path / "m", ["TASK", "TOOL", "NOISE"], "NOISE")
    run, _ = tiny_run(tmp_path, f"model.name_or_path={folder}")
    with pytest.raises(ValueError) as err:
        check_model_source(run.model, SemanticTypes.from_names(run.hsa.types, run.hsa.default_type))
    message = str(err.value)
    assert "[TASK, TOOL, NOISE] (default NOISE)" in message
    assert "[GLOBAL_CONDITION, KEY_EVENT, PROCESS_NOISE] (default PROCESS_NOISE)" in message
    assert "hsa.types=[TASK,TOOL,NOISE] hsa.default_type=NOISE" in message
    check_model_source(run.model, SemanticTypes.from_names(["TASK", "TOOL", "NOISE"], "NOISE"))  # agreeing: fine


def test_an_internal_error_is_one_line_with_the_traceback_on_request(tmp_path):
    code = (
        "import sys; import hsa_train.training.loop as L\n"
        "def boom(*a, **k): raise KeyError('surprise')\n"
        "L.train = boom\n"
        "from hsa_train.__main__ import main\n"
        f"sys.argv = ['hsa_train', 'hydra.run.dir={tmp_path / 'run'}']\n"
        "main()\n"
    )
    cmd = [sys.executable, "-c", code]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert one_line(proc).startswith("hsa_train: internal error: KeyError: 'surprise' (HYDRA_FULL_ERROR=1 shows")
    full = subprocess.run(
        cmd, cwd=tmp_path, env={**cli_env(), "HYDRA_FULL_ERROR": "1"}, capture_output=True, text=True, timeout=300
    )
    assert "Traceback" in full.stderr and "KeyError: 'surprise'" in full.stderr


def test_help_says_what_the_app_does(tmp_path):
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert "Hierarchical Semantic Attention" in proc.stdout
    assert (
        "== Config groups" in proc.stdout
        and "experiment: agent_demo, agent_demo_dpo, agent_demo_rft, mqar, mqar_latest, recall, vl_demo" in proc.stdout
        and "stage: dpo, kto, sft" in proc.stdout
    )
    assert "python -m hsa_train -m hsa.lambdas.PROCESS_NOISE=0.0,0.05,0.2" in proc.stdout


def test_settings_that_defeat_themselves_are_warned(tmp_path, caplog):
    from hsa_train.training.loop import train

    run, resolved = tiny_run(tmp_path, "train.warmup_steps=3", "train.micro_batch_size=12")
    with caplog.at_level(logging.INFO, logger="hsa_train"):
        train(run, resolved, tmp_path / "run")
    assert "warning: train.warmup_steps=3 covers the whole run of 3 steps" in caplog.text
    assert "warning: the global batch (12 samples) is larger than the training set (9)" in caplog.text


# -- the run folder --------------------------------------------------------------------------------------------
def test_a_folder_is_locked_while_a_run_holds_it(tmp_path):
    run_dir = tmp_path / "run"
    held = claim(run_dir, run_dir / "checkpoints")
    with pytest.raises(RunDirError, match=r"is in use by a running run \(pid \d+ on "):
        claim(run_dir, run_dir / "checkpoints")
    for lock in held:
        lock.release()
    for lock in claim(run_dir, run_dir / "checkpoints"):  # free again
        lock.release()


def test_a_second_run_in_a_running_runs_folder_is_refused(tmp_path):
    """Two processes, one folder: the second stops at once with one line; the first is not disturbed."""
    data = demo_subset(tmp_path / "d.jsonl", 12)
    run_dir = tmp_path / "run"
    common = [f"data.train_files=[{data}]", "logging.progress=none", f"hydra.run.dir={run_dir}"]
    common += ["model.arch.hidden_size=32", "model.arch.intermediate_size=64", "model.arch.num_hidden_layers=1"]
    first = subprocess.Popen(
        [sys.executable, "-m", "hsa_train", *common, "train.max_steps=100000", "train.micro_batch_size=2"],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 200
        while not ((run_dir / "hsa_train.log").is_file() and "step" in (run_dir / "hsa_train.log").read_text()):
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.1)
        second = run_cli(*common, "train.max_steps=2", cwd=tmp_path)
        assert second.returncode == 2
        assert one_line(second).startswith(f"hsa_train: error: run directory {run_dir} is in use by a running run")
        assert first.poll() is None
    finally:
        first.kill()
        first.wait(timeout=60)


def test_a_finished_run_is_refused_unless_resumed(tmp_path):
    from hsa_train.training.loop import train

    run, resolved = tiny_run(tmp_path, "train.save_every=3")
    first = train(run, resolved, tmp_path / "run")
    with pytest.raises(RunDirError, match="already holds a finished run .*train.resume=auto"):
        train(run, resolved, tmp_path / "run")
    again, resolved = tiny_run(tmp_path, "train.save_every=3", "train.resume=auto")
    assert train(again, resolved, tmp_path / "run")["train_losses"] == first["train_losses"]


def test_resume_auto_with_nothing_to_resume_does_not_overwrite_a_finished_run(tmp_path):
    """No checkpoints were kept (save_every=0): 'auto' finds nothing, and starting over would overwrite the run."""
    from hsa_train.training.loop import train

    train(*tiny_run(tmp_path), tmp_path / "run")
    with pytest.raises(RunDirError, match="already holds a finished run .metrics.json. and no checkpoint to continue"):
        train(*tiny_run(tmp_path, "train.resume=auto"), tmp_path / "run")


def test_resume_auto_refuses_when_every_checkpoint_is_damaged(tmp_path):
    from hsa_train.training.loop import train

    train(*tiny_run(tmp_path, "train.save_every=1", "train.keep_last=null"), tmp_path / "run")
    for folder in (tmp_path / "run" / "checkpoints").iterdir():
        (folder / "trainer_state.json").write_text("{}")
    with pytest.raises(
        ValueError, match=r"train.resume=auto: no intact checkpoint in .* \(3 damaged; newest: incomplete"
    ):
        train(*tiny_run(tmp_path, "train.resume=auto"), tmp_path / "run")


@pytest.mark.parametrize("where", ["run", "checkpoints"])
def test_a_folder_that_cannot_be_written_stops_the_run_before_training(tmp_path, where):
    from hsa_train.training.loop import train

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    run_dir = blocker / "run" if where == "run" else tmp_path / "run"
    extra = [f"train.checkpoint_dir={blocker / 'ckpt'}"] if where == "checkpoints" else []
    run, resolved = tiny_run(tmp_path, *extra)
    with pytest.raises(RunDirError, match="is not writable"):
        train(run, resolved, run_dir)


def test_resume_allow_changes_is_validated_like_any_key():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="hsa_train.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["train.resume_allow_changes=[hsa.lambdas]"])
    assert validate(cfg).train.resume_allow_changes == ["hsa.lambdas"]
    with initialize_config_module(config_module="hsa_train.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["train.resume_allow_changes=[hsa.lamdas]"])
    with pytest.raises(ConfigError, match="'hsa.lamdas' names no config key"):
        validate(cfg)


def test_a_pretrained_model_trains_in_train_mode(tmp_path):
    """from_pretrained returns a model in eval mode; training must switch it (dropout, activation checkpointing)."""
    from transformers import AutoModelForCausalLM

    from hsa_train.model.loading import load_tokenizer
    from hsa_train.training.recipe import Recipe

    folder = _hsa_model_folder(tmp_path / "m", ["GLOBAL_CONDITION", "KEY_EVENT", "PROCESS_NOISE"], "PROCESS_NOISE")
    load_tokenizer(None).save_pretrained(folder)
    assert not AutoModelForCausalLM.from_pretrained(folder).training
    run, resolved = tiny_run(tmp_path, f"model.name_or_path={folder}", "train.gradient_checkpointing=true")
    recipe = Recipe(run, resolved, tmp_path / "run")
    try:
        recipe.setup()
        assert all(module.training for module in recipe.model.modules())
    finally:
        recipe.close(0)


def test_checkpoints_in_the_run_folder_itself_do_not_lock_the_run_out(tmp_path):
    for lock in claim(tmp_path / "run", tmp_path / "run"):
        lock.release()
