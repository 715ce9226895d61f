"""Regenerates the vision-language demo: a robot must remember a coloured marker it saw in its first camera frame.

    python data/generate_vl_demo.py         # writes data/vl_demo/{train,eval}.jsonl and data/vl_demo/images/

Each record is one short trajectory of an embodied agent, in LLaMA-Factory's multimodal layout
(`{"messages": [...], "images": [...]}`; each `<image>` in a message's content takes the next path of `images`, in
order over the whole conversation; paths are relative to the folder of the jsonl file):

- system: who the agent is (GLOBAL_CONDITION: the condition for the whole run, never fades);
- user: the task, text only (GLOBAL_CONDITION: never fades);
- user "Frame 0: <image>": the scene, an 84x84 light background with one filled circle or square, about a
  quarter of the side, of one of 4 colours (red, green, blue, yellow) in one of 4 corners (KEY_EVENT: the one
  frame the answer needs, so it fades slowly);
- assistant "Marker noted. Moving on." (PROCESS_NOISE);
- 3 to 8 routine steps: user "Frame k: <image>" with a 56x56 noise frame (gray-ish blocks or stripes, never a
  saturated marker colour), then assistant "Step k: moving forward." and the like (PROCESS_NOISE: routine, fades
  fast);
- user "Which corner was the <colour> marker in?" (PROCESS_NOISE), naming the colour actually shown;
- assistant "The <colour> marker was in the <corner> corner." (PROCESS_NOISE), a fixed template, so exact-match
  evaluation is meaningful.

Colour and corner are balanced: every 16 records in a row show each (colour, corner) pair once, in shuffled
order (the 240 training records hold each pair 15 times). A record's text is at most 600 characters. Images are
shared between records: one scene frame per (colour, corner), its shape (circle or square) drawn once, and a pool
of 40 noise frames. Everything comes from one seeded RNG and PNGs are written with fixed parameters and no
metadata, so the files are identical on every run.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
CORNERS = ["top left", "top right", "bottom left", "bottom right"]
SHAPES = ["circle", "square"]
SCENE_SIZE = 84
NOISE_SIZE = 56
MARKER_SIZE = 24  # a bit over a quarter of the scene's side
MARKER_MARGIN = 6
NOISE_POOL = 40
GRAIN = 4  # sensor grain: each pixel's channels all move by the same amount, at most this much
MAX_NOISE_SATURATION = 0.2  # HSV saturation; the markers are all above 0.7

SYSTEM = "You are a robot that explores a house. You see through a camera."
TASK = "Task: find the coloured marker in the first frame and remember which corner it is in."
NOTED = "Marker noted. Moving on."
ACTIONS = ["moving forward", "turning left", "turning right", "looking around", "passing a door"]
MAX_TEXT_CHARS = 600  # all message contents of a record together


def msg(role: str, content: str, stype: str) -> dict:
    return {"role": role, "content": content, "semantic_type": stype}


def slug(text: str) -> str:
    return text.replace(" ", "_")


def save_png(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG", optimize=False, compress_level=9)


def scene_image(rng: random.Random, color: str, corner: str) -> Image.Image:
    """A light, slightly tinted background with faint floor lines, and one bold marker in the given corner."""
    base = rng.randint(215, 240)
    background = tuple(base + rng.randint(-6, 6) for _ in range(3))
    image = Image.new("RGB", (SCENE_SIZE, SCENE_SIZE), background)
    draw = ImageDraw.Draw(image)
    for y in range(rng.randint(8, 14), SCENE_SIZE, rng.randint(12, 18)):
        draw.line([(0, y), (SCENE_SIZE - 1, y)], fill=tuple(c - 18 for c in background))
    vertical, horizontal = corner.split()
    x0 = MARKER_MARGIN if horizontal == "left" else SCENE_SIZE - MARKER_MARGIN - MARKER_SIZE
    y0 = MARKER_MARGIN if vertical == "top" else SCENE_SIZE - MARKER_MARGIN - MARKER_SIZE
    box = [x0, y0, x0 + MARKER_SIZE - 1, y0 + MARKER_SIZE - 1]
    if rng.choice(SHAPES) == "circle":
        draw.ellipse(box, fill=COLORS[color])
    else:
        draw.rectangle(box, fill=COLORS[color])
    return add_grain(rng, image)


def dull(rng: random.Random, low: int = 100, high: int = 200, tint: int = 5) -> tuple[int, int, int]:
    """A gray-ish colour: one gray level, each channel nudged by at most `tint`."""
    level = rng.randint(low, high)
    return tuple(level + rng.randint(-tint, tint) for _ in range(3))


def noise_image(rng: random.Random) -> Image.Image:
    """Routine camera noise: random gray-ish blocks or stripes, no marker colour anywhere."""
    image = Image.new("RGB", (NOISE_SIZE, NOISE_SIZE), dull(rng))
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.5:
        for _ in range(rng.randint(4, 10)):
            x0, y0 = rng.randrange(NOISE_SIZE), rng.randrange(NOISE_SIZE)
            x1, y1 = x0 + rng.randint(4, 24), y0 + rng.randint(4, 24)
            draw.rectangle([x0, y0, x1, y1], fill=dull(rng))
    else:
        width, vertical = rng.randint(2, 8), rng.random() < 0.5
        for pos in range(0, NOISE_SIZE, width):
            box = [pos, 0, pos + width - 1, NOISE_SIZE - 1] if vertical else [0, pos, NOISE_SIZE - 1, pos + width - 1]
            draw.rectangle(box, fill=dull(rng))
    return add_grain(rng, image)


def add_grain(rng: random.Random, image: Image.Image) -> Image.Image:
    """Mild gray camera grain, so no two frames are flat copies of each other's colours."""
    data = bytearray(image.tobytes())  # RGB, 3 bytes a pixel
    for i in range(0, len(data), 3):
        d = rng.randint(-GRAIN, GRAIN)
        data[i : i + 3] = bytes(min(255, max(0, c + d)) for c in data[i : i + 3])
    return Image.frombytes("RGB", image.size, bytes(data))


