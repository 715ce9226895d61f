"""Regenerates the recall benchmark: robot trajectories whose final answer needs the task and one key event.

    python data/generate_recall.py          # writes data/recall/{train,eval_1x,eval_2x,eval_4x}.jsonl

Each trajectory opens with the task (GLOBAL_CONDITION: which object, and which receptacle in which room it must go
to), then runs rounds of routine observations and actions (PROCESS_NOISE); one round, at a uniformly random
point, is the key event (KEY_EVENT: the object seen on some furniture in some room, and picked up). The last
question asks where the object was and where it goes; the answer

    The <colour> <object> is on the <furniture> in the <room>. Put it in the <receptacle> in the <room>.

copies two facts from the key event and two from the task. The noise names rooms, furniture and other coloured
objects all the time (some of the same object in another colour), and the routine actions copy them ("inspect
the red lamp on the counter"), so only the task and the key event give the answer away; the room the object
goes to is never named after the task.

Training trajectories have 3-6 rounds (270-500 tokens, 370 on average); the eval sets have the same length, about
twice (780) and four times (1,570) as many tokens, so recall has to reach 2x and 4x further back than anything
seen in training. The final answer is what the exact-match metric scores (`eval_exact_match`,
`eval_sets.<name>.exact_match`). Vocabulary comes from the demo generator, so the shipped tokenizer covers it.
One seeded RNG per file: the files are identical on every machine.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from generate_demo import (
    ADJECTIVES,
    COLORS,
    FURNITURE,
    NOISE,
    OBJECTS,
    RECEPTACLES,
    ROOMS,
    SOUNDS,
    STATES,
    SYSTEM,
    msg,
    write_jsonl,
)

# (name, rounds per trajectory, records, seed): the training length, and held-out sets about 2x and 4x as many
# tokens (a round is ~55 tokens; the system prompt, task, question and answer ~130).
SPLITS = [
    ("train", (3, 6), 2400, 11),
    ("eval_1x", (3, 6), 200, 12),
    ("eval_2x", (10, 14), 200, 13),
    ("eval_4x", (24, 30), 200, 14),
]


def observation(rng: random.Random, room: str, target: tuple[str, str]) -> tuple[str, str | None]:
    """A routine observation: position, clutter, and often another coloured object on some furniture (never the
    target), so the answer's furniture and room words are everywhere in the noise. Returns (text, the other
    object's "colour object on the furniture" or None)."""
    text = (
        f"You are in the {room} at x={rng.randint(-999, 999)}, y={rng.randint(-999, 999)}. "
        f"You see {', '.join(rng.sample(NOISE, rng.randint(1, 2)))}. Battery at {rng.randint(20, 99)}%."
    )
    other = None
    if rng.random() < 0.6:
        while (pair := (rng.choice(COLORS), rng.choice(OBJECTS))) == target:
            pass
        furniture = rng.choice(FURNITURE)
        other = f"{pair[0]} {pair[1]} on the {furniture}"
        text += f" A {pair[0]} {pair[1]} is on the {furniture}."
    if rng.random() < 0.4:
        text += f" A {rng.choice(ADJECTIVES)} {rng.choice(RECEPTACLES)} is {rng.choice(STATES)}."
    if rng.random() < 0.2:
        text += " " + rng.choice(SOUNDS)
    return text, other


def trajectory(rng: random.Random, rounds: int) -> dict:
    color, obj = rng.choice(COLORS), rng.choice(OBJECTS)
    src, dst = rng.sample(ROOMS, 2)
    furniture, receptacle = rng.choice(FURNITURE), rng.choice(RECEPTACLES)
    messages = [
        msg("system", SYSTEM, "GLOBAL_CONDITION"),
        msg("user", f"Task: find the {color} {obj}. Put it in the {receptacle} in the {dst}.", "GLOBAL_CONDITION"),
    ]
    found_at = rng.randrange(rounds)
    room = rng.choice([r for r in ROOMS if r != src])
    for step in range(rounds):
        if step == found_at:
            room = src
            seen, _ = observation(rng, room, (color, obj))
            messages.append(msg("user", seen, "PROCESS_NOISE"))
            messages.append(msg("user", f"Event: the {color} {obj} is on the {furniture}.", "KEY_EVENT"))
            messages.append(msg("assistant", f"Action: pick up the {color} {obj} from the {furniture}.", "KEY_EVENT"))
            messages.append(msg("user", f"Event: you are holding the {color} {obj}.", "KEY_EVENT"))
            messages.append(msg("assistant", "Action: look around.", "PROCESS_NOISE"))
            continue
        untyped = rng.random() < 0.3  # some observations carry no type: they get the default (PROCESS_NOISE)
        seen, other = observation(rng, room, (color, obj))
        messages.append(msg("user", seen, None if untyped else "PROCESS_NOISE"))
        if other is not None and rng.random() < 0.5:  # the routine copying the policy does all the time
            action = f"inspect the {other}"
        elif rng.random() < 0.6:
            room = rng.choice([r for r in ROOMS if r != room])
            action = f"go to the {room}"
        else:
            action = rng.choice(["look around", f"open {rng.choice(NOISE)}", "check battery"])
        messages.append(msg("assistant", f"Action: {action}.", "PROCESS_NOISE"))
    messages.append(msg("user", f"Question: where was the {color} {obj}, and where does it go?", None))
    messages.append(msg("assistant", f"It was on the {furniture}. It goes to the {dst}.", "KEY_EVENT"))
    return {"messages": messages}


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=here / "recall")
    args = parser.parse_args()
    for name, (low, high), count, seed in SPLITS:
        rng = random.Random(seed)
        records = [trajectory(rng, rng.randint(low, high)) for _ in range(count)]
        write_jsonl(args.out / f"{name}.jsonl", records)
        print(f"wrote {count} trajectories of {low}-{high} rounds to {args.out / f'{name}.jsonl'}")


if __name__ == "__main__":
    main()
