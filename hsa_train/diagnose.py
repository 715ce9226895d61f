"""Attention diagnostics: how much attention each semantic type receives, per layer, with and without the bias.

    python -m hsa_train.diagnose outputs/<run>/model --data data/recall/eval_4x.jsonl --samples 32

For each sample the model runs twice through the eager HSA backend (which returns attention weights): once with its
λ, once with every λ at 0 (the same weights without the bias). For the chosen query positions (by default the ones
that predict the final answer) it adds up the attention weight that lands on keys of each type, averaged over
heads, queries and samples. The `context` row is what uniform attention over the visible keys would give: a
type's share of the context. Writes attention_by_type.{json,md,csv} and, with matplotlib (the `[plot]` extra), a heatmap
attention_by_type.png into --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from hsa_train.data.dataset import encode_files
from hsa_train.data.vision import folder_semantic_tokenizer
from hsa_train.model.hsa import HSALambdas, enable_hsa
from hsa_train.model.loading import load_pretrained
from hsa_train.model.settings import HSASettings
from hsa_train.model.vision import stack_images, vision_inputs
from hsa_train.types import one_line

QUERIES = ("answer", "all")


@contextmanager
def bias_off(model: torch.nn.Module):
    """Every λ at 0 inside the block (the model computes plain attention), restored after."""
    lambdas: HSALambdas = model.hsa
    saved = lambdas.raw.detach().clone()
    with torch.no_grad():
        lambdas.raw.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            lambdas.raw.copy_(saved)


def _query_positions(length: int, answer: tuple[int, int] | None, queries: str) -> torch.Tensor | None:
    """The positions whose attention is measured: those predicting the answer's tokens, or all."""
    if queries == "all":
        return torch.arange(length)
    if answer is None:
        return None
    start, end = answer
    return torch.arange(start - 1, end - 1)


@torch.no_grad()
def attention_by_type(
    model: torch.nn.Module,
    samples: Sequence,
    n_types: int,
    queries: str = "answer",
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor | int]:
    """{"with_bias", "without_bias"}: (layers, types) mean attention share; "keys": (types,) the context share;
    "queries": how many query positions were averaged. `samples` are hsa_train Samples (features + answer span);
    the model must have HSA enabled with the eager backend."""
    if queries not in QUERIES:
        raise ValueError(f"queries={queries!r}: use one of {', '.join(QUERIES)}")
    totals = {"with_bias": None, "without_bias": None}
    keys_total = torch.zeros(n_types, dtype=torch.float64)
    n_queries = 0
    for sample in samples:
        ids = torch.as_tensor(sample.features["input_ids"], dtype=torch.long)[None]
        sem = torch.as_tensor(sample.features["semantic_ids"], dtype=torch.long)[None]
        rows = _query_positions(ids.shape[1], sample.answer, queries)
        if rows is None or rows.numel() == 0:
            continue
        onehot = torch.nn.functional.one_hot(sem[0], n_types).double()  # (K, T): image tokens in their message's type
        batch = {"input_ids": ids, "semantic_ids": sem, "attention_mask": torch.ones_like(ids)}
        batch |= stack_images([sample.features])
        inputs = {**batch, **vision_inputs(model, batch)}
        for name in totals:
            with bias_off(model) if name == "without_bias" else torch.no_grad():
                out = model(
                    **{k: v.to(device) for k, v in inputs.items()},
                    output_attentions=True,
                    use_cache=False,
                )
            if not out.attentions or out.attentions[0] is None:
                raise RuntimeError("the model returned no attention weights: load it with HSA's eager backend")
            per_layer = torch.stack(
                [a[0].double().mean(0)[rows].cpu() @ onehot for a in out.attentions]  # (Q, T) per layer
            ).sum(1)
            totals[name] = per_layer if totals[name] is None else totals[name] + per_layer
        visible = onehot.cumsum(0) / torch.arange(1, onehot.shape[0] + 1, dtype=torch.float64)[:, None]
        keys_total += visible[rows].sum(0)
        n_queries += rows.numel()
    if n_queries == 0:
        raise ValueError("no query positions: no sample has a final answer (an assistant message); use queries=all")
    return {
        "with_bias": totals["with_bias"] / n_queries,
        "without_bias": totals["without_bias"] / n_queries,
        "keys": keys_total / n_queries,
        "queries": n_queries,
    }


def report_rows(result: dict, type_names: list[str]) -> list[dict[str, object]]:
    """One row per layer and setting, then the context share: {"layer", "bias", <type>: share}."""
    rows = []
    for layer in range(result["with_bias"].shape[0]):
        for setting in ("with_bias", "without_bias"):
            shares = result[setting][layer].tolist()
            rows.append({"layer": layer, "bias": setting == "with_bias", **dict(zip(type_names, shares))})
    rows.append({"layer": "context", "bias": None, **dict(zip(type_names, result["keys"].tolist()))})
    return rows


def table_cells(result: dict) -> list[list[str]]:
    """The printed table's rows: the layer, then "with / without bias" per type; last, each type's context share."""
    rows = [
        [
            str(layer),
            *(f"{w:.3f} / {wo:.3f}" for w, wo in zip(result["with_bias"][layer], result["without_bias"][layer])),
        ]
        for layer in range(result["with_bias"].shape[0])
    ]
    return rows + [["context", *(f"{v:.3f}" for v in result["keys"].tolist())]]


