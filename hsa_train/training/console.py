"""Where a run reports: a rich progress bar on a terminal, plain lines otherwise, and wandb when asked."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("hsa_train")


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Console:
    """Progress for `total` optimizer steps. mode: rich | plain | none | auto (rich when stdout is a terminal).
    Every line also goes to the `hsa_train` logger, which Hydra writes to `<run dir>/hsa_train.log`."""

    def __init__(self, mode: str, total: int, enabled: bool = True):
        self.enabled = enabled  # False on ranks other than 0: they print and log nothing
        if not enabled:
            mode = "none"
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode, self.total = mode, total
        self.start = time.perf_counter()
        self._progress = None
        if mode == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
                TextColumn("eta"),
                TimeRemainingColumn(),
            )
            self._task = self._progress.add_task("train", total=total, loss="-", lr="-", tps="-")
            self._progress.start()

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        log.info(text)
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        elif self.mode != "none":
            print(text, flush=True)

    def step(self, step: int, metrics: dict[str, float], log_line: bool) -> None:
        """Called after every optimizer step; `log_line` marks the steps that print (and log) a line."""
        if self._progress is not None:
            self._progress.update(
                self._task,
                completed=step,
                loss=f"{metrics['loss']:.4f}",
                lr=f"{metrics['lr']:.2e}",
                tps=f"{metrics['tokens_per_s']:,.0f}",
            )
        if not log_line or not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / step * (self.total - step)
        line = (
            f"step {step}/{self.total} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | "
            f"{metrics['tokens_per_s']:,.0f} tok/s | elapsed {_fmt_duration(elapsed)} | eta {_fmt_duration(eta)}"
        )
        for name, value in (metrics.get("stats") or {}).items():  # the objective's (DPO: accuracy, margin)
            line += f" | {name.split('/')[-1]} {'-' if value is None else format(value, '.4g')}"
        if metrics.get("lambdas"):  # learnable λ as they stand
            line += " | λ " + " ".join(f"{name} {value:.4g}" for name, value in metrics["lambdas"].items())
        if self.mode == "plain":
            self.print(line)
        else:
            log.info(line)  # the bar shows it; the log file keeps it

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class Tracker:
    """wandb, when enabled; every call is a no-op otherwise. WANDB_MODE (offline, disabled) is honoured by wandb."""

    def __init__(self, enabled: bool, settings: Any, config: dict, run_dir: str):
        self.run = None
        if not enabled:
            return
        import wandb

        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=settings.name,
            group=settings.group,
            tags=list(settings.tags) or None,
            config=config,
            dir=run_dir,
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            for key, value in metrics.items():
                self.run.summary[key] = value

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
