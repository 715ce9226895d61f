"""The driver: set the recipe up, step until the end or a stop signal, checkpoint and evaluate on their cadence,
finish. What each part does lives in `Recipe` (training/recipe.py) and the library below it:

data (loader → SemanticTokenizer → collator) → model with HSA (+ LoRA) → DDP / FSDP2 → AdamW + warmup/cosine,
gradient accumulation normalised by the label tokens of the whole global batch, clipping, non-finite guard,
bf16 autocast where supported → checkpoints (periodic, at the end, on SIGTERM / SIGINT) → eval → export +
metrics.json. Only rank 0 prints and writes files other than its checkpoint shards.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

from hsa_train.config import RunConfig
from hsa_train.training.dpo import PreferenceRecipe
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
    """Turns SIGTERM / SIGINT into a flag the loop checks between steps (the previous handlers come back after),
    and makes sure a signal still ends the process when the loop cannot get there.

    A rank blocked in a collective of a hung peer never returns to the interpreter, so its Python handler never
    runs (measured with gloo: the handler waits for the collective). Python's C-level handler still writes the
    signal number to the wakeup fd (`signal.set_wakeup_fd`), from whichever thread the kernel picked, so a watchdog
    thread reading it learns of the signal at once: if the run has not stopped `grace_s` later, or a second signal
    comes, it says so on stderr in one line and exits with 128 + the signal, without the stop's checkpoint (its
    `.tmp` folder is never resumed). A second signal within `SAME_SIGNAL_S` of the first counts as the same one:
    SLURM signals every process of a job step and torchrun forwards its own SIGTERM to its workers too."""

    SAME_SIGNAL_S = 1.0

    def __init__(self, grace_s: float = 30.0):
        self.signum, self.grace_s = 0, grace_s
        self._previous: dict = {}
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._previous_fd = -1
        self._done = threading.Event()

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        if self._previous:
            read, write = socket.socketpair()
            write.setblocking(False)  # set_wakeup_fd needs it: the C handler must never block
            self._previous_fd = signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False)
            self._wakeup = (read, write)
            threading.Thread(target=self._watch, args=(read,), name="hsa_train-stop-watchdog", daemon=True).start()
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def _watch(self, read: socket.socket) -> None:
        first, since, deadline = 0, 0.0, None
        try:
            while not self._done.is_set():
                read.settimeout(None if deadline is None else max(deadline - time.monotonic(), 0.0))
                try:
                    data = read.recv(64)
                except TimeoutError:  # the grace period is over
                    data = None
                if self._done.is_set() or data == b"":
                    return
                if data is None:
                    name, grace = signal.Signals(first).name, f"{self.grace_s:g}"
                    why = "blocked in a collective? a peer may be hung"
                    self._exit(first, f"got {name} and could not stop cleanly within {grace} s ({why})")
                for signum in (b for b in data if b in (signal.SIGTERM, signal.SIGINT)):
                    now = time.monotonic()
                    if not first:
                        first, since, deadline = signum, now, now + self.grace_s
                    elif now - since > self.SAME_SIGNAL_S:
                        self._exit(signum, f"got a second {signal.Signals(signum).name} while stopping")
        finally:
            read.close()

    @staticmethod
    def _exit(signum: int, what: str) -> None:
        """Ends the process from the watchdog thread: one line written straight to fd 2 (the main thread may hold
        a stream's lock), then `os._exit` (exit handlers could wait on the hung collective too)."""
        rank = f" rank {os.environ['RANK']}" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        try:
            os.write(2, f"hsa_train:{rank} {what}: exiting without a checkpoint\n".encode())
        finally:
            os._exit(128 + signum)

    def __exit__(self, *exc):
        """Disarms the watchdog: the loop is back in Python, and the previous handlers (the default: end the
        process) take any further signal."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._wakeup is not None:
            self._done.set()
            signal.set_wakeup_fd(self._previous_fd)
            read, write = self._wakeup
            try:
                write.send(b"\0")  # wakes the watchdog, which closes its end
            except OSError:
                pass
            write.close()


def train(run: RunConfig, resolved_config: dict, run_dir: Path) -> dict:
    recipe = (PreferenceRecipe if run.stage.preference else Recipe)(run, resolved_config, run_dir)
    cfg = run.train
    exit_code = 1  # for wandb: any exception below marks the run failed
    try:
        recipe.setup()
        with StopFlag(cfg.stop_grace_s) as stop:
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
