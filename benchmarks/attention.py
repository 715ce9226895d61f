"""Attention cost of HSA per backend against plain causal attention, side by side in one process.

One attention call of a 7B-class layer (28 query heads, 4 key/value heads, head dim 128; `--heads`, `--kv-heads`,
`--head-dim`) over one sequence of L tokens with random semantic types, at each `--lengths`:

- sdpa causal: `scaled_dot_product_attention(is_causal=True)`, no bias (flash where the device has it): the floor;
- flex causal: compiled `flex_attention` with the same causal block mask and no `score_mod`;
- HSA eager / sdpa / flex: hsa_train's three backends, bias and all (the per-forward mask and bias built inside the
  timed call, as in a model's first layer).

Forward, and forward+backward (`--backward`, CUDA only for flex), timed `--repeats` times after a warm-up, medians;
ratios are taken per repeat against the two causal baselines; peak memory above the inputs on CUDA. A variant that
runs out of memory is reported as such. Writes JSON and a Markdown table with --out (the .md beside it).

    python benchmarks/attention.py --device cuda --dtype bfloat16 --backward --out benchmarks/results/attention_gpu.json
    python benchmarks/attention.py --lengths 256 512 1024 --heads 8 --kv-heads 2 --head-dim 64 \
        --out benchmarks/results/attention_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from hsa_train.model.attention import hsa_eager_attention, hsa_sdpa_attention
from hsa_train.model.context import HSAForwardContext
from hsa_train.model.flex import hsa_flex_attention
from hsa_train.model.mask import hsa_mask_plan

LAMBDAS = [0.0, 0.01, 0.1]
VARIANTS = ("sdpa causal", "flex causal", "HSA eager", "HSA sdpa", "HSA flex")


class Layer(torch.nn.Module):
    """What the attention functions read from their module: `training`."""


def make_call(variant: str, q, k, v, types, lambdas: torch.Tensor | None = None):
    """A function running one attention call of `variant` from scratch (mask, bias, kernel). `lambdas`: λ per type
    (default `LAMBDAS`); a tensor that requires grad times the learnable-λ path."""
    L, device = q.shape[2], q.device
    layer = Layer().train(q.requires_grad)
    if variant == "sdpa causal":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if variant == "flex causal":
        compiled = torch.compile(flex_attention)

        def causal(b, h, qi, ki):
            return qi >= ki

        def run():
            mask = create_block_mask(causal, None, None, L, L, device=device, _compile=device.type == "cuda")
            return compiled(q, k, v, block_mask=mask, enable_gqa=True)

        return run
    lambdas = torch.tensor(LAMBDAS, device=device) if lambdas is None else lambdas

    def context():
        return HSAForwardContext(types, lambdas, "none", new_tokens=L)

    if variant == "HSA flex":
        return lambda: hsa_flex_attention(
            layer, q, k, v, hsa_mask_plan(batch_size=1, q_length=L, kv_length=L, device=device), hsa_context=context()
        )[0]
    attention = hsa_eager_attention if variant == "HSA eager" else hsa_sdpa_attention
    return lambda: attention(
        layer, q, k, v, hsa_mask_plan(batch_size=1, q_length=L, kv_length=L, device=device), hsa_context=context()
    )[0]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(call, backward: bool, repeats: int, device: torch.device, inputs) -> dict:
    """Median seconds of `call` (+ backward), and peak memory above what was allocated before (CUDA)."""

    def once():
        out = call()
        if backward:
            out.float().sum().backward()
            for t in inputs:
                t.grad = None
        return out

    once()  # warm-up: compilation, autotuning, caches
    once()
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        once()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else None
    return {"seconds": times, "seconds_median": statistics.median(times), "peak_mib": peak}


def run_length(L: int, args, device: torch.device, dtype: torch.dtype, backward: bool) -> dict:
    torch.manual_seed(L)
    shape_q, shape_kv = (1, args.heads, L, args.head_dim), (1, args.kv_heads, L, args.head_dim)
    q = torch.randn(shape_q, device=device, dtype=dtype, requires_grad=backward)
    k = torch.randn(shape_kv, device=device, dtype=dtype, requires_grad=backward)
    v = torch.randn(shape_kv, device=device, dtype=dtype, requires_grad=backward)
    types = torch.randint(0, len(LAMBDAS), (1, L), device=device)
    row = {}
    for variant in VARIANTS:
        if variant == "HSA eager" and L > args.eager_max:
            row[variant] = {"skipped": f"longer than --eager-max {args.eager_max}"}
            continue
        if backward and device.type == "cpu" and "flex" in variant:
            row[variant] = {"skipped": "flex has no backward on CPU"}
            continue
        try:
            row[variant] = measure(make_call(variant, q, k, v, types), backward, args.repeats, device, (q, k, v))
        except torch.OutOfMemoryError:
            row[variant] = {"skipped": "out of memory"}
            torch.cuda.empty_cache()
    for base in ("sdpa causal", "flex causal"):
        ref = row[base].get("seconds")
        for variant in VARIANTS:
            mine = row[variant].get("seconds")
            if ref and mine:
                ratios = [a / b for a, b in zip(mine, ref)]
                row[variant][f"ratio_to_{base.replace(' ', '_')}"] = statistics.median(ratios)
    return row


def table(result: dict) -> str:
    lines = []
    for mode, rows in result["modes"].items():
        lines += [f"### {mode} ({result['dtype']}, {result['device_name']})", ""]
        lines.append("| tokens | " + " | ".join(VARIANTS) + " | HSA flex / flex causal | HSA flex / sdpa causal |")
        lines.append("|---" * (len(VARIANTS) + 3) + "|")
        for L, row in rows.items():
            cells = []
            for variant in VARIANTS:
                entry = row[variant]
                if "skipped" in entry:
                    cells.append(entry["skipped"])
                    continue
                mem = f", {entry['peak_mib']:.0f} MiB" if entry["peak_mib"] is not None else ""
                cells.append(f"{entry['seconds_median'] * 1e3:.2f} ms{mem}")
            flex = row["HSA flex"]
            ratios = [
                f"{flex[key]:.2f}x" if key in flex else "-" for key in ("ratio_to_flex_causal", "ratio_to_sdpa_causal")
            ]
            lines.append(f"| {L} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU by default")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--heads", type=int, default=28)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backward", action="store_true", help="also time forward+backward")
    parser.add_argument("--eager-max", type=int, default=8192, help="longest length for the eager reference")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    result = {
        "device": device.type,
        "device_name": name,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "repeats": args.repeats,
        "lambdas": LAMBDAS,
        "modes": {},
    }
    modes = ["forward"] + (["forward+backward"] if args.backward else [])
    for mode in modes:
        rows = {}
        for L in args.lengths:
            rows[L] = run_length(L, args, device, dtype, backward=mode != "forward")
            print(f"{mode} {L}: " + ", ".join(
                f"{v} {r['seconds_median'] * 1e3:.2f} ms" if "seconds" in r else f"{v} {r['skipped']}"
                for v, r in rows[L].items()
            ), flush=True)  # fmt: skip
        result["modes"][mode] = rows
    print(table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        args.out.with_suffix(".md").write_text(table(result) + "\n")


if __name__ == "__main__":
    main()
