"""What a Hydra multirun found: one table of every job's settings and eval metrics, sorted by the objective.

Registered in conf/config.yaml as a Hydra callback. It reads what the jobs left on disk (`.hydra/overrides.yaml`
and `metrics.json` in each job directory), so it works the same with the local launcher, SLURM and Optuna; a
job without metrics.json has failed or is still running. `summary.md` and `summary.csv` in the sweep directory
are rewritten after every job (a long sweep can be read while it runs; a failed job does not lose the others'
results); the table is printed at the end. When `seed` is swept, `summary_seeds.md` / `.csv` also give each
setting's mean ± std over its seeds.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from hydra.types import RunMode
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
        try:
            metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
        except json.JSONDecodeError:  # being written right now
            metrics = None
        jobs.append((job_dir.name, overrides, metrics))
    keys = sorted({k for _, o, _ in jobs for k in o})
    varying = [k for k in keys if len({o.get(k) for _, o, _ in jobs}) > 1] or keys  # one job: show its overrides
    rows = []
    for name, overrides, metrics in jobs:
        row: dict[str, Any] = {"job": name, **{k: overrides.get(k, "") for k in varying}}
        if metrics is None:
            row["status"] = "no metrics (failed or running)"
        else:
            row["status"] = "ok"
            row[metric] = metric_value(metrics, metric)
            for extra in ("eval_loss", "eval_exact_match", "train_loss_final", "tokens_per_s"):
                if extra != metric:
                    row[extra] = metric_value(metrics, extra)
            for type_name, value in (metrics.get("eval_loss_per_type") or {}).items():
                row[f"eval_loss_{type_name}"] = value
            for set_name, result in (metrics.get("eval_sets") or {}).items():
                for key in ("loss", "exact_match"):
                    if f"eval_sets.{set_name}.{key}" != metric:
                        row[f"{set_name}_{key}"] = metric_value(result or {}, key)
        rows.append(row)
    return varying, rows


def _order_key(value: Any, direction: str) -> tuple[bool, float]:
    if isinstance(value, list):  # [mean, std, n]
        value = value[0]
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return (missing, 0.0 if missing else (value if direction == "minimize" else -value))


def sort_rows(rows: list[dict[str, Any]], metric: str, direction: str) -> list[dict[str, Any]]:
    """Best first by `metric` (direction minimize or maximize; a [mean, std, n] cell by its mean); rows without
    it last."""
    return sorted(rows, key=lambda row: _order_key(row.get(metric), direction))


def seed_means(varying: list[str], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per setting (the swept keys other than `seed`): every numeric column as [mean, std, n] over the
    seeds that finished (std is the sample standard deviation; 0 for a single seed)."""
    setting_keys = [k for k in varying if k != "seed"]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k, "") for k in setting_keys), []).append(row)
    out = []
    for setting, members in groups.items():
        done = [r for r in members if r["status"] == "ok"]
        row: dict[str, Any] = dict(zip(setting_keys, setting))
        row["seeds"] = f"{len(done)}/{len(members)}"
        for column in table_columns(done):
            values = [r[column] for r in done if isinstance(r.get(column), (int, float)) and column != "seed"]
            if values and column not in setting_keys:
                mean = sum(values) / len(values)
                var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
                row[column] = [mean, math.sqrt(var), len(values)]
        out.append(row)
    return out


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every key in row order, less those no job has a value for (e.g. a type that had no eval tokens)."""
    keys = dict.fromkeys(k for row in rows for k in row)
    return [k for k in keys if any(row.get(k) not in (None, "") for row in rows)]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):  # [mean, std, n]: the std in the mean's format
        mean, std = value[0], value[1]
        return f"{mean:,.0f} ± {std:,.0f}" if abs(mean) >= 1000 else f"{mean:.4f} ± {std:.4f}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4f}"
    return str(value)


def _write_atomic(path: Path, text: str) -> None:
    """Jobs running in parallel (SLURM) may all rewrite the summary: each write is whole or absent."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _csv_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v[0]} ± {v[1]}" if isinstance(v, list) else v) for k, v in row.items()})
    return buffer.getvalue()


