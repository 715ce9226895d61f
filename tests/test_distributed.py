"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 give the single-process losses and evaluation over the same
global batch, and FSDP's sharded checkpoints resume exactly. Evaluation is split unevenly on purpose (5 held-out
samples in batches of 2 over 2 ranks, and an eval set of one record): every forward is a collective, so a rank
with fewer batches than the other would hang the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_ran, demo_subset, run_cli, run_torchrun

COMMON = [
    "model.arch.hidden_size=32",
    "model.arch.intermediate_size=64",
    "model.arch.num_hidden_layers=2",
    "data.eval_ratio=0.125",  # 5 of 40 records: ranks get 3 and 2, in batches of 2 -> 2 and 1 forwards
    "train.eval_batch_size=2",
    "train.eval_every=3",  # evaluation mid-run too, between training steps
    "train.max_steps=6",
    "logging.progress=none",
    "hsa.learnable=true",  # λ are parameters too: they must train the same under DDP and FSDP
]
TIMEOUT = 300  # a hang fails here, well before CI's limit


@pytest.fixture(scope="module")
def data(small_data) -> Path:
    return small_data


def launch(run_dir: Path, data: Path, *extra: str, nproc: int = 1) -> dict:
    one = data.with_name("one.jsonl")  # an eval set smaller than the world: one rank has a record, one has none
    if not one.exists():
        demo_subset(one, 1)
    args = [*COMMON, f"data.train_files=[{data}]", f"+data.eval_sets.one=[{one}]", f"hydra.run.dir={run_dir}", *extra]
    if nproc == 1:
        proc = run_cli(*args, cwd=run_dir.parent, timeout=TIMEOUT)
    else:
        proc = run_torchrun(*args, cwd=run_dir.parent, nproc=nproc, timeout=TIMEOUT)
    assert_ran(proc)
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory, data) -> dict:
    """One process, micro-batch 4: the same global batch as 2 ranks x 2, or 2 ranks x 1 x 2 accumulation."""
    return launch(tmp_path_factory.mktemp("single") / "run", data, "train.micro_batch_size=4")


def exported_logits(model_dir: Path) -> torch.Tensor:
    from hsa_train.model.export import load_exported

    torch.manual_seed(0)
    ids = torch.randint(0, 2000, (2, 24))
    with torch.no_grad():
        return load_exported(model_dir)(input_ids=ids, semantic_ids=torch.randint(0, 3, (2, 24))).logits


def assert_same_losses(run: dict, ref: dict) -> None:
    assert len(run["train_losses"]) == len(ref["train_losses"]) == 6
    for a, b in zip(run["train_losses"], ref["train_losses"]):
        assert a == pytest.approx(b, abs=1e-5)
    assert run["eval_loss"] == pytest.approx(ref["eval_loss"], abs=1e-5)
    assert run["samples_eval"] == ref["samples_eval"] == 5
    # decoded answers (eval.generate) match teacher forcing in exact match; token accuracy differs after a miss
    same = (
        ("eval_exact_match",)
        if run.get("eval_answers_by") == "generation"
        else ("eval_exact_match", "eval_answer_token_accuracy")
    )
    for key in same:
        assert run[key] == pytest.approx(ref[key], abs=1e-9), key
    assert run["eval_sets"]["one"]["answers"] == ref["eval_sets"]["one"]["answers"] == 1
    assert run["eval_sets"]["one"]["loss"] == pytest.approx(ref["eval_sets"]["one"]["loss"], abs=1e-5)
    learned = [
        json.loads((Path(r["run_dir"]) / "model" / "config.json").read_text())["hsa"]["lambdas"] for r in (run, ref)
    ]
    assert learned[0] == pytest.approx(learned[1], abs=1e-6) and learned[1]["PROCESS_NOISE"] != 0.1


def test_ddp_matches_single_process(tmp_path, data, single):
    run = launch(
        tmp_path / "ddp", data, "train.micro_batch_size=1", "train.grad_accum=2", "eval.generate=true", nproc=2
    )  # the final answers decoded for real on each rank's share: the same exact match as teacher forcing
    assert run["distributed"] == "ddp" and run["world_size"] == 2 and run["eval_answers_by"] == "generation"
    assert run["tokens_seen"] == single["tokens_seen"]
    assert_same_losses(run, single)


