"""What HSA costs in training: tokens/s of the same run with plain attention and with HSA, side by side.

Each variant trains the same model from the same seed on the same batches for `--steps` steps through hsa_train's
loop (setup and evaluation excluded); the variants alternate, `--repeats` times, and the report gives each one's
median tokens/s and the median of its per-repeat ratio to plain attention (the stock sdpa kernel, no mask).

    python benchmarks/hsa_cost.py --steps 30 --repeats 5 --out benchmarks/results/hsa_cost_cpu.json
    python benchmarks/hsa_cost.py experiment=recall      # trailing arguments are Hydra overrides for every variant

`--lengths 1024,2048,4096` measures one training step (forward + backward) of a bare model instead, at each length:
a 4-layer Qwen2 (hidden 256, 4 heads of 64, 2 KV heads), batch 2 of full rows with their attention mask (so stock
sdpa runs its fused causal kernel: the hardest baseline), stock sdpa against HSA sdpa with fixed and with learnable
λ on the same weights and batch, interleaved, medians of the per-repeat ratios: the sdpa dot-product route against
the stock kernel where the attention is the cost.

    python benchmarks/hsa_cost.py --lengths 1024,2048,4096 --repeats 7 --out benchmarks/results/hsa_step_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
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


STEP_VARIANTS = ("stock sdpa", "HSA sdpa", "HSA sdpa, learnable λ")


def step_model(variant: str):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from hsa_train import enable_hsa

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8192,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
    if variant != "stock sdpa":
        enable_hsa(model, backend="sdpa", learnable="learnable" in variant)
    return model


def step_time(model, batch: dict, hsa: bool) -> float:
    """Seconds of one forward + backward."""
    inputs = {k: v for k, v in batch.items() if hsa or k != "semantic_ids"}
    start = time.perf_counter()
    model(**inputs, use_cache=False).loss.backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def step_costs(lengths: list[int], repeats: int) -> dict:
    models = {name: step_model(name) for name in STEP_VARIANTS}
    results = {}
    for length in lengths:
        g = torch.Generator().manual_seed(length)
        ids = torch.randint(1, 512, (2, length), generator=g)
        mask = torch.ones(2, length, dtype=torch.long)
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100),
            "semantic_ids": torch.randint(0, 3, (2, length), generator=g),
        }
        times: dict[str, list[float]] = {name: [] for name in STEP_VARIANTS}
        for name, model in models.items():  # warm-up
            step_time(model, batch, name != "stock sdpa")
        for _ in range(repeats):
            for name, model in models.items():
                times[name].append(step_time(model, batch, name != "stock sdpa"))
        stock = times["stock sdpa"]
        results[str(length)] = {
            name: {
                "seconds_median": statistics.median(t),
                "ratio_to_stock_median": statistics.median(a / b for a, b in zip(t, stock)),
                "seconds": t,
            }
            for name, t in times.items()
        }
        line = ", ".join(f"{n} x{r['ratio_to_stock_median']:.3f}" for n, r in results[str(length)].items())
        print(f"L={length}: {line}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lengths", default=None, help="comma-separated lengths: the one-step benchmark")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every variant")
    args = parser.parse_args()
    if args.lengths:
        report = {
            "benchmark": "one training step, 4-layer Qwen2 hidden 256, batch 2",
            "device": "cpu",
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "repeats": args.repeats,
            "lengths": step_costs([int(x) for x in args.lengths.split(",")], args.repeats),
        }
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))
        return

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
