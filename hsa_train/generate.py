"""Generate with the bias: the next assistant message of each conversation in a file, or a chat.

    python -m hsa_train.generate outputs/<run>/model --input conversations.jsonl --output replies.jsonl
    python -m hsa_train.generate outputs/<run>/adapter --chat

The model folder is one hsa_train wrote (a full model, or a LoRA adapter whose base is loaded from its
`base_model_name_or_path`) or any causal LM folder. Each conversation (the `messages` format) is typed as training
typed it: an explicit `semantic_type` wins, else the rules saved with the model (`hsa_rules.json`; `--typing NAME`
picks a training dataset's set); the output shows every message's type and the rule that gave it. It is rendered
with the generation prompt and encoded as training encodes it; the model decodes with its KV cache and the bias,
every generated token typed `hsa.generated_type`. A conversation that ends with an assistant
message has that message regenerated: it is written out as the reference beside the new reply.

In the chat, user turns are typed by the saved rules, or take the type `/type KEY_EVENT` sets (`/type rules` goes
back; `/types` lists them);
`/image PATH` attaches a picture to the next user turn (vision models; its tokens take that turn's type),
`/system TEXT` sets a system message, `/reset` starts over, `/quit` (or end of input) leaves.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from hsa_train.agent.folder import Trained, load_trained
from hsa_train.data.formats import IMAGE_PLACEHOLDER
from hsa_train.data.loader import LoadReport, iter_records
from hsa_train.data.sources import check_file
from hsa_train.data.tokenizer import SemanticTokenizer
from hsa_train.data.vision import open_image
from hsa_train.model.generation import generate_batch
from hsa_train.model.loading import TORCH_DTYPES
from hsa_train.types import one_line


def generation_options(args, st: SemanticTokenizer) -> dict:
    options = {"max_new_tokens": args.max_new_tokens, "eos_token_id": st.stop_token_ids(), "do_sample": args.sample}
    if args.sample:
        options.update(temperature=args.temperature, top_p=args.top_p)
    return options


def reply_text(st: SemanticTokenizer, ids: list[int]) -> str:
    return st.tokenizer.decode(ids, skip_special_tokens=True).strip()


def generate_file(trained: Trained, args) -> int:
    """Replies for every conversation of --input, written to --output (JSONL) in input order; returns the count.
    Untyped messages are typed by the rules the model was trained with (`--typing` picks a dataset's)."""
    from rich.progress import Progress

    model, st = trained.model, trained.st
    check_file(args.input)
    records = list(iter_records(trained.rules.spec(args.input, args.typing), st.types, report=LoadReport()))
    if not records:
        raise ValueError(f"no conversations in {args.input}")
    generated = trained.settings.generated_type
    jobs = []
    for record in records:
        messages = [dict(m) for m in record.messages]
        reference = messages.pop() if messages[-1]["role"] == "assistant" and len(messages) > 1 else None
        prompt = st.encode_prompt(messages, record.tools, generated_type=generated)
        jobs.append((record, messages, reference, prompt))
    options = generation_options(args, st)
    pad_type = st.types.default_id
    out_path = Path(args.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    order = sorted(range(len(jobs)), key=lambda i: len(jobs[i][3]["input_ids"]))  # similar lengths batch together
    replies: dict[int, str] = {}
    with Progress(transient=True) as progress:
        task = progress.add_task("generating", total=len(jobs))
        for start in range(0, len(order), args.batch_size):
            chunk = order[start : start + args.batch_size]
            outs = generate_batch(model, [jobs[i][3] for i in chunk], st.tokenizer.pad_token_id, pad_type, **options)
            for i, ids in zip(chunk, outs):
                replies[i] = reply_text(st, ids)
            progress.advance(task, len(chunk))
    with out_path.open("w", encoding="utf-8") as f:
        for i, (record, messages, reference, prompt) in enumerate(jobs):
            row = {
                "source": record.where,
                "messages": [_plain(m) for m in messages],
                **({"images": images} if (images := [i for m in messages for i in m.get("images", [])]) else {}),
                "reply": {"role": "assistant", "content": replies[i], "semantic_type": generated or st.types.default},
                "prompt_tokens": len(prompt["input_ids"]),
            }
            if reference is not None:
                row["reference"] = reference.get("content")
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(jobs)


def _plain(message: dict) -> dict:
    """A message as written in data files (the loader's bookkeeping keys dropped)."""
    keys = ("role", "content", "semantic_type", "type_rule", "tool_calls", "spans")
    return {k: v for k, v in message.items() if k in keys}


def chat(trained: Trained, args, stdin=None, out=None) -> None:
    """The interactive loop: user turns typed by the saved rules (or the `/type` chosen), replies generated with
    the bias."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    model, st = trained.model, trained.st
    typer = trained.typer(args.typing)
    generated = trained.settings.generated_type
    options = generation_options(args, st)
    kind = args.user_type  # None: the saved rules type each turn
    messages: list[dict] = []
    system = None
    images: list[str] = []  # attached to the next user turn
    print(
        f"chat with {args.model}: /type NAME sets the user turns' type ({', '.join(st.types.names)}), /quit", file=out
    )
    while True:
        print(f"[{kind or 'rules'}] you> ", end="", file=out, flush=True)
        line = stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command == "/quit":
                break
            if command == "/type":
                if rest.strip() == "rules":
                    kind = None
                elif rest.strip() not in st.types.names:
                    print(f"unknown type {rest.strip()!r}; one of {', '.join(st.types.names)}, or rules", file=out)
                else:
                    kind = rest.strip()
            elif command == "/types":
                print(", ".join(st.types.names), file=out)
            elif command == "/system":
                system = {"role": "system", "content": rest, "semantic_type": st.types.names[0]}
                print(f"system message set ({system['semantic_type']})", file=out)
            elif command == "/image":
                problem = _image_problem(st, rest.strip())
                if problem:
                    print(problem, file=out)
                else:
                    images.append(str(Path(rest.strip()).resolve()))
                    print(f"image {len(images)} goes with your next message", file=out)
            elif command == "/reset":
                messages, images = [], []
                print("conversation reset", file=out)
            else:
                print("commands: /type NAME, /types, /image PATH, /system TEXT, /reset, /quit", file=out)
            continue
        if not line.strip():
            continue
        turn = typer([{"role": "user", "content": IMAGE_PLACEHOLDER * len(images) + line, "semantic_type": kind}])[0][0]
        turn.pop("type_rule")
        conversation = ([system] if system else []) + messages + [{**turn, "images": images} if images else turn]
        try:
            prompt = st.encode_prompt(conversation, generated_type=generated)
        except ValueError as exc:  # e.g. a picture removed since /image, or over the processor's max_pixels
            print(f"not sent: {one_line(exc)}", file=out)
            images = []
            continue
        messages, images = conversation[1:] if system else conversation, []
        ids = generate_batch(model, [prompt], st.tokenizer.pad_token_id, st.types.default_id, **options)[0]
        reply = reply_text(st, ids)
        messages.append({"role": "assistant", "content": reply, "semantic_type": generated})
        print(f"model> {reply}", file=out, flush=True)


def _image_problem(st: SemanticTokenizer, path: str) -> str | None:
    """Why `/image path` cannot be attached (one line), or None."""
    if st.media is None:
        return "this model takes no images (it is a text-only model)"
    if not path:
        return "usage: /image PATH"
    try:
        open_image(path)
    except FileNotFoundError:
        return f"no such image file: {path}"
    except ValueError as exc:  # "unreadable image: ..."
        return one_line(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hsa_train.generate", description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("model", help="a folder hsa_train wrote (<run>/model or <run>/adapter), or a causal LM folder")
    parser.add_argument("--input", help="JSON/JSONL conversations (messages format, typed) to reply to")
    parser.add_argument("--output", help="JSONL to write (default: <input stem>.replies.jsonl beside it)")
    parser.add_argument("--chat", action="store_true", help="chat interactively instead")
    parser.add_argument(
        "--user-type", default=None, help="the chat's user-turn type (default: typed by the saved rules)"
    )
    parser.add_argument(
        "--typing", default=None, help="the training dataset whose saved rules type untyped messages (the default set)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="conversations per generate call (8)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens per reply at most (256)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7, help="with --sample (0.7)")
    parser.add_argument("--top-p", type=float, default=0.9, help="with --sample (0.9)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    parser.add_argument("--backend", default=None, help="attention backend: auto | eager | sdpa | flex (as trained)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(TORCH_DTYPES), help="weights dtype (float32)")
    args = parser.parse_args(argv)
    try:
        if args.chat == bool(args.input):
            raise ValueError("give --input FILE (replies to a file) or --chat, one of them")
        if args.batch_size < 1 or args.max_new_tokens < 1:
            raise ValueError("--batch-size and --max-new-tokens must be >= 1")
        if args.input and not args.output:
            args.output = str(Path(args.input).with_suffix("")) + ".replies.jsonl"
        torch.manual_seed(args.seed)
        trained = load_trained(args.model, args.device, args.dtype, args.backend)
        st = trained.st
        if args.user_type is not None and args.user_type not in st.types.names:
            raise ValueError(f"--user-type {args.user_type!r}: use one of {', '.join(st.types.names)}")
        trained.rules.rules(args.typing)  # a --typing that names no saved set fails now
        if args.chat:
            chat(trained, args)
            return 0
        n = generate_file(trained, args)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        print(f"hsa_train.generate: error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(f"wrote {n} replies to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
