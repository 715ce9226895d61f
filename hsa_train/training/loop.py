"""The training recipe: one readable loop in plain PyTorch.

data (loader → SemanticTokenizer → collator) → model with HSA → AdamW + warmup/cosine, gradient accumulation
normalised by label tokens, clipping, bf16 autocast where supported → held-out eval → save + metrics.json.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import transformers
import yaml

from hsa_train.config import RunConfig
from hsa_train.data import SemanticCollator, SemanticTokenizer
from hsa_train.data.dataset import BatchStream, encode_files, split_eval
from hsa_train.model import enable_hsa
from hsa_train.model.loading import build_model, load_tokenizer, save_pretrained
from hsa_train.training.console import Console, Tracker
from hsa_train.training.evaluate import evaluate
from hsa_train.training.loss import label_count, shifted, token_losses
from hsa_train.training.optim import build_optimizer, build_scheduler


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but CUDA is not available here; use train.device=cpu or auto")
    return device


def pick_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device does it natively; None means plain fp32."""
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16":
        if device.type == "cuda" and not bf16_ok:
            raise ValueError(f"train.precision=bf16 but {torch.cuda.get_device_name(device)} has no bf16; use fp32")
        return torch.bfloat16
    if precision == "auto" and bf16_ok:
        return torch.bfloat16
    return None


def make_forward(model, device: torch.device, autocast_dtype: torch.dtype | None, use_hsa: bool):
    """batch -> logits, on `device`, under autocast when asked; semantic_ids go in only when HSA is on."""

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if use_hsa:
            inputs["semantic_ids"] = batch["semantic_ids"]
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with ctx:
            return model(**inputs, use_cache=False).logits

    return forward


