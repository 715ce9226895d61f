"""Regenerates the bundled demo data and the tokenizer shipped in the package.

    python data/generate_demo.py            # writes data/demo/*.jsonl and hsa_train/assets/tokenizer/

The demo is a synthetic embodied agent: a household robot gets a task (GLOBAL_CONDITION), walks through rooms
reporting observations and taking routine actions (PROCESS_NOISE), hits a few milestones (KEY_EVENT: the object
found, picked up, placed), and finally answers a question that needs the task and the milestones. Everything is
drawn from one seeded RNG, so the files are identical on every machine.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOMS = ["kitchen", "hallway", "living room", "bedroom", "bathroom", "garage", "garden", "office", "pantry", "attic"]
OBJECTS = ["apple", "mug", "book", "key", "remote", "towel", "phone", "plant", "bottle", "sock", "lamp", "ball"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
FURNITURE = ["table", "shelf", "counter", "chair", "desk", "bench", "floor", "windowsill"]
RECEPTACLES = ["fridge", "drawer", "box", "basket", "cabinet", "sink", "bin", "closet"]
NOISE = [
    "a door",
    "a rug",
    "a window",
    "a painting",
    "a clock",
    "a plant pot",
    "a coat",
    "some boxes",
    "a fan",
    "a radiator",
    "a mirror",
    "a trash can",
    "a pair of shoes",
    "a cable",
    "a poster",
]
ADJECTIVES = [
    "dusty",
    "shiny",
    "broken",
    "wooden",
    "metal",
    "plastic",
    "heavy",
    "small",
    "large",
    "old",
    "new",
    "wet",
    "dry",
    "warm",
    "cold",
    "soft",
    "hard",
    "striped",
    "spotted",
    "folded",
    "open",
    "closed",
    "empty",
    "full",
    "tall",
    "short",
    "round",
    "square",
    "bright",
    "dark",
    "quiet",
    "noisy",
    "clean",
    "dirty",
    "sticky",
    "fragile",
    "rusty",
    "glass",
    "paper",
    "leather",
    "woollen",
    "ceramic",
    "velvet",
    "painted",
    "faded",
]
THINGS = [
    "carpet",
    "curtain",
    "cushion",
    "blanket",
    "pillow",
    "vase",
    "frame",
    "candle",
    "basket",
    "bucket",
    "broom",
    "ladder",
    "toolbox",
    "hammer",
    "screwdriver",
    "bicycle",
    "helmet",
    "umbrella",
    "jacket",
    "scarf",
    "glove",
    "backpack",
    "suitcase",
    "laptop",
    "keyboard",
    "monitor",
    "printer",
    "speaker",
    "router",
    "charger",
    "kettle",
    "toaster",
    "blender",
    "microwave",
    "oven",
    "stove",
    "pan",
    "pot",
    "plate",
    "bowl",
    "fork",
    "spoon",
    "knife",
    "cup",
    "jar",
    "tin",
    "carton",
    "newspaper",
    "magazine",
    "notebook",
    "pencil",
    "marker",
    "envelope",
    "parcel",
    "calendar",
    "thermostat",
    "doorbell",
    "light switch",
    "power socket",
    "extension cord",
    "vacuum cleaner",
    "washing machine",
    "dryer",
    "iron",
    "hanger",
    "shoe rack",
    "coat hook",
    "bookcase",
    "sofa",
    "armchair",
    "stool",
    "wardrobe",
    "dresser",
    "nightstand",
    "mattress",
    "bathtub",
    "shower",
    "toilet",
    "faucet",
    "soap",
    "toothbrush",
    "shampoo",
    "sponge",
    "bin bag",
    "watering can",
    "flower pot",
    "hose",
    "rake",
    "shovel",
    "fence",
    "gate",
    "mailbox",
    "doormat",
    "staircase",
    "banister",
    "ceiling fan",
    "smoke detector",
    "alarm clock",
    "globe",
    "chessboard",
    "puzzle",
    "guitar",
    "piano",
    "drum",
    "violin",
    "teddy bear",
    "toy car",
    "kite",
    "skateboard",
]
STATES = [
    "on the floor",
    "against the wall",
    "near the door",
    "under the window",
    "in the corner",
    "on a shelf",
    "behind the sofa",
    "next to the lamp",
    "by the stairs",
    "on top of a box",
    "half hidden",
    "partly covered",
    "leaning on a chair",
    "in the middle of the room",
    "close to you",
    "far from you",
    "out of reach",
]
SOUNDS = [
    "You hear a dog barking outside.",
    "The lights flicker briefly.",
    "A door closes somewhere.",
    "The floor creaks.",
    "It is raining outside.",
    "A phone rings in another room.",
    "The heating turns on.",
    "Music plays quietly.",
    "Someone is talking on the radio.",
    "The fridge hums.",
    "Wind rattles the window.",
    "A clock ticks loudly.",
    "Water drips from a tap.",
    "Birds sing in the garden.",
    "A car passes by.",
]
SYSTEM = "You are a household robot. Reply with exactly one action per turn, and answer questions briefly."

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def msg(role: str, content: str, stype: str | None) -> dict:
    m = {"role": role, "content": content}
    if stype is not None:
        m["semantic_type"] = stype
    return m


def observation(rng: random.Random, room: str, extra: str | None = None) -> str:
    seen = rng.sample(NOISE, rng.randint(1, 3))
    text = (
        f"You are in the {room} at x={rng.randint(-999, 999)}, y={rng.randint(-999, 999)}, heading "
        f"{rng.randint(0, 359)} degrees. You see {', '.join(seen)}. Battery at {rng.randint(20, 99)}%."
    )
    for _ in range(rng.randint(0, 2)):
        text += f" A {rng.choice(ADJECTIVES)} {rng.choice(THINGS)} is {rng.choice(STATES)}."
    if rng.random() < 0.3:
        text += " " + rng.choice(SOUNDS)
    return f"{text} {extra}" if extra else text


def trajectory(rng: random.Random, min_steps: int, max_steps: int) -> dict:
    color, obj = rng.choice(COLORS), rng.choice(OBJECTS)
    src, dst = rng.sample(ROOMS, 2)
    furniture, receptacle = rng.choice(FURNITURE), rng.choice(RECEPTACLES)
    task = f"Task: find the {color} {obj} and put it in the {receptacle} in the {dst}."
    messages = [msg("system", SYSTEM, "GLOBAL_CONDITION"), msg("user", task, "GLOBAL_CONDITION")]

    n_steps = rng.randint(min_steps, max_steps)
    found_at = rng.randint(n_steps // 4, n_steps // 2)
    placed_at = rng.randint(found_at + 2, n_steps - 1)
    room = rng.choice([r for r in ROOMS if r != src])
    holding = False
    for step in range(n_steps):
        untyped = rng.random() < 0.3  # some observations carry no type: they get the default (PROCESS_NOISE)
        if step == found_at:
            room = src
            messages.append(
                msg("user", observation(rng, room, f"Event: the {color} {obj} is on the {furniture}."), "KEY_EVENT")
            )
            messages.append(msg("assistant", f"Action: pick up the {color} {obj}.", "KEY_EVENT"))
            messages.append(msg("user", f"Event: you are holding the {color} {obj}.", "KEY_EVENT"))
            messages.append(msg("assistant", f"Action: go to the {dst}.", "PROCESS_NOISE"))
            holding = True
        elif step == placed_at:
            room = dst
            messages.append(msg("user", observation(rng, room, f"You see the {receptacle}."), "PROCESS_NOISE"))
            messages.append(msg("assistant", f"Action: put the {color} {obj} in the {receptacle}.", "KEY_EVENT"))
            messages.append(msg("user", f"Event: the {color} {obj} is in the {receptacle}.", "KEY_EVENT"))
            messages.append(msg("assistant", "Action: wait.", "PROCESS_NOISE"))
            holding = False
        else:
            messages.append(msg("user", observation(rng, room), None if untyped else "PROCESS_NOISE"))
            if holding:
                action = f"go to the {dst}" if room != dst else "look around"
            elif step > placed_at:
                action = rng.choice(["wait", "look around", "check battery"])
            else:
                action = rng.choice(
                    [
                        f"go to the {rng.choice([r for r in ROOMS if r != room])}",
                        "look around",
                        f"open {rng.choice(NOISE)}",
                    ]
                )
            messages.append(msg("assistant", f"Action: {action}.", "PROCESS_NOISE"))
            if action.startswith("go to the "):
                room = action[len("go to the ") :]
    messages.append(msg("user", f"Question: where is the {color} {obj} now, and where did you find it?", None))
    messages.append(
        msg(
            "assistant",
            f"The {color} {obj} is in the {receptacle} in the {dst}. I found it on the {furniture} in the {src}.",
            "KEY_EVENT",
        )
    )
    return {"messages": messages}


def preference_pair(rng: random.Random, record: dict) -> dict:
    """A trajectory as a preference pair (ours: `messages` the prompt, `chosen` / `rejected` its answers): the true
    answer against a failed one, a third of each kind: a routine action where the question wants an answer; the
    destination swapped for another room the robot walked through (only the task, at the start, names it); where
    the object was found swapped so (only the KEY_EVENT among the routine steps names it). `kind` says which."""
    *prompt, answer = record["messages"]
    text = answer["content"]
    dst = text.split(" in the ", 2)[2].split(". I found")[0]
    src = text.rsplit(" in the ", 1)[1].rstrip(".")
    seen = [r for r in ROOMS if any(m["content"].startswith(f"You are in the {r} ") for m in prompt)]
    wrong = rng.choice([r for r in seen if r not in (src, dst)] or [r for r in ROOMS if r not in (src, dst)])
    kind = rng.choice(["action", "destination", "found"])
    if kind == "action":
        rejected = f"Action: {rng.choice(['look around', 'wait', 'check battery'])}."
    elif kind == "destination":
        rejected = text.replace(f" in the {dst}. I found", f" in the {wrong}. I found", 1)
    else:
        rejected = text.rsplit(f" in the {src}.", 1)[0] + f" in the {wrong}."
    assert rejected != text
    return {"messages": prompt, "chosen": answer, "rejected": {**answer, "content": rejected}, "kind": kind}


def labelled_sample(rng: random.Random, pair: dict) -> dict:
    """A preference pair as one labelled sample for KTO (`label` true: the chosen answer; false: the rejected one),
    half of each, unpaired: the other answer is not kept."""
    desirable = rng.random() < 0.5
    answer = pair["chosen"] if desirable else pair["rejected"]
    return {"messages": [*pair["messages"], answer], "label": desirable, "kind": pair["kind"]}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def train_tokenizer(records: list[dict], out_dir: Path, vocab_size: int) -> None:
    """A byte-level BPE (any UTF-8 text round-trips) with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts():
        for rec in records:
            for m in rec["messages"]:
                yield f"{m['role']}\n{m['content']}\n"

    tok.train_from_iterator(texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHATML_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():
        if old.is_file() and old.name != "__init__.py":
            old.unlink()
    fast.save_pretrained(str(out_dir))


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--train", type=int, default=1000, help="number of training trajectories")
    parser.add_argument("--pairs", type=int, default=600, help="preference pairs, from the first trajectories")
    parser.add_argument("--min-steps", type=int, default=6)
    parser.add_argument("--max-steps", type=int, default=11)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=here / "demo")
    parser.add_argument("--tokenizer-out", type=Path, default=here.parent / "hsa_train" / "assets" / "tokenizer")
    args = parser.parse_args()

    if args.min_steps < 5 or args.max_steps < args.min_steps:
        parser.error("need 5 <= --min-steps <= --max-steps (milestones need room between them)")
    rng = random.Random(args.seed)
    records = [trajectory(rng, args.min_steps, args.max_steps) for _ in range(args.train)]
    write_jsonl(args.out / "trajectories.jsonl", records)
    pair_rng = random.Random(args.seed + 1)  # its own stream: the trajectories stay as they were
    pairs = [preference_pair(pair_rng, record) for record in records[: args.pairs]]
    write_jsonl(args.out / "preferences.jsonl", pairs)
    label_rng = random.Random(args.seed + 2)
    write_jsonl(args.out / "labelled.jsonl", [labelled_sample(label_rng, pair) for pair in pairs])
    train_tokenizer(records, args.tokenizer_out, args.vocab_size)
    print(f"wrote {len(records)} trajectories, {len(pairs)} preference pairs, as many labelled samples: {args.out}")
    print(f"wrote a {args.vocab_size}-token tokenizer to {args.tokenizer_out}")


if __name__ == "__main__":
    main()