def _markdown(title: str, rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = [title, "", "| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_summary(
    sweep_dir: Path, metric: str = "eval_loss", direction: str = "minimize"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Writes summary.md / .csv (and summary_seeds.md / .csv when seeds are swept) into `sweep_dir`; returns
    (the sorted job rows, the sorted per-setting rows or [])."""
    varying, rows = collect(sweep_dir, metric)
    rows = sort_rows(rows, metric, direction)
    order = "lower" if direction == "minimize" else "higher"
    columns = table_columns(rows)
    _write_atomic(sweep_dir / "summary.csv", _csv_text(rows, columns))
    title = f"Sweep {sweep_dir}: {len(rows)} jobs, sorted by {metric} ({order} first)"
    _write_atomic(sweep_dir / "summary.md", _markdown(title, rows, columns))
    means: list[dict[str, Any]] = []
    seeds = {row.get("seed") for row in rows}
    if "seed" in varying and len(seeds) > 1:
        means = sort_rows(seed_means(varying, rows), metric, direction)
        columns = table_columns(means)
        _write_atomic(sweep_dir / "summary_seeds.csv", _csv_text(means, columns))
        title = f"Sweep {sweep_dir}: mean ± std over seeds per setting, sorted by {metric} ({order} first)"
        _write_atomic(sweep_dir / "summary_seeds.md", _markdown(title, means, columns))
    else:  # (not yet) several seeds: no per-setting means, and none left from an earlier state of the sweep
        for stale in ("summary_seeds.csv", "summary_seeds.md"):
            (sweep_dir / stale).unlink(missing_ok=True)
    return rows, means


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = table_columns(rows)
    for column in columns:
        table.add_column(column, justify="right" if column not in ("job", "status") else "left")
    for row in rows:
        table.add_row(*(_fmt(row.get(c)) for c in columns))
    Console(width=None if sys.stdout.isatty() else 240).print(table)  # a log file gets every column


class SweepSummary(Callback):
    """Hydra callback: `metric` is a metrics.json key (dotted for nested ones), `direction` minimize or maximize."""

    def __init__(self, metric: str = "eval_loss", direction: str = "minimize"):
        if direction not in ("minimize", "maximize"):
            raise ValueError(f"objective.direction={direction!r}: use minimize or maximize")
        self.metric, self.direction = metric, direction

    def _write(self, config: DictConfig):
        sweep_dir = Path(config.hydra.sweep.dir)
        return write_summary(sweep_dir, self.metric, self.direction) if sweep_dir.is_dir() else None

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            self._write(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        written = self._write(config)
        if written is None:
            return
        rows, means = written
        print_table(rows, f"sweep: {len(rows)} jobs by {self.metric} ({self.direction})")
        if means:
            print_table(means, f"mean ± std over seeds, by {self.metric} ({self.direction})")
        sweep_dir = Path(config.hydra.sweep.dir)
        files = "summary.md, summary.csv" + (", summary_seeds.md, summary_seeds.csv" if means else "")
        print(f"sweep summary: {files} in {sweep_dir}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m hsa_train.sweep DIR`: the same summary for runs launched outside a Hydra multirun (e.g. one
    torchrun per setting, launch/sweep_torchrun.sh), or to re-sort a finished sweep by another metric."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hsa_train.sweep", description=main.__doc__.split(":")[0])
    parser.add_argument("sweep_dir", type=Path, help="a folder whose subfolders are runs (each with .hydra/)")
    parser.add_argument("--metric", default="eval_loss", help="metrics.json key to sort by, dotted for nested")
    parser.add_argument("--direction", choices=("minimize", "maximize"), default="minimize")
    args = parser.parse_args(argv)
    if not any(args.sweep_dir.glob("*/.hydra/overrides.yaml")):
        print(f"hsa_train.sweep: error: no runs (*/.hydra/overrides.yaml) under {args.sweep_dir}", file=sys.stderr)
        return 2
    rows, means = write_summary(args.sweep_dir, args.metric, args.direction)
    print_table(rows, f"{args.sweep_dir}: {len(rows)} jobs by {args.metric} ({args.direction})")
    if means:
        print_table(means, f"mean ± std over seeds, by {args.metric} ({args.direction})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