def accumulate_gradients(forward, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """Backward over the micro-batches of one optimizer step, each loss divided by the label tokens of *all* of
    them, so the step's gradient is the mean over its label tokens however the samples are split.
    Returns (the step's mean loss, the number of non-padding input tokens)."""
    n_labels = sum(label_count(b) for b in micro_batches)
    if n_labels == 0:
        raise ValueError("the batch has no label tokens")
    loss_sum, n_tokens = 0.0, 0
    for batch in micro_batches:
        logits, labels = shifted(forward(batch), batch)
        loss = token_losses(logits, labels.to(logits.device)).sum() / n_labels
        loss.backward()
        loss_sum += loss.item()
        n_tokens += int(batch["attention_mask"].sum())
    return loss_sum, n_tokens


def loss_summary(losses: list[float], window: int) -> dict[str, float]:
    tail = losses[-window:]
    return {
        "train_loss_first": losses[0],
        "train_loss_final": losses[-1],
        "train_loss_final_avg": sum(tail) / len(tail),
    }


def eval_summary(result: dict | None) -> dict:
    keys = {"eval_loss": "loss", "eval_loss_per_type": "loss_per_type", "eval_tokens_per_type": "tokens_per_type"}
    return {name: (result[key] if result else None) for name, key in keys.items()}


def train(run: RunConfig, resolved_config: dict, run_dir: Path) -> dict:
    t_start = time.perf_counter()
    transformers.utils.logging.disable_progress_bar()
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(run.seed)
    device = pick_device(run.train.device)
    autocast_dtype = pick_autocast(run.train.precision, device)
    hsa_cfg = run.hsa
    type_names = list(hsa_cfg.types)

    # --- data: fails on a bad record before the model is built -------------------------------------------------
    tokenizer = load_tokenizer(
        run.model.tokenizer or run.model.name_or_path, run.model.trust_remote_code, run.model.chat_template
    )
    st = SemanticTokenizer(tokenizer, hsa_cfg.types, hsa_cfg.default_type, run.data.train_on, run.data.max_length)
    train_samples, report = encode_files(run.data.train_files, st, run.data.on_error)
    if run.data.eval_files:
        eval_samples, eval_report = encode_files(run.data.eval_files, st, run.data.on_error)
    else:
        train_samples, eval_samples = split_eval(train_samples, run.data.eval_ratio, run.seed)
        eval_report = None
    collator = SemanticCollator(tokenizer.pad_token_id, st.types.default_id, run.data.pad_to_multiple_of)
    stream = BatchStream(train_samples, run.train.micro_batch_size, collator, seed=run.seed)
    max_steps = run.train.max_steps or max(
        1, math.ceil(run.train.epochs * stream.batches_per_epoch / run.train.grad_accum)
    )

    # --- model --------------------------------------------------------------------------------------------------
    model = build_model(run.model.name_or_path, run.model.arch, tokenizer, run.model.dtype, run.model.trust_remote_code)
    if hsa_cfg.enabled:
        enable_hsa(
            model,
            dict(hsa_cfg.lambdas),
            hsa_cfg.backend,
            types=type_names,
            default_type=hsa_cfg.default_type,
            head_scaling=hsa_cfg.head_scaling,
            learnable=hsa_cfg.learnable,
        )
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, run.train.lr, run.train.weight_decay, run.train.betas, run.train.eps)
    scheduler = build_scheduler(optimizer, run.train.warmup_steps, max_steps, run.train.min_lr_ratio)

    forward = make_forward(model, device, autocast_dtype, hsa_cfg.enabled)

    def run_eval() -> dict | None:
        if not eval_samples:
            return None
        model.eval()
        eval_stream = BatchStream(eval_samples, run.train.eval_batch_size, collator, seed=run.seed, shuffle=False)
        result = evaluate(forward, (batch for batch, _ in eval_stream.one_pass()), type_names)
        model.train()
        return result

    console = Console(run.logging.progress, max_steps)
    tracker = Tracker(run.logging.wandb, run.logging, resolved_config, str(run_dir))
    console.print(
        f"hsa_train: {n_params / 1e6:.2f}M params on {device} ({'bf16 autocast' if autocast_dtype else 'fp32'}), "
        f"HSA {'backend=' + hsa_cfg.backend + ' λ=' + str(dict(hsa_cfg.lambdas)) if hsa_cfg.enabled else 'off'}"
    )
    console.print(
        f"data: train {report.summary()}"
        + (f", eval {eval_report.summary()}" if eval_report else "")
        + f" -> {len(train_samples)} train / {len(eval_samples)} eval samples; {max_steps} steps of "
        f"{run.train.micro_batch_size}x{run.train.grad_accum} samples"
    )

    # --- the loop -----------------------------------------------------------------------------------------------
    model.train()
    losses: list[float] = []
    tokens_seen = 0
    window_tokens, window_start = 0, time.perf_counter()
    train_time = 0.0
    exit_code = 1  # for wandb: any exception below marks the run failed
    try:
        for step in range(1, max_steps + 1):
            t_step = time.perf_counter()
            micro = [stream.next() for _ in range(run.train.grad_accum)]
            try:
                loss_sum, n_tokens = accumulate_gradients(forward, [batch for batch, _ in micro])
            except ValueError as exc:
                raise RuntimeError(f"step {step}: {exc} (samples {[w for _, ws in micro for w in ws]})") from None
            tokens_seen += n_tokens
            window_tokens += n_tokens
            if run.train.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), run.train.max_grad_norm)
            lr = scheduler.get_last_lr()[0]  # the lr this step used
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss_sum)
            train_time += time.perf_counter() - t_step

            log_now = step % run.train.log_every == 0 or step == max_steps or step == 1
            elapsed = time.perf_counter() - window_start
            metrics = {"loss": loss_sum, "lr": lr, "tokens_per_s": window_tokens / max(elapsed, 1e-9)}
            console.step(step, metrics, log_now)
            if log_now:
                tracker.log(
                    {
                        "train/loss": loss_sum,
                        "train/lr": metrics["lr"],
                        "train/tokens_per_s": metrics["tokens_per_s"],
                        "train/tokens_seen": tokens_seen,
                    },
                    step,
                )
                window_tokens, window_start = 0, time.perf_counter()
            if run.train.eval_every and step % run.train.eval_every == 0 and step != max_steps:
                result = run_eval()
                if result is not None:
                    console.print(f"eval @ step {step}: loss {result['loss']:.4f}")
                    tracker.log({"eval/loss": result["loss"]}, step)
                window_tokens, window_start = 0, time.perf_counter()  # eval time is not training time
        console.close()

        # --- evaluation, saving, metrics --------------------------------------------------------------------------
        eval_result = run_eval()
        if eval_result is not None:
            per_type = ", ".join(
                f"{k} {v:.4f} ({eval_result['tokens_per_type'][k]} tok)"
                for k, v in eval_result["loss_per_type"].items()
                if v is not None
            )
            console.print(
                f"eval: loss {eval_result['loss']:.4f} over {eval_result['tokens']} tokens | per type: {per_type}"
            )
            tracker.log(
                {
                    "eval/loss": eval_result["loss"],
                    **{f"eval/loss_{k}": v for k, v in eval_result["loss_per_type"].items() if v is not None},
                },
                max_steps,
            )

        model_dir = run_dir / "model"
        if run.train.save_model:
            save_pretrained(model, tokenizer, model_dir)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved_config, sort_keys=False))

        metrics = {
            "steps": max_steps,
            "samples_train": len(train_samples),
            "samples_eval": len(eval_samples),
            "skipped_records": len(report.skipped) + (len(eval_report.skipped) if eval_report else 0),
            "params": n_params,
            "tokens_seen": tokens_seen,
            "tokens_per_s": tokens_seen / max(train_time, 1e-9),
            **loss_summary(losses, run.train.log_every),
            **eval_summary(eval_result),
            "train_time_s": train_time,
            "wall_time_s": time.perf_counter() - t_start,
            "device": str(device),
            "precision": "bf16" if autocast_dtype else "fp32",
            "hsa": dict(hsa_cfg.lambdas) if hsa_cfg.enabled else None,
            "run_dir": str(run_dir),
            "model_dir": str(model_dir) if run.train.save_model else None,
        }
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        tracker.summary({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        console.print(
            f"done: {max_steps} steps in {metrics['train_time_s']:.1f}s, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
            f"{metrics['tokens_per_s']:,.0f} tok/s"
        )
        console.print(f"run directory: {run_dir}")
        exit_code = 0
    finally:
        console.close()
        tracker.finish(exit_code)
    return metrics