def test_fsdp_matches_single_process_and_resumes_from_sharded_checkpoints(tmp_path, data, single):
    run = launch(
        tmp_path / "fsdp",
        data,
        "train.micro_batch_size=2",
        "train.distributed=fsdp",
        "train.save_every=2",
        "train.keep_last=null",
        "train.gradient_checkpointing=true",  # with learnable λ: the bias is shared across recomputed layers
        nproc=2,
    )
    assert run["distributed"] == "fsdp"
    assert_same_losses(run, single)
    mid = tmp_path / "fsdp" / "checkpoints" / "step_0000004"
    assert sorted(p.name for p in (mid / "state").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # sharded
    resumed = launch(
        tmp_path / "resumed",
        data,
        "train.micro_batch_size=2",
        "train.distributed=fsdp",
        "train.gradient_checkpointing=true",
        f"train.resume={mid}",
        "eval.generate=true",  # ranks decode in step (synced), one of them with filler batches only
        nproc=2,
    )
    assert resumed["resumed_from"] == str(mid) and resumed["eval_answers_by"] == "generation"
    assert resumed["eval_exact_match"] == run["eval_exact_match"]
    assert resumed["eval_sets"]["one"]["exact_match"] == run["eval_sets"]["one"]["exact_match"]
    assert resumed["train_losses"] == run["train_losses"]
    assert resumed["eval_loss"] == pytest.approx(run["eval_loss"], abs=1e-9)
    # the model FSDP gathered and exported is the one single-process training produced
    torch.testing.assert_close(
        exported_logits(tmp_path / "resumed" / "model"),
        exported_logits(Path(single["run_dir"]) / "model"),
        atol=1e-4,
        rtol=1e-4,
    )


def test_ranks_share_one_timestamped_run_directory(tmp_path, data):
    """Without hydra.run.dir each rank's Hydra would stamp its own folder; rank 0's stamp wins everywhere."""
    proc = run_torchrun(*COMMON, "train.max_steps=2", f"data.train_files=[{data}]", cwd=tmp_path, timeout=TIMEOUT)
    assert_ran(proc)
    (run_dir,) = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert (run_dir / "metrics.json").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert json.loads((run_dir / "metrics.json").read_text())["world_size"] == 2


def test_a_sweep_under_torchrun_is_refused(tmp_path):
    env = dict(os.environ, WORLD_SIZE="2", RANK="0")
    proc = subprocess.run(
        [sys.executable, "-m", "hsa_train", "-m", "hsa.lambdas.PROCESS_NOISE=0,0.1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "would make every rank run the whole sweep" in proc.stderr


def test_submitit_tasks_become_ranks(monkeypatch):
    pytest.importorskip("submitit")
    from hsa_train.training.distributed import adopt_submitit_env

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "unset")  # so that monkeypatch restores each of them, whatever export() sets
        monkeypatch.delenv(key)
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "77",
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "3",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NODEID": "0",
    }
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    adopt_submitit_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "8", "3")
    assert os.environ["MASTER_ADDR"] == "node1"


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="hsa_train.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8


@pytest.mark.parametrize(
    "outcome, code, printed",
    [
        (None, 0, ""),
        (SystemExit(2), 2, ""),  # _fail's one-line errors
        (SystemExit(None), 0, ""),
        (SystemExit("stopped by hand"), 1, "stopped by hand"),
        (KeyboardInterrupt(), 130, ""),
        (RuntimeError("a bug"), 1, "RuntimeError: a bug"),  # its traceback, as Python prints it
    ],
)
def test_a_rank_leaves_with_the_exit_code_the_interpreter_would_give(monkeypatch, capsys, outcome, code, printed):
    import hsa_train.__main__ as entry
    import hsa_train.training.distributed as D

    def run():
        if outcome is not None:
            raise outcome

    class Left(Exception):
        pass

    def leave(value):
        raise Left(value)

    monkeypatch.setattr(entry, "run", run)
    monkeypatch.setattr(D, "leave", leave)
    with pytest.raises(Left) as left:
        entry._run_as_rank()
    assert left.value.args == (code,)
    err = capsys.readouterr().err
    assert (printed in err) if printed else err == ""


def test_leave_runs_exit_handlers_and_flushes_before_it_exits(tmp_path):
    """`leave` skips only the interpreter's teardown: atexit handlers run, buffered output is not lost."""
    script = (
        "import atexit, pathlib, sys\n"
        "from hsa_train.training.distributed import leave\n"
        f"atexit.register(pathlib.Path({str(tmp_path / 'handler_ran')!r}).touch)\n"
        "sys.stdout.write('buffered, no newline')\n"
        "leave(3)\n"
        "print('never')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert proc.stdout == "buffered, no newline"
    assert (tmp_path / "handler_ran").is_file()
