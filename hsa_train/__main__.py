"""`python -m hsa_train [overrides]`: one training run (or a sweep with -m), configured by Hydra from conf/.
Under `torchrun` every rank runs this; they agree on one run directory before Hydra creates it.

torch and training are imported inside the functions that need them, after the command line and the config
are known to be good: a typo costs no second of torch import (none of these imports avoids a cycle)."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from hsa_train.config import ConfigError, validate
from hsa_train.data.loader import DataError
from hsa_train.overrides import unknown_key_message
from hsa_train.sweep import metric_value
from hsa_train.types import one_line


class JobFailed(RuntimeError):
    """A job of a sweep failed; raised (not exited) so Hydra records it and the other jobs still run."""


def _fail(kind: str, exc: BaseException, hint: str = "", code: int = 2, sweep_goes_on: bool = True) -> None:
    """One line on stderr and exit `code`; in a sweep, raise JobFailed instead (Hydra marks this job failed and
    runs the others) unless `sweep_goes_on` is False (a stop signal ends the whole sweep). HYDRA_FULL_ERROR=1
    re-raises for the full traceback."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise exc
    message = one_line(exc)
    print(f"hsa_train: {kind}: {message}{hint}", file=sys.stderr, flush=True)
    if sweep_goes_on and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise JobFailed(f"{kind}: {message}") from None
    sys.exit(code)


@hydra.main(version_base="1.3", config_path="pkg://hsa_train.conf", config_name="config")
def run(cfg: DictConfig) -> float | None:
    """One job; returns `objective.metric` from its metrics (what a sweeper such as Optuna optimises)."""
    try:
        run_cfg = validate(cfg)
    except ConfigError as exc:
        _fail("config error", exc)
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:  # one wandb group per sweep, runs named by their overrides
        run_cfg.logging.group = run_cfg.logging.group or str(hydra_cfg.sweep.dir)
        run_cfg.logging.name = run_cfg.logging.name or hydra_cfg.job.override_dirname or f"job{hydra_cfg.job.num}"
    resolved = OmegaConf.to_container(cfg, resolve=True)
    run_dir = Path(hydra_cfg.runtime.output_dir)

    # training (torch, transformers) is imported once the config is known to be good: a config error costs no
    # import time
    from hsa_train.training.distributed import collective_failed
    from hsa_train.training.loop import NonFiniteError, Stopped, train

    try:
        metrics = train(run_cfg, resolved, run_dir)
    except Stopped as exc:  # preemption: checkpoint written; 128 + signal, as a killed process reports
        _fail("stopped", exc, code=128 + exc.signum, sweep_goes_on=False)
    except NonFiniteError as exc:
        _fail("non-finite", exc, code=3)
    except DataError as exc:
        _fail("data error", exc)
    except (FileNotFoundError, ValueError) as exc:
        _fail("error", exc, " (HYDRA_FULL_ERROR=1 shows the traceback)")
    except Exception as exc:  # a bug, or a library failing in a way we did not foresee: still one line
        if collective_failed(exc):  # another rank died or hung: nothing this rank can fix
            hint = " (another rank died or hung: its log says why; continue with train.resume=auto)"
            _fail("collective failed", exc, hint, code=1)
        _fail(
            "internal error",
            RuntimeError(f"{type(exc).__name__}: {exc}"),
            " (HYDRA_FULL_ERROR=1 shows the traceback; please report it)",
            code=1,
        )
    value = metric_value(metrics, run_cfg.objective.metric)
    if value is None and hydra_cfg.mode == RunMode.MULTIRUN:
        _fail(
            "config error",
            ValueError(
                f"objective.metric={run_cfg.objective.metric!r} is not a number in this "
                f"job's metrics.json ({run_dir / 'metrics.json'}); name one that is"
            ),
        )
    return value


def _shared_run_dir_overrides(argv: list[str]) -> list[str]:
    """Under torchrun each rank's Hydra would stamp its own run directory (the clocks differ by a second now and
    then). Rank 0 picks it and tells the others through the process group; ranks > 0 also leave Hydra's
    own files (.hydra/, the log) to rank 0."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return []
    extra = []
    if not any(a.startswith(("hydra.run.dir=", "++hydra.run.dir=")) for a in argv):
        import datetime

        import torch.distributed as dist

        from hsa_train.training.distributed import join_process_group

        join_process_group()  # training reuses this group
        stamp = [datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S")]
        dist.broadcast_object_list(stamp, src=0)
        extra.append(f"hydra.run.dir=outputs/{stamp[0]}")
    if int(os.environ.get("RANK", "0")) > 0:
        extra += ["hydra.output_subdir=null", "hydra.job_logging.root.handlers=[]", "hydra/hydra_logging=disabled"]
    return extra


def main() -> None:
    argv = sys.argv[1:]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and any(a in ("-m", "--multirun") for a in argv):
        print(
            "hsa_train: config error: a sweep (-m) under torchrun would make every rank run the whole sweep; "
            "sweep with Hydra outside and let each job launch torchrun (see README, 'Many GPUs')",
            file=sys.stderr,
        )
        sys.exit(2)
    if any(a in ("hydra/sweeper=lambdas", "hydra/sweeper=optuna") for a in argv):
        try:
            import hydra_plugins.hydra_optuna_sweeper  # noqa: F401
        except ImportError:
            print(
                "hsa_train: config error: the Optuna sweeper is not installed; pip install -e '.[optuna]'",
                file=sys.stderr,
            )
            sys.exit(2)
    problem = unknown_key_message(argv)
    if problem:
        print(f"hsa_train: config error: {problem}", file=sys.stderr, flush=True)
        sys.exit(2)
    sys.argv += _shared_run_dir_overrides(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _run_as_rank()
    else:
        run()


def _run_as_rank() -> None:
    """One torchrun rank: the run, then `distributed.leave` with the exit code the interpreter would give, so
    the rank skips the interpreter's teardown (where gloo's threads can abort it)."""
    from hsa_train.training.distributed import leave

    code = 1
    try:
        run()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # a bug: its traceback, as an uncaught exception prints it
        traceback.print_exc()
    leave(code)


if __name__ == "__main__":
    main()