def write_reports(result: dict, type_names: list[str], out: Path, meta: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    rows = report_rows(result, type_names)
    payload = {
        **meta,
        "types": type_names,
        "queries_measured": result["queries"],
        "with_bias": result["with_bias"].tolist(),
        "without_bias": result["without_bias"].tolist(),
        "context_share": result["keys"].tolist(),
    }
    written = [out / "attention_by_type.json", out / "attention_by_type.csv", out / "attention_by_type.md"]
    written[0].write_text(json.dumps(payload, indent=2))
    with written[1].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["layer", "bias", *type_names])
        writer.writeheader()
        writer.writerows(rows)
    header = "| layer | " + " | ".join(f"{t} with / without bias" for t in type_names) + " |"
    lines = [
        f"Share of attention per key type ({meta['queries']} queries, {result['queries']} positions, "
        f"{meta['samples']} samples, λ = {meta['lambdas']})",
        "",
        header,
        "|---" * (len(type_names) + 1) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_cells(result)]
    written[2].write_text("\n".join(lines) + "\n")
    return written


def plot_heatmap(result: dict, type_names: list[str], path: Path, title: str) -> Path:
    """Two layer x type heatmaps (with / without the bias) on one colour scale. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["with_bias"].shape[0]
    fig, axes = plt.subplots(1, 2, figsize=(3 + 1.6 * len(type_names), 1.5 + 0.45 * layers), sharey=True)
    for ax, setting, label in zip(axes, ("with_bias", "without_bias"), ("with the HSA bias", "without (λ = 0)")):
        data = result[setting].numpy()
        image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for layer in range(layers):
            for t in range(len(type_names)):
                value = data[layer, t]
                ax.text(t, layer, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
        ax.set_xticks(range(len(type_names)), [n.replace("_", "\n") for n in type_names], fontsize=8)
        ax.set_yticks(range(layers), [f"layer {i}" for i in range(layers)])
        ax.set_title(label, fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.8, label="share of attention")
    fig.suptitle(title, fontsize=10, y=1.0 + 0.05 * (title.count("\n") + 1))  # above the panel titles
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def print_table(result: dict, type_names: list[str], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("layer", justify="right")
    for name in type_names:
        table.add_column(f"{name}\nwith / without bias", justify="right")
    for row in table_cells(result):
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def _parse_lambda(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lambda {text!r}: write TYPE=VALUE, e.g. PROCESS_NOISE=0.1") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hsa_train.diagnose", description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("model", help="a model folder written by hsa_train (<run dir>/model) or any causal LM folder")
    parser.add_argument("--data", nargs="+", required=True, help="JSON/JSONL conversation files to measure on")
    parser.add_argument("--samples", type=int, default=16, help="how many records to use, from the start (16)")
    parser.add_argument("--queries", choices=QUERIES, default="answer", help="answer (default) or all positions")
    parser.add_argument("--lambda", dest="lambdas", type=_parse_lambda, action="append", default=[],
                        help="override λ for a type, e.g. --lambda PROCESS_NOISE=0.2 (repeatable)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <model>/../diagnostics)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (cpu)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG heatmap")
    args = parser.parse_args(argv)

    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()

        model_dir = Path(args.model)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"{model_dir}: no such model folder")
        if args.samples < 1:
            raise ValueError(f"--samples {args.samples} must be >= 1")
        model = load_pretrained(str(model_dir), dtype=torch.float32)
        trained = HSASettings.of(model)
        enable_hsa(model, dict(args.lambdas), backend="eager")  # λ as trained (or the defaults), then overrides
        settings = HSASettings.of(model)
        if trained is None:
            print(f"note: {model_dir} was not trained with HSA; measuring the default λ {settings.lambdas}")
        model.to(args.device).eval()
        st = folder_semantic_tokenizer(str(model_dir), model)  # a vision model's with its image processor
        samples, _ = encode_files(args.data, st)
        samples = samples[: args.samples]
        result = attention_by_type(model, samples, len(settings.types), args.queries, args.device)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        print(f"hsa_train.diagnose: error: {one_line(exc)}", file=sys.stderr)
        return 2

    out = args.out or model_dir.parent / "diagnostics"
    meta = {
        "model": str(model_dir),
        "data": list(args.data),
        "samples": len(samples),
        "queries": args.queries,
        "lambdas": settings.lambdas,
    }
    title = f"share of attention by key type ({len(samples)} samples, {args.queries} queries)"
    lambdas = ", ".join(f"{k} {v:g}" for k, v in settings.lambdas.items())
    print_table(result, settings.types, f"{title}, λ: {lambdas}")
    written = write_reports(result, settings.types, out, meta)
    if not args.no_plot:
        try:
            png = out / "attention_by_type.png"
            written.append(plot_heatmap(result, settings.types, png, f"{title}\nλ: {lambdas}"))
        except ImportError:
            print("note: no PNG (matplotlib is not installed: pip install -e '.[plot]')")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
