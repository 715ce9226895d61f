"""The driver: set the recipe up, step until the end or a stop signal, checkpoint and evaluate on their cadence,
finish. What each part does lives in `Recipe` (training/recipe.py) and the library below it:

data (loader → SemanticTokenizer → collator) → model with HSA (+ LoRA) → DDP / FSDP2 → AdamW + warmup/cosine,
gradient accumulation normalised by the label tokens of the whole global batch, clipping, non-finite guard,
bf16 autocast where supported → checkpoints (periodic, at the end, on SIGTERM / SIGINT) → eval → export +
metrics.json. Only rank 0 prints and writes files other than its checkpoint shards.
"""

from __future__ import annotations

import signal
from pathlib import Path

from hsa_train.config import RunConfig
from hsa_train.training.recipe import Recipe
from hsa_train.training.step import NonFiniteError, accumulate_gradients, make_forward

__all__ = ["NonFiniteError", "Stopped", "accumulate_gradients", "make_forward", "train"]


class Stopped(Exception):
    """SIGTERM / SIGINT: a checkpoint was written and the run stops."""

    def __init__(self, signum: int, step: int, path: Path | None):
        self.signum, self.step, self.path = signum, step, path
        name = signal.Signals(signum).name
        where = f"checkpoint {path}" if path else "no checkpoint (train.save_every and the run dir are off)"
        super().__init__(f"stopped by {name} after step {step}; {where}; continue with train.resume=auto")


class StopFlag:
    """Turns SIGTERM / SIGINT into a flag the loop checks between steps (the previous handlers come back after)."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(run: RunConfig, resolved_config: dict, run_dir: Path) -> dict:
    recipe = Recipe(run, resolved_config, run_dir)
    cfg = run.train
    exit_code = 1  # for wandb: any exception below marks the run failed
    try:
        recipe.setup()
        with StopFlag() as stop:
            while recipe.step < recipe.max_steps:
                result = recipe.train_step(stop.signum)
                step = recipe.step
                if result.stop:  # some rank was signalled: all of them checkpoint and stop together
                    raise Stopped(stop.signum or signal.SIGTERM, step, recipe.save())
                if cfg.save_every and step % cfg.save_every == 0 and step != recipe.max_steps:
                    recipe.console.print(f"checkpoint: {recipe.save()}")
                if cfg.eval_every and step % cfg.eval_every == 0 and step != recipe.max_steps:
                    recipe.evaluate(f" @ step {step}")
        recipe.console.close()
        if cfg.save_every and recipe.start_step < recipe.max_steps:  # checkpointing is on: the end state too
            recipe.console.print(f"checkpoint: {recipe.save()}")
        metrics = recipe.finish()
        exit_code = 0
        return metrics
    finally:
        recipe.close(exit_code)
