"""A 2x1 λ sweep with Hydra multirun: one directory and metrics.json per job, and the sorted summary."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, cli_env

from hsa_train.sweep import metric_value, sort_rows, write_summary

TINY = [
    "model.arch.hidden_size=32",
    "model.arch.intermediate_size=64",
    "model.arch.num_hidden_layers=1",
    "train.max_steps=2",
    "train.micro_batch_size=2",
    "data.eval_ratio=0.2",
    "logging.progress=none",
]


def test_sweep_writes_jobs_and_a_sorted_summary(tmp_path, small_data):
    sweep_dir = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "hsa_train",
        "-m",
        "hsa.lambdas.PROCESS_NOISE=0.0,0.3",
        "hsa.lambdas.KEY_EVENT=0.01",
        *TINY,
        f"data.train_files=[{small_data}]",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = {d.name: json.loads((d / "metrics.json").read_text()) for d in sorted(sweep_dir.glob("[0-9]*"))}
    assert sorted(metrics) == ["0", "1"]
    assert [m["hsa"]["PROCESS_NOISE"] for m in metrics.values()] == [0.0, 0.3]
    with (sweep_dir / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["eval_loss"]) for r in rows] == sorted(m["eval_loss"] for m in metrics.values())
    assert {r["hsa.lambdas.PROCESS_NOISE"] for r in rows} == {"0.0", "0.3"}
    assert "hsa.lambdas.KEY_EVENT" not in rows[0]  # not varied: not a column
    markdown = (sweep_dir / "summary.md").read_text()
    assert "sorted by eval_loss" in markdown and markdown.count("\n| ") == 3  # header + 2 jobs
    assert "sweep summary:" in proc.stdout


def test_a_failed_job_does_not_stop_the_sweep(tmp_path, small_data):
    """A bad value in one job: that job fails with its one-line reason, the others run, the summary lists both,
    and the sweep exits non-zero."""
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "hsa_train", "-m", "hsa.lambdas.PROCESS_NOISE=-1,0.1", *TINY]
    cmd += [f"data.train_files=[{small_data}]", f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode != 0
    assert "hsa_train: config error: hsa:" in proc.stderr and "PROCESS_NOISE" in proc.stderr
    assert not (sweep_dir / "0" / "metrics.json").exists() and (sweep_dir / "1" / "metrics.json").is_file()
    with (sweep_dir / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["status"]) for r in rows] == [("1", "ok"), ("0", "no metrics (failed or running)")]


def test_optuna_searches_the_lambdas(tmp_path, small_data):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the [optuna] extra is not installed")
    sweep_dir = tmp_path / "optuna"
    cmd = [sys.executable, "-m", "hsa_train", "-m", "hydra/sweeper=lambdas", "hydra.sweeper.n_trials=3", *TINY]
    cmd += [f"data.train_files=[{small_data}]", f"hydra.sweep.dir={sweep_dir}", "objective.metric=eval_loss"]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(sweep_dir.glob("[0-9]*/metrics.json"))
    assert len(jobs) == 3
    metrics = [json.loads(p.read_text()) for p in jobs]
    lambdas = [m["hsa"] for m in metrics]
    assert all(0 <= lam["PROCESS_NOISE"] <= 0.5 and 0 <= lam["KEY_EVENT"] <= 0.05 for lam in lambdas)
    assert len({lam["PROCESS_NOISE"] for lam in lambdas}) == 3  # sampled, not fixed
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == min(m["eval_loss"] for m in metrics)  # Optuna got what each job returned
    assert "setup plugin" not in proc.stdout + proc.stderr  # alembic's chatter is silenced


def test_seed_means_per_setting(tmp_path):
    runs = {("0.0", "1"): 0.5, ("0.0", "2"): 0.7, ("0.0", "3"): 0.6, ("0.2", "1"): 0.9, ("0.2", "2"): None}
    for num, ((lam, seed), exact) in enumerate(runs.items()):
        job = tmp_path / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- hsa.lambdas.PROCESS_NOISE={lam}\n- seed={seed}\n")
        if exact is not None:
            metrics = {"eval_loss": 1.0 - exact, "eval_sets": {"len4x": {"exact_match": exact}}}
            (job / "metrics.json").write_text(json.dumps(metrics))
    rows, means = write_summary(tmp_path, "eval_sets.len4x.exact_match", "maximize")
    assert [r["job"] for r in rows][:2] == ["3", "1"] and rows[-1]["status"].startswith("no metrics")
    by_setting = {m["hsa.lambdas.PROCESS_NOISE"]: m for m in means}
    mean, std, n = by_setting["0.0"]["eval_sets.len4x.exact_match"]
    assert (n, by_setting["0.0"]["seeds"]) == (3, "3/3")
    assert mean == pytest.approx(0.6) and std == pytest.approx(statistics.stdev([0.5, 0.7, 0.6]))
    assert by_setting["0.2"]["seeds"] == "1/2" and by_setting["0.2"]["eval_loss"][1] == 0.0
    assert [m["hsa.lambdas.PROCESS_NOISE"] for m in means] == ["0.2", "0.0"]  # 0.9 > 0.6: best first
    table = (tmp_path / "summary_seeds.md").read_text()
    assert "0.6000 ± 0.1000" in table and "seed |" not in table
    for job in ("1", "2", "4"):  # one seed left: no per-setting means, and the old file is gone
        (tmp_path / job / "metrics.json").unlink(missing_ok=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").unlink()
    assert write_summary(tmp_path, "eval_loss", "minimize")[1] == []
    assert not (tmp_path / "summary_seeds.md").exists()


def test_failed_jobs_sort_last_and_metrics_can_be_nested(tmp_path):
    for num, (value, loss) in enumerate([("0.1", 2.0), ("0.2", None), ("0.3", 1.5)]):
        job = tmp_path / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- hsa.lambdas.PROCESS_NOISE={value}\n")
        if loss is not None:
            metrics = {"eval_loss": loss, "eval_loss_per_type": {"KEY_EVENT": loss * 2}}
            (job / "metrics.json").write_text(json.dumps(metrics))
    rows, means = write_summary(tmp_path, "eval_loss_per_type.KEY_EVENT", "minimize")
    assert [r["job"] for r in rows] == ["2", "0", "1"] and means == []
    assert rows[-1]["status"].startswith("no metrics")
    assert metric_value({"a": {"b": 3}}, "a.b") == 3.0 and metric_value({"a": 1}, "a.b") is None
    assert [r["job"] for r in sort_rows(rows, "eval_loss", "maximize")] == ["0", "2", "1"]


def test_torchrun_sweep_script_runs_each_setting_and_summarises(tmp_path, small_data):
    """launch/sweep_torchrun.sh: one torchrun run per setting (NPROC=1 here), a failed one does not stop the
    rest, and `python -m hsa_train.sweep` writes the summary."""
    sweep_dir = tmp_path / "sweep"
    script = ROOT / "launch" / "sweep_torchrun.sh"
    settings = ["hsa.lambdas.PROCESS_NOISE=0.0", "hsa.lambdas.PROCESS_NOISE=-1", "hsa.lambdas.PROCESS_NOISE=0.3 seed=7"]
    cmd = ["bash", str(script), str(sweep_dir), *settings, "--", *TINY, f"data.train_files=[{small_data}]"]
    env = dict(cli_env(), NPROC="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "== run 1 failed" in proc.stderr
    ran = {
        d.name: json.loads((d / "metrics.json").read_text())
        for d in sweep_dir.glob("*")
        if (d / "metrics.json").exists()
    }
    assert sorted(ran) == ["0", "2"] and ran["2"]["hsa"]["PROCESS_NOISE"] == 0.3
    with (sweep_dir / "summary.csv").open() as f:
        rows = {r["job"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"0", "1", "2"} and rows["1"]["status"].startswith("no metrics")
    assert rows["2"]["seed"] == "7" and float(rows["0"]["eval_loss"]) == ran["0"]["eval_loss"]


def test_sweep_cli_resorts_a_finished_sweep(tmp_path):
    for num, loss in enumerate([2.0, 1.0]):
        job = tmp_path / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- train.lr={num}\n")
        (job / "metrics.json").write_text(json.dumps({"eval_loss": loss}))
    cmd = [sys.executable, "-m", "hsa_train.sweep", str(tmp_path), "--direction", "maximize"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "higher first" in (tmp_path / "summary.md").read_text()
    with (tmp_path / "summary.csv").open() as f:
        assert [r["job"] for r in csv.DictReader(f)] == ["0", "1"]
    empty = subprocess.run([*cmd[:3], str(tmp_path / "nothing")], capture_output=True, text=True, timeout=120)
    assert empty.returncode == 2 and "no runs" in empty.stderr
