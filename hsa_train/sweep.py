"""The end of a Hydra multirun: one table of every job's settings and eval metrics, sorted by the chosen metric.

Registered in conf/config.yaml as a Hydra callback; it reads what the jobs left on disk (`.hydra/overrides.yaml`
and `metrics.json` in each job directory), so it works the same with the local launcher and with SLURM. Writes
`summary.md` and `summary.csv` into the sweep directory and prints the table (rich on a terminal).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def metric_value(metrics: dict, path: str) -> float | None:
    """`path` is a metrics.json key, dotted into nested dicts (e.g. eval_loss_per_type.KEY_EVENT)."""
    value: Any = metrics
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def collect(sweep_dir: Path, metric: str) -> tuple[list[str], list[dict[str, Any]]]:
    """(the swept keys, one row per job), from the job directories under `sweep_dir`."""
    jobs = []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
        job_dir = overrides_file.parent.parent
        overrides = dict(item.split("=", 1) for item in yaml.safe_load(overrides_file.read_text()) or [] if "=" in item)
        metrics_file = job_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
        jobs.append((job_dir.name, overrides, metrics))
    keys = sorted({k for _, o, _ in jobs for k in o})
    varying = [k for k in keys if len({o.get(k) for _, o, _ in jobs}) > 1] or keys
    rows = []
    for name, overrides, metrics in jobs:
        row: dict[str, Any] = {"job": name, **{k: overrides.get(k, "") for k in varying}}
        if metrics is None:
            row["status"] = "failed (no metrics.json)"
        else:
            row["status"] = "ok"
            row[metric] = metric_value(metrics, metric)
            for extra in ("eval_loss", "train_loss_final", "tokens_per_s"):
                if extra != metric:
                    row[extra] = metric_value(metrics, extra)
            for type_name, value in (metrics.get("eval_loss_per_type") or {}).items():
                row[f"eval_loss_{type_name}"] = value
        rows.append(row)
    return varying, rows


def sort_rows(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    def key(row):
        value = row.get(metric)
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        return (missing, 0.0 if missing else (value if mode == "min" else -value))

    return sorted(rows, key=key)


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every key in row order, less those no job has a value for (e.g. a type that had no eval tokens)."""
    keys = dict.fromkeys(k for row in rows for k in row)
    return [k for k in keys if any(row.get(k) not in (None, "") for row in rows)]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4f}"
    return str(value)


def write_summary(sweep_dir: Path, metric: str = "eval_loss", mode: str = "min") -> list[dict[str, Any]]:
    """Writes summary.md and summary.csv into `sweep_dir`; returns the sorted rows."""
    _, rows = collect(sweep_dir, metric)
    rows = sort_rows(rows, metric, mode)
    columns = table_columns(rows)
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"Sweep {sweep_dir} — {len(rows)} jobs, sorted by {metric} ({'lower' if mode == 'min' else 'higher'} first)",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return rows


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = table_columns(rows)
    for column in columns:
        table.add_column(column, justify="right" if column not in ("job", "status") else "left")
    for row in rows:
        table.add_row(*(_fmt(row.get(c)) for c in columns))
    Console().print(table)


class SweepSummary(Callback):
    """Hydra callback: `metric` is a metrics.json key (dotted for nested ones), `mode` min or max."""

    def __init__(self, metric: str = "eval_loss", mode: str = "min"):
        if mode not in ("min", "max"):
            raise ValueError(f"sweep summary mode={mode!r}: use min or max")
        self.metric, self.mode = metric, mode

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = write_summary(sweep_dir, self.metric, self.mode)
        print_table(rows, f"sweep: {len(rows)} jobs by {self.metric} ({self.mode})")
        print(f"sweep summary: {sweep_dir / 'summary.md'} and {sweep_dir / 'summary.csv'}", flush=True)
