"""The training recipe: one readable loop in plain PyTorch.

data (loader → SemanticTokenizer → collator) → model with HSA (+ LoRA) → DDP / FSDP2 → AdamW + warmup/cosine,
gradient accumulation normalised by the label tokens of the whole global batch, clipping, non-finite guard,
bf16 autocast where supported → checkpoints (periodic, at the end, on SIGTERM / SIGINT) → eval → export +
metrics.json. Only rank 0 prints and writes files other than its checkpoint shards.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import transformers
import yaml

from hsa_train.config import RunConfig
from hsa_train.data import SemanticCollator, SemanticTokenizer
from hsa_train.data.dataset import SampleStream, encode_files, eval_batches, rank_micro_batches, split_eval
from hsa_train.model import enable_hsa
from hsa_train.model.export import export_model
from hsa_train.model.loading import build_model, enable_activation_checkpointing, load_tokenizer
from hsa_train.model.lora import apply_lora
from hsa_train.training import checkpoint
from hsa_train.training import distributed as D
from hsa_train.training.console import Console, Tracker
from hsa_train.training.evaluate import eval_sums, summarize
from hsa_train.training.loss import label_count, next_token_targets, token_loss_sum
from hsa_train.training.optim import build_optimizer, build_scheduler


class NonFiniteError(RuntimeError):
    """A step produced a non-finite loss or gradient; nothing was updated or saved."""


class Stopped(Exception):
    """SIGTERM / SIGINT: a checkpoint was written and the run stops."""

    def __init__(self, signum: int, step: int, path: Path | None):
        self.signum, self.step, self.path = signum, step, path
        name = signal.Signals(signum).name
        where = f"checkpoint {path}" if path else "no checkpoint (train.save_every and the run dir are off)"
        super().__init__(f"stopped by {name} after step {step}; {where}; continue with train.resume=auto")


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


def accumulate_gradients(
    forward, micro_batches: list[dict[str, torch.Tensor]], n_labels: int, scale: float = 1.0, sync=None
) -> tuple[float, int]:
    """Backward over this rank's micro-batches of one step, each loss divided by `n_labels`, the label tokens of
    the *whole* global batch (all ranks, all micro-batches), so the step's gradient is the mean over its label
    tokens however the samples are split. `scale` undoes the averaging DDP / FSDP apply over ranks; `sync(last)`
    gives the context that skips gradient synchronisation before the last micro-batch.
    Returns (this rank's share of the step's mean loss, its non-padding input tokens)."""
    if n_labels == 0:
        raise ValueError("the batch has no label tokens")
    loss_sum, n_tokens = 0.0, 0
    for k, batch in enumerate(micro_batches):
        with sync(k == len(micro_batches) - 1) if sync else nullcontext():
            loss = token_loss_sum(forward(batch), next_token_targets(batch)) / n_labels
            (loss * scale).backward()
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
    """The held-out split's metrics under their metrics.json names (eval_loss, eval_exact_match, ...)."""
    keys = ("loss", "loss_per_type", "tokens_per_type", "exact_match", "answer_token_accuracy")
    return {f"eval_{key}": (result[key] if result else None) for key in keys}


def eval_line(name: str, result: dict) -> str:
    per_type = ", ".join(
        f"{k} {v:.4f} ({result['tokens_per_type'][k]} tok)" for k, v in result["loss_per_type"].items() if v is not None
    )
    line = f"{name}: loss {result['loss']:.4f} over {result['tokens']} tokens | per type: {per_type}"
    if result["exact_match"] is not None:
        line += (
            f" | final answer: exact match {result['exact_match']:.3f} of {result['answers']}, "
            f"token accuracy {result['answer_token_accuracy']:.3f}"
        )
    return line


def eval_log(prefix: str, result: dict) -> dict[str, float]:
    """The scalars of one evaluation for the tracker, under `prefix` (eval/, eval/len4x/, ...)."""
    logged = {f"{prefix}loss": result["loss"]}
    logged.update({f"{prefix}loss_{k}": v for k, v in result["loss_per_type"].items() if v is not None})
    for key in ("exact_match", "answer_token_accuracy"):
        if result[key] is not None:
            logged[f"{prefix}{key}"] = result[key]
    return logged


