"""Training throughput of hsa_train's loop against `transformers.Trainer`, side by side in one process.

Both train the same HSA model (the default tiny Qwen2 unless --name-or-path is given) on identical batches (the
Trainer reads the samples in the order our loop draws them), with the same micro-batch, precision, optimizer
(fused AdamW), schedule, clipping and number of steps, in alternating order, `--repeats` times. Throughput is
non-padding input tokens per second of training steps (batch assembly + forward + backward + update; setup,
logging and evaluation excluded on both sides). Reports each side's median and the median of the per-repeat
ratios (ours / Trainer); writes JSON with --out.

    python benchmarks/train.py --steps 40 --repeats 5 --out benchmarks/results/cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from omegaconf import OmegaConf

    from hsa_train.config import validate

    with initialize_config_module(config_module="hsa_train.conf", version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    return validate(cfg), OmegaConf.to_container(cfg, resolve=True)


def run_ours(overrides: list[str], workdir: Path) -> float:
    from hsa_train.training.loop import train

    run, resolved = compose(overrides + ["logging.progress=none", "train.save_model=false", "data.eval_ratio=0"])
    return train(run, resolved, workdir)["tokens_per_s"]


def run_trainer(overrides: list[str], workdir: Path) -> float:
    """The same run through transformers.Trainer, fed by our tokenizer, collator and HSA model."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hsa_train.data import SemanticCollator, SemanticTokenizer
    from hsa_train.data.dataset import SampleStream, encode_files
    from hsa_train.model import enable_hsa
    from hsa_train.model.loading import build_model, load_tokenizer
    from hsa_train.training.device import pick_autocast, pick_device, seed_everything

    run, _ = compose(overrides)
    seed_everything(run.seed)
    tokenizer = load_tokenizer(run.model.tokenizer or run.model.name_or_path)
    st = SemanticTokenizer(tokenizer, run.hsa.types, run.hsa.default_type, run.data.train_on, run.data.cutoff_len)
    samples, _ = encode_files(run.data.train_files, st)
    model = build_model(run.model.name_or_path, run.model.arch, tokenizer, run.model.dtype)
    enable_hsa(model, dict(run.hsa.lambdas), run.hsa.backend)
    collate = SemanticCollator(tokenizer.pad_token_id, st.types.default_id)
    tokens = [0]

    def counting_collator(features):
        batch = collate([f.features for f in features])
        tokens[0] += int(batch["attention_mask"].sum())
        return batch

    class StepClock(TrainerCallback):
        """Time from the start of the epoch to the last step's end: batch fetch, forward, backward, update."""

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()

    device = pick_device(run.train.device)
    bf16 = pick_autocast(run.train.precision, device) is not None
    t = run.train
    args = TrainingArguments(
        output_dir=str(workdir), max_steps=t.max_steps, per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, weight_decay=t.weight_decay,
        adam_beta1=t.betas[0], adam_beta2=t.betas[1], adam_epsilon=t.eps, max_grad_norm=t.max_grad_norm or 0.0,
        lr_scheduler_type="cosine", warmup_steps=t.warmup_steps, logging_steps=10**9, save_strategy="no",
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
        use_cpu=device.type == "cpu", bf16=bf16, seed=run.seed,
    )  # fmt: skip

    class SameBatches(Trainer):
        """Reads the samples in the order our loop draws them, so both sides train on identical batches."""

        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    order = SampleStream(len(samples), seed=run.seed).take(t.max_steps * t.micro_batch_size * t.grad_accum)
    clock = StepClock()
    trainer = SameBatches(model=model, args=args, train_dataset=[samples[i] for i in order],
                          data_collator=counting_collator, callbacks=[clock])  # fmt: skip
    trainer.train()
    return tokens[0] / (clock.end - clock.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--records", type=int, default=400, help="demo records to train on")
    parser.add_argument("--name-or-path", default=None, help="a real checkpoint instead of the tiny default model")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from hsa_train.config import bundled_path

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        lines = Path(bundled_path("demo/trajectories.jsonl")).read_text().splitlines()[: args.records]
        data.write_text("\n".join(lines) + "\n")
        overrides = [f"data.train_files=[{data}]", f"train.max_steps={args.steps}",
                     f"train.micro_batch_size={args.micro_batch}", f"train.precision={args.precision}"]  # fmt: skip
        if args.name_or_path:
            overrides.append(f"model.name_or_path={args.name_or_path}")
        ours, theirs = [], []
        for rep in range(args.repeats):
            order = [("ours", run_ours, ours), ("trainer", run_trainer, theirs)]
            for name, fn, sink in order if rep % 2 == 0 else order[::-1]:
                sink.append(fn(overrides, Path(tmp) / f"{name}{rep}"))
                print(f"repeat {rep}: {name} {sink[-1]:,.0f} tok/s", flush=True)

    ratios = [a / b for a, b in zip(ours, theirs)]
    result = {
        "ours_tokens_per_s": ours,
        "trainer_tokens_per_s": theirs,
        "ours_median": statistics.median(ours),
        "trainer_median": statistics.median(theirs),
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
        "steps": args.steps,
        "micro_batch": args.micro_batch,
        "model": args.name_or_path or "tiny qwen2 (conf/model/tiny_qwen2.yaml)",
        "precision": args.precision,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(f"ours / Trainer: {result['ratio_median']:.3f} (median of {args.repeats}); "
          f"ours {result['ours_median']:,.0f} tok/s, Trainer {result['trainer_median']:,.0f} tok/s")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
