"""A tiny base model that can already copy from its context: what the recall benchmarks fine-tune, as users
fine-tune a pretrained checkpoint, not a random one.

    python benchmarks/induction_base.py --out bases/s1 --seed 1      # about 3 minutes on 2 CPU cores
    python -m hsa_train experiment=mqar model.name_or_path=bases/s1

Why: a randomly initialised model does not learn associative recall in a CPU fine-tune. The recall needs an
induction circuit (find the earlier occurrence of the asked key, copy the token after it), and a fresh tiny model
forms one only after a phase change that a few hundred fine-tuning steps never reach: issue 21 measured 25% (the
guessing rate among four doors' codes) after 1,800 steps, with plain attention and with HSA alike. Every model
users fine-tune has such circuits from pre-training. This script gives the tiny model one the way pre-training
does, on text that has nothing of the task in it: random token sequences in which a stretch repeats at a random
offset, the loss on the repeat. The circuit forms abruptly (about step 400 to 600 here); training stops once the
held-out copy accuracy passes `--target`. The folder is a save_pretrained checkpoint with the shipped tokenizer,
loaded through `model.name_or_path` like any other. No HSA bias is used here: the base is plain, as real ones are.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

ARCH = {
    "type": "qwen2",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}


def copy_batch(rng: random.Random, vocab: list[int], batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels): random tokens with one stretch repeated after a random prefix and gap; the labels are
    the repeat's tokens after its first (which nothing in the context predicts)."""
    ids, labels = [], []
    for _ in range(batch):
        prefix, gap = rng.randint(0, length // 4), rng.randint(0, length // 4)
        n = (length - prefix - gap) // 2
        draw = lambda k: [rng.choice(vocab) for _ in range(k)]  # noqa: E731
        seg = draw(n)
        x = draw(prefix) + seg + draw(gap) + seg
        x += draw(length - len(x))
        start = prefix + n + gap
        y = [-100] * length
        y[start + 1 : start + n] = x[start + 1 : start + n]
        ids.append(x)
        labels.append(y)
    return torch.tensor(ids), torch.tensor(labels)


@torch.no_grad()
def copy_accuracy(model, ids: torch.Tensor, labels: torch.Tensor) -> float:
    predicted = model(input_ids=ids).logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    scored = target != -100
    return float((predicted[scored] == target[scored]).float().mean())


def build_base(
    out: Path,
    seed: int,
    arch: dict | None = None,
    max_steps: int = 3000,
    target: float = 0.95,
    batch: int = 32,
    length: int = 128,
    lr: float = 1e-3,
    check_every: int = 50,
) -> dict:
    """Trains and saves the base; returns its record (steps, held-out copy accuracy, seconds), also written to
    <out>/base.json."""
    from hsa_train.model.loading import build_model, load_tokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = load_tokenizer(None)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    model = build_model(None, arch or ARCH, tokenizer)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    held_out = copy_batch(random.Random(10_000 + seed), vocab, 64, length)
    started, accuracy, step = time.time(), 0.0, 0
    for step in range(1, max_steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / 50)
        ids, labels = copy_batch(rng, vocab, batch, length)
        model(input_ids=ids, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % check_every == 0 or step == max_steps:
            model.eval()
            accuracy = copy_accuracy(model, *held_out)
            model.train()
            if accuracy >= target:
                break
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {"seed": seed, "steps": step, "copy_accuracy": accuracy, "seconds": round(time.time() - started, 1)}
    record["arch"] = arch or ARCH
    (out / "base.json").write_text(json.dumps(record) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint folder to write")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--target", type=float, default=0.95, help="held-out copy accuracy that ends training")
    args = parser.parse_args(argv)
    record = build_base(args.out, args.seed, max_steps=args.max_steps, target=args.target)
    print(json.dumps(record))
    return 0 if record["copy_accuracy"] >= args.target else 1


if __name__ == "__main__":
    raise SystemExit(main())
