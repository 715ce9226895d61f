"""Regenerates the associative-recall task (MQAR-style, after Zoology's multi-query associative recall) as
trajectories.

    python data/generate_mqar.py          # writes data/mqar/{train,eval_1x,eval_2x,eval_4x}.jsonl
                                          # and data/mqar/latest_{train,eval_1x,eval_2x,eval_4x}.jsonl

Each trajectory opens with the task (GLOBAL_CONDITION), then runs observations: filler (PROCESS_NOISE, "Obs: gauge 4.",
with the same digit tokens the codes use) and, at random points in its first half, key events (KEY_EVENT,
"Event: door red 7."). At the end come questions (GLOBAL_CONDITION, "Question: door red?"), each answered
"The door red 7.": the code is one token, the very token that followed the key in its event (the induction
pattern). The other doors' events are the distractors: the answer is the digit after *this* key.

Two variants:
- recall: four doors, one event each; every door is asked for (four recalls per trajectory).
- latest: three doors, and two of them change code later ("Event: door red 2." again, further on); the answer is
  the latest code. Recency matters here, but only among key events: the noise between them is not what decides.

Every answer trains; its code is the one token the question does not give away, and guessing gives 10% (25% or
33% among the trajectory's own codes). Training trajectories have 6-10 filler lines (about 285 tokens with the
chat template); the eval sets have the same, and 24-32 and 62-76 lines (about 565 and 1,150 tokens: twice and four
times the training length), with the events spread over their first half, so recall reaches 2x and 4x further
back than training ever did. One seeded RNG per file: the files are identical on every machine (a test
regenerates them and compares).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

COLORS = ["red", "blue", "green", "black", "white", "orange", "purple", "yellow"]  # one token each, with a space
TASK = "Remember the code of each door you are told of. Answer a question with the code alone."
FILLER = ["Obs: gauge {d}.", "Obs: step {d}.", "Obs: lamp {d} on.", "Obs: quiet hall.", "Obs: you walk on."]
LENGTHS = {"train": (6, 10), "valid": (6, 10), "eval_1x": (6, 10), "eval_2x": (24, 32), "eval_4x": (62, 76)}  # filler
COUNTS = {"train": 2000, "valid": 200, "eval_1x": 200, "eval_2x": 200, "eval_4x": 200}
VARIANTS = {"recall": (4, 0), "latest": (3, 2)}  # doors, doors whose code changes later


def event(door: str, code: int) -> dict:
    return {"role": "user", "content": f"Event: door {door} {code}.", "semantic_type": "KEY_EVENT"}


def trajectory(rng: random.Random, filler: int, doors: int, changes: int) -> dict:
    names = rng.sample(COLORS, doors)
    codes = {c: rng.randrange(10) for c in names}
    lines = [
        {"role": "user", "content": rng.choice(FILLER).format(d=rng.randrange(10)), "semantic_type": "PROCESS_NOISE"}
        for _ in range(filler)
    ]
    for c in names:  # each first event in the first half of the observations, at a uniformly random point
        lines.insert(rng.randrange(len(lines) // 2 + 1), event(c, codes[c]))
    for c in rng.sample(names, changes):  # a change: later than the door's first event, a new code
        first = next(i for i, m in enumerate(lines) if m["content"].startswith(f"Event: door {c} "))
        codes[c] = rng.choice([d for d in range(10) if d != codes[c]])
        lines.insert(rng.randrange(first + 1, len(lines) + 1), event(c, codes[c]))
    questions = []
    for c in rng.sample(names, doors):
        questions += [
            {"role": "user", "content": f"Question: door {c}?", "semantic_type": "GLOBAL_CONDITION"},
            {"role": "assistant", "content": f"The door {c} {codes[c]}."},
        ]
    return {"messages": [{"role": "system", "content": TASK, "semantic_type": "GLOBAL_CONDITION"}, *lines, *questions]}


def files() -> dict[str, list[dict]]:
    """{file name: records} of every set of both variants."""
    out = {}
    for v, (variant, (doors, changes)) in enumerate(VARIANTS.items()):
        prefix = "" if variant == "recall" else f"{variant}_"
        for s, (name, (low, high)) in enumerate(LENGTHS.items()):
            rng = random.Random(1000 + 10 * v + s)
            out[f"{prefix}{name}.jsonl"] = [
                trajectory(rng, rng.randint(low, high), doors, changes) for _ in range(COUNTS[name])
            ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "mqar"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in files().items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
