"""A 2x1 λ sweep with Hydra multirun: one directory and metrics.json per job, and the sorted summary."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

from conftest import cli_env

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


def test_failed_jobs_sort_last_and_metrics_can_be_nested(tmp_path):
    for num, (value, loss) in enumerate([("0.1", 2.0), ("0.2", None), ("0.3", 1.5)]):
        job = tmp_path / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- hsa.lambdas.PROCESS_NOISE={value}\n")
        if loss is not None:
            metrics = {"eval_loss": loss, "eval_loss_per_type": {"KEY_EVENT": loss * 2}}
            (job / "metrics.json").write_text(json.dumps(metrics))
    rows = write_summary(tmp_path, "eval_loss_per_type.KEY_EVENT", "min")
    assert [r["job"] for r in rows] == ["2", "0", "1"]
    assert rows[-1]["status"].startswith("failed")
    assert metric_value({"a": {"b": 3}}, "a.b") == 3.0 and metric_value({"a": 1}, "a.b") is None
    assert [r["job"] for r in sort_rows(rows, "eval_loss", "max")] == ["0", "2", "1"]
