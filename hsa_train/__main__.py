"""`python -m hsa_train [overrides]`: one training run (or a sweep with -m), configured by Hydra from conf/."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from hsa_train.config import ConfigError, validate
from hsa_train.data.loader import DataError
from hsa_train.overrides import unknown_key_message


def _fail(kind: str, exc: BaseException, hint: str = "") -> None:
    """One line on stderr and exit 2; HYDRA_FULL_ERROR=1 re-raises for the full traceback."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise exc
    message = " ".join(str(exc).split())  # one line, whatever the exception held
    print(f"hsa_train: {kind}: {message}{hint}", file=sys.stderr, flush=True)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path="pkg://hsa_train.conf", config_name="config")
def run(cfg: DictConfig) -> float | None:
    """One job; returns the eval loss (what a sweeper minimises)."""
    try:
        run_cfg = validate(cfg)
    except ConfigError as exc:
        _fail("config error", exc)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    run_dir = Path(HydraConfig.get().runtime.output_dir)

    from hsa_train.training.loop import train

    try:
        metrics = train(run_cfg, resolved, run_dir)
    except DataError as exc:
        _fail("data error", exc)
    except (FileNotFoundError, ValueError) as exc:
        _fail("error", exc, " (HYDRA_FULL_ERROR=1 shows the traceback)")
    return metrics.get("eval_loss")


def main() -> None:
    problem = unknown_key_message(sys.argv[1:])
    if problem:
        print(f"hsa_train: config error: {problem}", file=sys.stderr, flush=True)
        sys.exit(2)
    run()


if __name__ == "__main__":
    main()
