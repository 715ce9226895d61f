"""`python -m hsa_train.inspect [--samples N] [--eval] [--svg FILE] [overrides]`: look at the data before spending
GPU hours on it.

It prepares the data exactly as `python -m hsa_train` with the same overrides would (same config, same cache),
prints the first N encoded samples with every token coloured by its semantic type and the trained tokens
underlined, then a table of tokens per type (all and trained), sample lengths, what truncation and packing did,
and which rule gave the tokens their types.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
from hydra import compose, initialize_config_module
from rich.console import Console
from rich.table import Table
from rich.text import Text

from hsa_train.config import ConfigError, validate
from hsa_train.data.collator import SemanticCollator
from hsa_train.data.pipeline import PairPool, RunData, load_run_data
from hsa_train.data.typing import TypingReport
from hsa_train.data.vision import semantic_tokenizer
from hsa_train.model.loading import load_processing
from hsa_train.overrides import unknown_key_message
from hsa_train.types import IGNORE_INDEX, SemanticTypes, one_line

STYLES = ["bold green", "bold yellow", "cyan", "magenta", "blue", "red", "bright_white"]
NOISE = "grey50"


def type_styles(type_names: Sequence[str], default_type: str) -> dict[int, str]:
    """A colour per type; the default (most often routine noise) is grey so the rest stands out."""
    styles, k = {}, 0
    for i, name in enumerate(type_names):
        if name == default_type:
            styles[i] = NOISE
        else:
            styles[i] = STYLES[k % len(STYLES)]
            k += 1
    return styles


def sample_text(sample, tokenizer, styles: dict[int, str], max_tokens: int | None) -> Text:
    """The sample's text, runs of tokens with the same type and trained-ness decoded together (a run rarely ends
    inside a character, so byte-level tokens decode cleanly) and styled: colour = type, underline = trained."""
    ids = sample.features["input_ids"]
    sem = sample.features["semantic_ids"]
    trained = sample.features["labels"] != IGNORE_INDEX
    n = len(ids) if max_tokens is None else min(len(ids), max_tokens)
    text = Text()
    start = 0
    for t in range(1, n + 1):
        if t == n or sem[t] != sem[start] or trained[t] != trained[start]:
            piece = tokenizer.decode(ids[start:t].tolist(), skip_special_tokens=False)
            style = styles.get(int(sem[start]), "") + (" underline" if trained[start] else "")
            text.append(piece, style=style)
            start = t
    if n < len(ids):
        text.append(f" … ({len(ids) - n} more tokens)", style="dim italic")
    return text


def token_table(samples, type_names: Sequence[str], styles: dict[int, str], title: str) -> Table:
    """Tokens per type over `samples`: all of them, the trained ones, and their shares."""
    n_types = len(type_names)
    all_counts = np.zeros(n_types, dtype=np.int64)
    trained = np.zeros(n_types, dtype=np.int64)
    for sample in samples:
        sem = sample.features["semantic_ids"]
        all_counts += np.bincount(sem, minlength=n_types)[:n_types]
        trained += np.bincount(sem[sample.features["labels"] != IGNORE_INDEX], minlength=n_types)[:n_types]
    table = Table(title=f"tokens per semantic type ({title})", title_justify="left")
    for col in ("type", "tokens", "share", "trained", "share"):
        table.add_column(col, justify="left" if col == "type" else "right")
    total, total_trained = max(int(all_counts.sum()), 1), max(int(trained.sum()), 1)
    for i, name in enumerate(type_names):
        table.add_row(
            Text(name, style=styles[i]),
            f"{all_counts[i]:,}",
            f"{all_counts[i] / total:.1%}",
            f"{trained[i]:,}",
            f"{trained[i] / total_trained:.1%}",
        )
    return table


def figures_table(data: RunData) -> Table:
    """Lengths, rows, truncation and packing at a glance."""
    train = data.train
    lengths = train.pool.lengths[train.ids]
    table = Table(title="training data", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    twos = isinstance(train.pool, PairPool)
    labelled = twos and len(train.pool) > 0 and train.pool[0][0].desirable is not None
    unit = "labelled samples" if labelled else "pairs" if twos else "samples"
    table.add_row(f"{unit} (train / eval)", f"{len(train.ids):,} / {len(data.eval):,}")
    longer = ", the longer of each sample and its KL sample" if labelled else ", the longer side of each pair"
    table.add_row("tokens (train)" + (longer if twos else ""), f"{train.tokens:,}")
    if len(lengths):
        p = np.percentile(lengths, [0, 50, 95, 100]).astype(int)
        table.add_row("length min / median / p95 / max", " / ".join(f"{x:,}" for x in p))
    if train.packed:
        table.add_row("packed rows", f"{len(train):,} of {train.capacity:,} tokens")
        table.add_row("packing efficiency (tokens / row slots)", f"{train.efficiency:.1%}")
    for name, rep in data.reports.items():
        table.add_row(f"{name}: records", rep.load.summary())
        table.add_row(f"{name}: trained", rep.trained.summary())
        table.add_row(f"{name}: truncation", rep.truncation.summary())
    return table


def rules_table(data: RunData) -> Table:
    """Which rule typed how many tokens, per type."""
    table = Table(title="where the types came from (tokens of every record kept, eval included)", title_justify="left")
    for col in ("type", "rule", "tokens", "share"):
        table.add_column(col, justify="left" if col in ("type", "rule") else "right")
    for type_name, rule, count, share in TypingReport.merged(rep.typing for rep in data.reports.values()).rows():
        table.add_row(type_name, rule, f"{count:,}", f"{share:.1%}")
    return table


def sides(items, kl: bool = True):
    """(sample, what it is) one at a time: a preference pair (stage=dpo) as its chosen side, then its rejected one;
    a labelled sample (stage=kto) as itself, then (`kl`) its KL sample, which is no data of its own."""
    for item in items:
        if not isinstance(item, tuple):
            yield item, ""
        elif item[0].desirable is None:
            yield from zip(item, ("chosen", "rejected"))
        else:
            yield item[0], "desirable" if item[0].desirable else "undesirable"
            if kl:
                yield item[1], "its KL sample: the next record's completion"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hsa_train.inspect",
        description="Show how the run's data are encoded: tokens coloured by semantic type (underlined: trained), "
        "tokens per type, lengths, truncation, packing and typing rules. Takes the training run's overrides.",
    )
    parser.add_argument("--samples", type=int, default=3, help="how many encoded samples to print (default 3)")
    parser.add_argument("--eval", action="store_true", help="print eval samples instead of training samples")
    parser.add_argument("--max-tokens", type=int, default=600, help="tokens shown per sample (default 600)")
    parser.add_argument("--svg", help="also save what is printed as an SVG screenshot to this file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m hsa_train")
    args = parser.parse_args(argv)

    problem = unknown_key_message(args.overrides)
    if problem:
        print(f"hsa_train.inspect: config error: {problem}", file=sys.stderr)
        return 2
    try:
        with initialize_config_module(config_module="hsa_train.conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=args.overrides)
        run = validate(cfg)
        types = SemanticTypes.from_names(run.hsa.types, run.hsa.default_type)
        st = semantic_tokenizer(load_processing(run.model), types, run.data.train_on, run.data.train_reasoning)
        collator = SemanticCollator.from_tokenizer(st)
        data = load_run_data(run.data, st, collator, run.seed, plan=run.dataset_plan, pairs=run.stage.preference)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"hsa_train.inspect: error: {one_line(exc)}", file=sys.stderr)
        return 2

    console = Console(record=bool(args.svg), highlight=False)
    names = list(st.types.names)
    styles = type_styles(names, st.types.default)
    legend = Text("types: ")
    for i, name in enumerate(names):
        legend.append(name, style=styles[i]).append("  ")
    legend.append("trained", style="underline")
    console.print(legend)
    if not st.renders_tools and data.uses_tools:
        console.print(f"note: {st.tools_note}", style="dim")
    first = data.eval if args.eval else [data.train.pool[int(i)] for i in data.train.ids[: args.samples]]
    pool = list(sides(first))
    for k in range(min(args.samples, len(pool))):
        sample, what = pool[k]
        trained = int((sample.features["labels"] != IGNORE_INDEX).sum())
        what = f" ({what})" if what else ""  # before the place: a narrow terminal cuts the rule's end
        console.rule(f"sample {k}{what}: {sample.where}, {len(sample)} tokens, {trained} trained")
        console.print(sample_text(sample, st.tokenizer, styles, args.max_tokens))
    console.rule()
    every = data.eval if args.eval else (data.train.pool[int(i)] for i in data.train.ids)
    shown = (sample for sample, _ in sides(every, kl=False))  # one at a time
    console.print(token_table(shown, names, styles, "eval samples" if args.eval else "training samples"))
    console.print(figures_table(data))
    console.print(rules_table(data))
    if args.svg:
        console.save_svg(args.svg, title="hsa_train.inspect")
    return 0


if __name__ == "__main__":
    sys.exit(main())
