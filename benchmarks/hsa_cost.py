"""What HSA costs in training: tokens/s of the same run with plain attention and with HSA, side by side.

Each variant trains the same model from the same seed on the same batches for `--steps` steps through hsa_train's
loop (setup and evaluation excluded); the variants alternate, `--repeats` times, and the report gives each one's
median tokens/s and the median of its per-repeat ratio to plain attention (the stock sdpa kernel, no mask).

    python benchmarks/hsa_cost.py --steps 30 --repeats 5 --out benchmarks/results/hsa_cost_cpu.json
    python benchmarks/hsa_cost.py experiment=recall      # trailing arguments are Hydra overrides for every variant
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch
from train import compose

VARIANTS = {
    "plain (hsa.enabled=false)": ["hsa.enabled=false"],
    "HSA sdpa, λ = 0": ["hsa.backend=sdpa", "hsa.lambdas.KEY_EVENT=0", "hsa.lambdas.PROCESS_NOISE=0"],
    "HSA sdpa, default λ": ["hsa.backend=sdpa"],
    "HSA sdpa, learnable λ": ["hsa.backend=sdpa", "hsa.learnable=true"],
    "HSA eager, default λ": ["hsa.backend=eager"],
}


def run(overrides: list[str], workdir: Path) -> float:
    """tokens/s of one training run, without evaluation or saving."""
    from hsa_train.training.loop import train

    config, resolved = compose([*overrides, "logging.progress=none", "train.save_model=false"])
    config.data.eval_files, config.data.eval_ratio, config.data.eval_sets = [], 0.0, {}
    return train(config, resolved, workdir)["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every variant")
    args = parser.parse_args()

    common = [*args.overrides, f"train.max_steps={args.steps}", "train.warmup_steps=0"]
    speeds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for i, (name, extra) in enumerate(VARIANTS.items()):  # one run folder each: a folder holds one run
                speeds[name].append(run(common + extra, Path(tmp) / f"{repeat}-{i}"))
            print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{n} {s[-1]:,.0f}" for n, s in speeds.items()))
    plain = speeds["plain (hsa.enabled=false)"]
    report = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "steps": args.steps,
        "repeats": args.repeats,
        "overrides": args.overrides,
        "variants": {
            name: {
                "tokens_per_s_median": statistics.median(values),
                "ratio_to_plain_median": statistics.median(v / p for v, p in zip(values, plain)),
                "tokens_per_s": values,
            }
            for name, values in speeds.items()
        },
    }
    for name, result in report["variants"].items():
        print(f"{name:28s} {result['tokens_per_s_median']:9,.0f} tok/s  x{result['ratio_to_plain_median']:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
