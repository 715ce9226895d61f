"""Preprocessing throughput: hsa_train's full pipeline against plain tokenization, side by side in one process.

A seeded set of agent trajectories (20-500 messages: a task, observations and actions, a few key events; typed by
regex rules, not annotations) is encoded three ways, in alternating order, `--repeats` times:

- full: hsa_train's pipeline per conversation: types by rule, chat-template render, one-text tokenization with
  the cuts inference makes, semantic ids, labels, answer span (`RecordEncoder`, the code a training run uses);
- plain: the same conversations' rendered text (rendered beforehand, not timed) tokenized in batches of 64 with
  no semantic work: the floor any pipeline pays;
- seeds: the seed documents' loop: `tokenizer.encode(content)` per message and its type broadcast over the ids
  (no template, no labels; what hsa_train replaces).

Reports conversations/s and tokens/s per way (medians), the median per-repeat ratio full / plain, how the full
pipeline's cost per message grows with the number of messages (linear = flat), and the time to prepare the set
into the cache and to find it there again (a cached rerun). Writes JSON with --out.

    python benchmarks/preprocess.py --conversations 20000 --chunk 5000 --out benchmarks/results/preprocess_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

WORDS = (
    "the robot arm moves towards table door kitchen cup apple drawer left right forward camera sees red blue "
    "green box shelf gripper opens closes battery level nominal sensor reads path clear obstacle detected"
).split()


def trajectory(rng: random.Random) -> list[dict]:
    """A task, then observation / action pairs (one in ~15 a key event), 20-500 messages in all."""
    n = rng.randint(20, 500)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    messages = [
        {"role": "system", "content": "You control a household robot."},
        {"role": "user", "content": f"Task: {say(12)}."},
    ]
    while len(messages) < n:
        event = rng.random() < 1 / 15
        obs = f"Event: {say(rng.randint(6, 20))}." if event else f"Observation: {say(rng.randint(8, 40))}."
        messages.append({"role": "user", "content": obs})
        messages.append({"role": "assistant", "content": f"Action: {say(rng.randint(3, 12))}."})
    if messages[-1]["role"] != "assistant":
        messages.append({"role": "assistant", "content": f"Action: {say(4)}."})
    return messages


RULES = [
    {"pattern": "^Task:", "type": "GLOBAL_CONDITION"},
    {"pattern": "^Event:", "type": "KEY_EVENT"},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=0, help="conversations timed per repeat (0: all)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: the shipped one)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from hsa_train.data import SemanticTokenizer
    from hsa_train.data.loader import Record
    from hsa_train.data.prepare import Preprocess, RecordEncoder, Reports, prepare
    from hsa_train.data.spec import resolve_datasets
    from hsa_train.data.typing import TypeRules
    from hsa_train.model.loading import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    st = SemanticTokenizer(tokenizer)
    rng = random.Random(0)
    convs = [trajectory(rng) for _ in range(args.conversations)]
    n_messages = sum(map(len, convs))
    workdir = Path(tempfile.mkdtemp(prefix="hsa_preprocess_"))
    data_file = workdir / "trajectories.jsonl"
    with open(data_file, "w") as f:
        for messages in convs:
            f.write(json.dumps({"messages": messages}) + "\n")
    spec = resolve_datasets([{"path": str(data_file), "semantic_type_rules": RULES}], types=st.types)[0]
    rules = TypeRules(spec, st.types)
    texts = [st.render(m) for m in convs]  # for `plain`: rendered beforehand, not timed
    timed = convs if not args.chunk else convs[: args.chunk]

    def full() -> int:
        encode = RecordEncoder(st, Preprocess(), Reports())
        tokens = 0
        for k, messages in enumerate(timed):
            record = Record(rules.apply([dict(m) for m in messages]), str(data_file), k + 1)
            tokens += len(encode(record))
        return tokens

    def plain() -> int:
        tokens = 0
        for i in range(0, len(timed), 64):
            enc = tokenizer(texts[i : min(i + 64, len(timed))], add_special_tokens=False)
            tokens += sum(map(len, enc["input_ids"]))
        return tokens

    def seeds() -> int:
        type_id = {"GLOBAL_CONDITION": 0, "KEY_EVENT": 1, "PROCESS_NOISE": 2}
        tokens = 0
        for messages in timed:
            input_ids, semantic_ids = [], []
            for msg in messages:
                ids = tokenizer.encode(msg["content"], add_special_tokens=False)
                kind = "GLOBAL_CONDITION" if msg["content"].startswith("Task:") else "PROCESS_NOISE"
                semantic_ids.extend([type_id[kind]] * len(ids))
                input_ids.extend(ids)
            tokens += len(input_ids)
        return tokens

    ways = {"full": full, "plain": plain, "seeds": seeds}
    times: dict[str, list[float]] = {k: [] for k in ways}
    tokens: dict[str, int] = {}
    for r in range(args.repeats):
        order = list(ways) if r % 2 == 0 else list(reversed(ways))
        for name in order:
            t0 = time.perf_counter()
            tokens[name] = ways[name]()
            times[name].append(time.perf_counter() - t0)
            print(f"repeat {r + 1} {name}: {times[name][-1]:.1f} s", flush=True)
    n = len(timed)
    result = {
        "conversations": n,
        "messages": sum(map(len, timed)),
        "messages_all": n_messages,
        "repeats": args.repeats,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "ways": {},
    }
    for name in ways:
        med = statistics.median(times[name])
        result["ways"][name] = {
            "seconds_median": med,
            "conversations_per_s": n / med,
            "tokens_per_s": tokens[name] / med,
            "tokens": tokens[name],
        }
    ratios = [f / p for f, p in zip(times["plain"], times["full"])]
    result["full_vs_plain_speed_ratio_median"] = statistics.median(ratios)

    # Linearity: seconds per message of the full pipeline for short and long conversations.
    encode = RecordEncoder(st, Preprocess(), Reports())
    buckets = {"20-100": (20, 100), "100-250": (100, 250), "250-500": (250, 501)}
    per_message = {}
    for label, (lo, hi) in buckets.items():
        group = [m for m in timed if lo <= len(m) < hi][:200]
        t0 = time.perf_counter()
        for k, messages in enumerate(group):
            encode(Record(rules.apply([dict(m) for m in messages]), "bench", k + 1))
        elapsed = time.perf_counter() - t0
        per_message[label] = 1e6 * elapsed / max(1, sum(map(len, group)))
    result["full_us_per_message_by_length"] = per_message
    for name, w in result["ways"].items():
        print(f"{name:>6}: {w['conversations_per_s']:8.1f} conversations/s {w['tokens_per_s']:12,.0f} tokens/s")
    print(f"full / plain speed (median of repeats): {result['full_vs_plain_speed_ratio_median']:.2f}")
    print("full, µs per message by conversation length:", {k: round(v, 1) for k, v in per_message.items()}, flush=True)

    # Preparing into the cache (one worker), then finding it there (a rerun).
    cache_root = workdir / "cache"
    t0 = time.perf_counter()
    built = prepare(spec, st, Preprocess(), cache_root)
    result["prepare_build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = prepare(spec, st, Preprocess(), cache_root)
    result["prepare_cached_s"] = time.perf_counter() - t0
    if not (again.cached and len(again.samples) == len(built.samples) == args.conversations):
        raise SystemExit(
            f"the rerun did not find the prepared set in the cache (cached={again.cached}, {len(again.samples)} vs "
            f"{len(built.samples)} samples): was hsa_train/data edited meanwhile? (its source is part of the key)"
        )
    print(f"prepare: build {result['prepare_build_s']:.1f} s, cached rerun {result['prepare_cached_s']:.2f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