class StopFlag:
    """Turns SIGTERM / SIGINT into a flag the loop checks between steps (the previous handlers come back after)."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(run: RunConfig, resolved_config: dict, run_dir: Path) -> dict:
    t_start = time.perf_counter()
    transformers.utils.logging.disable_progress_bar()
    cfg, hsa_cfg = run.train, run.hsa
    type_names = list(hsa_cfg.types)
    device = pick_device(cfg.device)
    info = D.init(cfg.distributed, device)
    device = D.rank_device(device, info)
    autocast_dtype = pick_autocast(cfg.precision, device)
    seed_everything(run.seed)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    # --- data: fails on a bad record before the model is built -------------------------------------------------
    tokenizer = load_tokenizer(
        run.model.tokenizer or run.model.name_or_path, run.model.trust_remote_code, run.model.chat_template
    )
    st = SemanticTokenizer(tokenizer, hsa_cfg.types, hsa_cfg.default_type, run.data.train_on, run.data.max_length)
    train_samples, report = encode_files(run.data.train_files, st, run.data.on_error)
    eval_report = None
    if run.data.eval_files:
        eval_samples, eval_report = encode_files(run.data.eval_files, st, run.data.on_error)
    else:
        train_samples, eval_samples = split_eval(train_samples, run.data.eval_ratio, run.seed)
    extra_evals = {name: encode_files(files, st, run.data.on_error) for name, files in run.data.eval_sets.items()}
    collator = SemanticCollator(tokenizer.pad_token_id, st.types.default_id, run.data.pad_to_multiple_of)
    global_batch = cfg.micro_batch_size * cfg.grad_accum * info.world
    stream = SampleStream(len(train_samples), seed=run.seed)
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train_samples) / global_batch))

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
    lora = run.model.lora.enabled
    if lora:
        model = apply_lora(model, run.model.lora, train_lambdas=hsa_cfg.enabled and hsa_cfg.learnable)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model = D.wrap(model, info, device, mixed_bf16=autocast_dtype is not None and device.type == "cuda")
    if cfg.compile:
        model.compile()
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, max_steps, cfg.min_lr_ratio)
    forward = make_forward(model, device, autocast_dtype, hsa_cfg.enabled)
    sync = (lambda last: D.set_gradient_sync(model, info, last)) if info.mode != "none" else None

    # --- resume -------------------------------------------------------------------------------------------------
    ckpt_root = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else run_dir / "checkpoints"
    start_step, losses, tokens_seen, skipped_steps, resumed_from = 0, [], 0, 0, None
    if cfg.resume:
        folder = checkpoint.latest(ckpt_root) if cfg.resume == "auto" else Path(cfg.resume)
        if folder is not None:  # None: auto, and nothing saved yet, so a fresh start
            state = checkpoint.load(folder, model, optimizer, info, frozen_base=lora)
            scheduler.load_state_dict(state["scheduler"])
            stream.load_state_dict(state["stream"])
            start_step, losses = state["step"], state["losses"]
            tokens_seen, skipped_steps = state["tokens_seen"], state["skipped_steps"]
            resumed_from = str(folder)

    def save_checkpoint(step: int) -> Path:
        trainer_state = {
            "step": step,
            "scheduler": scheduler.state_dict(),
            "stream": stream.state_dict(),
            "losses": losses,
            "tokens_seen": tokens_seen,
            "skipped_steps": skipped_steps,
        }
        return checkpoint.save(ckpt_root, step, model, optimizer, trainer_state, info, cfg.keep_last, lora)

    def run_eval(samples: list) -> dict | None:
        if not samples:
            return None
        model.eval()
        batches = eval_batches(samples, cfg.eval_batch_size, collator, info.rank, info.world)
        totals = D.all_reduce_sum(eval_sums(forward, batches, len(type_names)), device, info)
        model.train()
        return summarize(totals, type_names)

    def run_all_evals(step: int, label: str = "") -> tuple[dict | None, dict[str, dict]]:
        """The held-out split, then each of data.eval_sets: evaluated, printed (`label` after each name) and
        logged at `step`."""
        result = run_eval(eval_samples)
        set_results = {name: run_eval(samples) for name, (samples, _) in extra_evals.items()}
        for name, res in [("eval", result), *set_results.items()]:
            if res is not None:
                console.print(eval_line(name + label, res))
                tracker.log(eval_log("eval/" if name == "eval" else f"eval/{name}/", res), step)
        return result, set_results

    console = Console(run.logging.progress, max_steps, enabled=info.is_main)
    tracker = Tracker(run.logging.wandb and info.is_main, run.logging, resolved_config, str(run_dir))
    console.print(
        f"hsa_train: {n_params / 1e6:.2f}M params ({n_trainable / 1e6:.2f}M trained{', LoRA' if lora else ''}) "
        f"on {device} x{info.world} ({info.mode}), {'bf16 autocast' if autocast_dtype else 'fp32'}, HSA "
        + (f"backend={hsa_cfg.backend} λ={dict(hsa_cfg.lambdas)}" if hsa_cfg.enabled else "off")
    )
    console.print(
        f"data: train {report.summary()}"
        + (f", eval {eval_report.summary()}" if eval_report else "")
        + "".join(f", {name} {rep.summary()}" for name, (_, rep) in extra_evals.items())
        + f" -> {len(train_samples)} train / {len(eval_samples)} eval samples; {max_steps} steps of "
        f"{global_batch} samples ({cfg.micro_batch_size} x {cfg.grad_accum} accum x {info.world} ranks)"
    )
    if resumed_from:
        console.print(f"resumed from {resumed_from} at step {start_step}")

    # --- the loop -----------------------------------------------------------------------------------------------
    model.train()
    window_tokens, window_start, train_time = 0, time.perf_counter(), 0.0
    exit_code, step = 1, start_step  # exit_code for wandb: any exception below marks the run failed
    try:
        with StopFlag() as stop:
            for step in range(start_step + 1, max_steps + 1):
                t_step = time.perf_counter()
                picked = rank_micro_batches(stream.take(global_batch), cfg.micro_batch_size, info.world, info.rank)
                micro = [collator([train_samples[i].features for i in chunk]) for chunk in picked]
                n_labels, stop_now = D.all_reduce_sum(
                    [sum(label_count(b) for b in micro), float(stop.signum)], device, info
                )
                local_loss, n_tokens = accumulate_gradients(forward, micro, int(n_labels), info.world, sync)
                loss, n_tokens = D.all_reduce_sum([local_loss, n_tokens], device, info)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
                grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
                lr = scheduler.get_last_lr()[0]  # the lr this step uses
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    wheres = [train_samples[i].where for chunk in picked for i in chunk]
                    if not cfg.skip_nonfinite:
                        raise NonFiniteError(
                            f"step {step}: non-finite {'loss' if not math.isfinite(loss) else 'gradient'} "
                            f"(loss={loss}, grad_norm={grad_norm}) on samples {gather_wheres(wheres, info)}; "
                            "stopped without updating or saving the model (train.skip_nonfinite=true skips such steps)"
                        )
                    skipped_steps += 1
                    console.print(f"step {step}: non-finite loss or gradient, update skipped ({skipped_steps} so far)")
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss)
                tokens_seen += int(n_tokens)
                window_tokens += int(n_tokens)
                train_time += time.perf_counter() - t_step

                log_now = step % cfg.log_every == 0 or step == max_steps or step == start_step + 1
                tps = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                console.step(step, {"loss": loss, "lr": lr, "tokens_per_s": tps}, log_now)
                if log_now:
                    tracker.log(
                        {
                            "train/loss": loss,
                            "train/lr": lr,
                            "train/tokens_per_s": tps,
                            "train/grad_norm": grad_norm,
                            "train/tokens_seen": tokens_seen,
                        },
                        step,
                    )
                    window_tokens, window_start = 0, time.perf_counter()
                if stop_now:  # some rank was signalled: all of them checkpoint and stop together
                    raise Stopped(stop.signum or signal.SIGTERM, step, save_checkpoint(step))
                if cfg.save_every and step % cfg.save_every == 0 and step != max_steps:
                    console.print(f"checkpoint: {save_checkpoint(step)}")
                    window_start = time.perf_counter()
                if cfg.eval_every and step % cfg.eval_every == 0 and step != max_steps:
                    run_all_evals(step, f" @ step {step}")
                    window_tokens, window_start = 0, time.perf_counter()  # eval time is not training time
        console.close()
        if cfg.save_every and start_step < max_steps:  # checkpointing is on: the end state too
            console.print(f"checkpoint: {save_checkpoint(max_steps)}")

        # --- evaluation, export, metrics ----------------------------------------------------------------------
        eval_result, set_results = run_all_evals(max_steps)

        model_dir = run_dir / "model"
        exported = (
            export_model(model, tokenizer, model_dir, info, lora=lora, merge=run.export.merge) if cfg.save_model else {}
        )
        if info.is_main:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved_config, sort_keys=False))
        metrics = {
            "steps": max_steps,
            "world_size": info.world,
            "distributed": info.mode,
            "resumed_from": resumed_from,
            "samples_train": len(train_samples),
            "samples_eval": len(eval_samples),
            "skipped_records": len(report.skipped)
            + (len(eval_report.skipped) if eval_report else 0)
            + sum(len(rep.skipped) for _, rep in extra_evals.values()),
            "skipped_steps": skipped_steps,
            "params": n_params,
            "params_trained": n_trainable,
            "tokens_seen": tokens_seen,
            "tokens_per_s": tokens_seen / max(train_time, 1e-9) if train_time else None,
            **(loss_summary(losses, cfg.log_every) if losses else {}),
            "train_losses": losses,
            **eval_summary(eval_result),
            "eval_sets": set_results,
            "train_time_s": train_time,
            "wall_time_s": time.perf_counter() - t_start,
            "device": str(device),
            "precision": "bf16" if autocast_dtype else "fp32",
            "hsa": dict(hsa_cfg.lambdas) if hsa_cfg.enabled else None,
            "run_dir": str(run_dir),
            **exported,
        }
        if info.is_main:
            (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        tracker.summary({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if losses:
            console.print(
                f"done: {max_steps} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
                f"{metrics['tokens_per_s'] or 0:,.0f} tok/s"
            )
        console.print(f"run directory: {run_dir}")
        exit_code = 0
        return metrics
    finally:
        console.close()
        tracker.finish(exit_code)
        D.shutdown()


def gather_wheres(wheres: list[str], info: D.DistInfo) -> list[str]:
    """Every rank's sample locations (only on the failure path, where all ranks arrive together)."""
    if info.world == 1:
        return wheres
    import torch.distributed as dist

    everyone: list[list[str] | None] = [None] * info.world
    dist.all_gather_object(everyone, wheres)
    return [w for part in everyone for w in (part or [])]