def max_saturation(image: Image.Image) -> float:
    return max(colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[1] for _, rgb in image.getcolors(1 << 16))


def scene_deck(rng: random.Random):
    """(colour, corner) pairs: every 16 in a row hold each pair once, shuffled, so the labels stay balanced."""
    while True:
        deck = [(color, corner) for color in COLORS for corner in CORNERS]
        rng.shuffle(deck)
        yield from deck


def trajectory(
    rng: random.Random, scene: tuple[str, str], noise_paths: list[str], min_steps: int, max_steps: int
) -> dict:
    color, corner = scene
    messages = [
        msg("system", SYSTEM, "GLOBAL_CONDITION"),
        msg("user", TASK, "GLOBAL_CONDITION"),
        msg("user", "Frame 0: <image>", "KEY_EVENT"),
        msg("assistant", NOTED, "PROCESS_NOISE"),
    ]
    images = [f"images/scene_{color}_{slug(corner)}.png"]
    n_steps = rng.randint(min_steps, max_steps)
    for k, path in enumerate(rng.sample(noise_paths, n_steps), start=1):
        messages.append(msg("user", f"Frame {k}: <image>", "PROCESS_NOISE"))
        messages.append(msg("assistant", f"Step {k}: {rng.choice(ACTIONS)}.", "PROCESS_NOISE"))
        images.append(path)
    messages.append(msg("user", f"Which corner was the {color} marker in?", "PROCESS_NOISE"))
    messages.append(msg("assistant", f"The {color} marker was in the {corner} corner.", "PROCESS_NOISE"))
    return {"messages": messages, "images": images}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--train", type=int, default=240, help="number of training trajectories")
    parser.add_argument("--eval", type=int, default=40, help="number of eval trajectories")
    parser.add_argument("--min-steps", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=here / "vl_demo")
    args = parser.parse_args()

    if args.min_steps < 1 or not args.min_steps <= args.max_steps <= NOISE_POOL:
        parser.error(f"need 1 <= --min-steps <= --max-steps <= {NOISE_POOL} (the noise pool's size)")
    rng = random.Random(args.seed)
    image_dir = args.out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for old in image_dir.glob("*.png"):
        old.unlink()

    for color in COLORS:
        for corner in CORNERS:
            save_png(scene_image(rng, color, corner), image_dir / f"scene_{color}_{slug(corner)}.png")
    noise_paths = []
    for i in range(NOISE_POOL):
        image = noise_image(rng)
        assert max_saturation(image) <= MAX_NOISE_SATURATION, f"noise frame {i} is too colourful"
        save_png(image, image_dir / f"noise_{i:02d}.png")
        noise_paths.append(f"images/noise_{i:02d}.png")

    deck = scene_deck(rng)
    records = [
        trajectory(rng, next(deck), noise_paths, args.min_steps, args.max_steps) for _ in range(args.train + args.eval)
    ]
    for rec in records:
        assert sum(len(m["content"]) for m in rec["messages"]) <= MAX_TEXT_CHARS, "trajectory text too long"
        placeholders = sum(m["content"].count("<image>") for m in rec["messages"])
        assert placeholders == len(rec["images"]), "every <image> needs exactly one path"
        assert all((args.out / p).is_file() for p in rec["images"])
    write_jsonl(args.out / "train.jsonl", records[: args.train])
    write_jsonl(args.out / "eval.jsonl", records[args.train :])

    pngs = sorted(image_dir.glob("*.png"))
    size = sum(p.stat().st_size for p in pngs) + sum(
        (args.out / f).stat().st_size for f in ("train.jsonl", "eval.jsonl")
    )
    print(f"wrote {args.train} train + {args.eval} eval records, {len(pngs)} images, {size} bytes to {args.out}")


if __name__ == "__main__":
    main()
