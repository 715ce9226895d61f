"""The training recipe: setup, one step at a time, evaluation, checkpoints, and the run's results.

`Recipe` owns what a run builds (process group, data, model, optimizer, schedule) and keeps what changes as it
trains in explicit state that checkpoints itself (`Progress`, the schedule, the data position). `loop.train` is
the driver that calls it. Setup fails fast, in order of cost: config and model source, the run folder, the data
(a bad record stops the run before the model is built), then the model.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import transformers
import yaml

from hsa_train.config import RunConfig, hsa_settings, saved_rules
from hsa_train.data.collator import SemanticCollator
from hsa_train.data.dataset import SampleStream, eval_batches, rank_micro_batches
from hsa_train.data.pipeline import load_run_data
from hsa_train.data.vision import semantic_tokenizer
from hsa_train.model.flex import runs_flex
from hsa_train.model.hsa import enable_hsa, learned_lambdas
from hsa_train.model.loading import build_model, check_model_source, enable_activation_checkpointing, load_processing
from hsa_train.model.lora import trainable_parts
from hsa_train.training import checkpoint
from hsa_train.training import distributed as D
from hsa_train.training.console import Console, Tracker
from hsa_train.training.device import pick_autocast, pick_device, seed_everything
from hsa_train.training.evaluate import eval_sums, generated_answer_sums, summarize
from hsa_train.training.export import export_model
from hsa_train.training.optim import build_optimizer, build_scheduler
from hsa_train.training.report import eval_line, eval_log, eval_summary, loss_summary
from hsa_train.training.resume import check_resume
from hsa_train.training.rollouts import closed_loop
from hsa_train.training.rundir import claim, require_fresh
from hsa_train.training.step import TOKEN_LOSS, Progress, StepResult, make_forward, optimizer_step


class Recipe:
    """stage=sft: supervised fine-tuning on conversations. training/dpo.py's PreferenceRecipe is stage=dpo and
    stage=kto over the same parts: it trains on twos of samples (`pairs`), with its own objective and evaluation,
    through the hooks below."""

    pairs = False  # the training data are twos: preference pairs, or labelled samples and their KL samples

    def __init__(self, run: RunConfig, resolved_config: dict, run_dir: Path):
        self.run, self.resolved, self.run_dir = run, resolved_config, run_dir
        self.cfg = run.train
        self.type_names = list(run.hsa.types)
        self.progress = Progress()
        self.start_step = 0
        self.resumed_from: str | None = None
        self.console: Console | None = None
        self.tracker: Tracker | None = None
        self._locks: list = []
        self._notes: list[str] = []
        self._t_start = time.perf_counter()
        self._window_tokens, self._window_start = 0, time.perf_counter()

    # -- setup ---------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        transformers.utils.logging.disable_progress_bar()
        cfg = self.cfg
        self.device = pick_device(cfg.device)
        self.info = D.init(cfg.distributed, self.device)
        self.device = D.rank_device(self.device, self.info)
        self.autocast_dtype = pick_autocast(cfg.precision, self.device)
        seed_everything(self.run.seed)
        self.hsa = hsa_settings(self.run)
        self.model_config = check_model_source(
            self.run.model, self.hsa.semantic_types if self.run.hsa.enabled else None
        )
        self.ckpt_root = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else self.run_dir / "checkpoints"
        self._locks = D.on_main(lambda: claim(self.run_dir, self.ckpt_root), self.info) or []
        resume_from = self._pick_checkpoint()
        if resume_from is None:
            D.on_main(lambda: require_fresh(self.run_dir, self.ckpt_root, cfg.resume), self.info)
        self._setup_data()
        if resume_from is not None:  # refused here, before the model is built, if it would train differently
            self._check_resume(resume_from)
        self._setup_model()
        if resume_from is not None:
            self._resume(resume_from)
        self._open_reporting()
        D.set_collective_timeout(cfg.collective_timeout_s, self.info)  # training's; setup may wait longer
        self.restart_throughput_window()  # tokens/s counts training from here, not the setup

    def _setup_data(self) -> None:
        run, data = self.run, self.run.data
        self.processing = load_processing(run.model, self.model_config)  # before the model: it is sized from it
        st = semantic_tokenizer(self.processing, self.hsa.semantic_types, data.train_on, data.train_reasoning)
        # flex compiles one kernel per shape: bucketed lengths bound how many a run builds (flex.py)
        bucket = run.hsa.enabled and runs_flex(run.hsa.backend, self.device)
        in_step = self.info.world > 1  # ranks run every sub-model (a vision tower) together: filler_sample
        self.collator = SemanticCollator.from_tokenizer(
            st, data.pad_to_multiple_of, bucket_lengths=bucket, in_step=in_step
        )
        on_main = lambda fn: D.on_main(fn, self.info)  # noqa: E731
        self.data = load_run_data(data, st, self.collator, run.seed, on_main, plan=run.dataset_plan, pairs=self.pairs)
        self.eval_samples, self.extra_evals = self.data.eval, self.data.eval_sets
        if not st.renders_tools and self.data.uses_tools:
            self._notes.append(f"note: {st.tools_note}")
        self.global_batch = self.cfg.micro_batch_size * self.cfg.grad_accum * self.info.world
        n = len(self.data.train)  # rows: samples, or packed rows of several
        self.stream = SampleStream(n, seed=run.seed)
        self.max_steps = self.cfg.max_steps or max(1, math.ceil(self.cfg.epochs * n / self.global_batch))
        self.data_fingerprint = self.data.fingerprint
        unit = "packed rows" if self.data.train.packed else self.unit
        if self.global_batch > n:
            self._notes.append(
                f"warning: the global batch ({self.global_batch} {unit}) is larger than the training set ({n}): "
                "every step repeats samples; lower train.micro_batch_size or train.grad_accum"
            )
        if self.cfg.warmup_steps >= self.max_steps:
            self._notes.append(
                f"warning: train.warmup_steps={self.cfg.warmup_steps} covers the whole run of {self.max_steps} "
                "steps: the learning rate never reaches train.lr"
            )

    def _setup_model(self) -> None:
        run, hsa_cfg, cfg = self.run, self.run.hsa, self.cfg
        m = run.model
        model = build_model(
            m.name_or_path, m.arch, self.processing.tokenizer, m.dtype, m.trust_remote_code, self.model_config,
            quantization=m.quantization, device=self.device,
        )  # fmt: skip
        if hsa_cfg.enabled:
            enable_hsa(model, settings=self.hsa)
        self.lora = run.model.lora.enabled
        model, notes = trainable_parts(model, run.model, train_lambdas=hsa_cfg.enabled and bool(hsa_cfg.learnable))
        self._notes += notes
        if cfg.gradient_checkpointing:
            enable_activation_checkpointing(model)
        if not m.quantization:  # quantized weights loaded onto the device, and HSA's λ and the adapters joined
            model.to(self.device)  # them there (moving bitsandbytes' int8 weights again drops their scales)
        self._before_wrap(model)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        model = D.wrap(
            model, self.info, self.device, mixed_bf16=self.autocast_dtype is not None and self.device.type == "cuda"
        )
        if cfg.compile:
            model.compile()
        model.train()  # from_pretrained gives eval mode: no dropout, and transformers skips checkpointing in it
        self.model = model
        self.optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)
        self.scheduler = build_scheduler(self.optimizer, cfg.warmup_steps, self.max_steps, cfg.min_lr_ratio)
        self.forward = make_forward(model, self.device, self.autocast_dtype, hsa_cfg.enabled)
        self.objective = self._objective()  # here, before a resume loads the trained state: a reference is the start

    @property
    def unit(self) -> str:
        """What the training set and the batch keys count."""
        return "pairs" if self.pairs else "samples"

    def _before_wrap(self, model) -> None:
        """The built model, on its device, before DDP / FSDP wraps it (a preference run copies its reference)."""

    def _objective(self):
        """What a step minimises (step.TokenLoss: next-token cross-entropy on the label tokens)."""
        return TOKEN_LOSS

    def _pick_checkpoint(self) -> Path | None:
        """The checkpoint to continue from, before anything slow: every checksum checked (each rank the files it
        wrote), damaged ones skipped with a note. None: a fresh start (`auto` with nothing saved yet)."""
        cfg = self.cfg
        if not cfg.resume:
            return None
        if cfg.resume != "auto":
            folder = Path(cfg.resume)
            why = checkpoint.verify(folder, self.info)
            if why is not None:
                raise ValueError(f"train.resume={folder}: {why}; point train.resume at an intact checkpoint")
            return folder
        folder, skipped = checkpoint.newest_intact(self.ckpt_root, self.info)
        if folder is None and skipped:  # starting over would silently drop what those runs learned
            raise ValueError(
                f"train.resume=auto: no intact checkpoint in {self.ckpt_root} ({len(skipped)} damaged; newest: "
                f"{skipped[0].split(': ', 1)[1]}); move them away to start over, or point train.resume at one"
            )
        self._notes += skipped
        return folder

    def _check_resume(self, folder: Path) -> None:
        """Refuses a checkpoint whose config or training data would train differently (see resume.py)."""
        saved = checkpoint.trainer_state(folder)
        self._notes += check_resume(
            saved.get("config"),
            saved.get("data"),
            self.resolved,
            self.data_fingerprint,
            self.cfg.resume_allow_changes,
            str(folder),
        )

    def _resume(self, folder: Path) -> None:
        """Restores the whole state: model, optimizer, RNG, schedule, data position, progress."""
        state = checkpoint.load(folder, self.model, self.optimizer, self.info, frozen_base=self.lora, verified=True)
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["stream"])
        self.progress.load_state_dict(state)
        self.start_step, self.resumed_from = self.progress.step, str(folder)

    def _open_reporting(self) -> None:
        run, info, cfg, hsa_cfg = self.run, self.info, self.cfg, self.run.hsa
        self.console = Console(run.logging.progress, self.max_steps, enabled=info.is_main)
        self.tracker = Tracker(run.logging.wandb and info.is_main, run.logging, self.resolved, str(self.run_dir))
        self.console.print(
            f"hsa_train: {self.n_params / 1e6:.2f}M params ({self.n_trainable / 1e6:.2f}M trained"
            f"{', LoRA' if self.lora else ''}) on {self.device} x{info.world} ({info.mode}), "
            f"{'bf16 autocast' if self.autocast_dtype else 'fp32'}, HSA "
            + (f"backend={hsa_cfg.backend} λ={dict(hsa_cfg.lambdas)}" if hsa_cfg.enabled else "off")
        )
        for line in self.data.summary_lines():
            self.console.print(line)
        train = self.data.train
        rows = f"{len(train)} packed rows ({train.efficiency:.1%} tokens, not padding)" if train.packed else ""
        self.console.print(
            f"data: {len(train.ids)} train / {len(self.eval_samples)} eval {self.unit}{' in ' + rows if rows else ''}; "
            f"{self.max_steps} steps of {self.global_batch} {'rows' if train.packed else self.unit} "
            f"({cfg.micro_batch_size} x {cfg.grad_accum} accum x {info.world} ranks)"
        )
        for note in self._notes:
            self.console.print(note)
        if self.resumed_from:
            self.console.print(f"resumed from {self.resumed_from} at step {self.start_step}")

    # -- training ------------------------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.progress.step

    def train_step(self, stop_signal: int = 0) -> StepResult:
        """The next optimizer step over the next global batch of the data stream."""
        t_step = time.perf_counter()
        cfg, info, p = self.cfg, self.info, self.progress
        picked = rank_micro_batches(self.stream.take(self.global_batch), cfg.micro_batch_size, info.world, info.rank)
        micro = [self.data.train.batch(chunk) for chunk in picked]
        result = optimizer_step(
            self.model,
            self.optimizer,
            self.scheduler,
            self.forward,
            micro,
            info,
            self.device,
            step=p.step + 1,
            max_grad_norm=cfg.max_grad_norm,
            skip_nonfinite=cfg.skip_nonfinite,
            where=lambda: [w for chunk in picked for w in self.data.train.where(chunk)],
            stop_signal=stop_signal,
            objective=self.objective,
        )
        p.step += 1
        p.losses.append(result.loss)
        for name, value in result.stats.items():
            p.stats.setdefault(name, []).append(value)
        p.tokens_seen += result.tokens
        p.skipped_steps += result.skipped
        if result.skipped:
            self.console.print(f"step {p.step}: non-finite loss or gradient, update skipped ({p.skipped_steps} so far)")
        self._window_tokens += result.tokens
        p.train_time += time.perf_counter() - t_step
        self._log_step(result)
        return result

    def _log_step(self, result: StepResult) -> None:
        step = self.progress.step
        log_now = step % self.cfg.log_every == 0 or step == self.max_steps or step == self.start_step + 1
        tps = self._window_tokens / max(time.perf_counter() - self._window_start, 1e-9)
        learned = learned_lambdas(self.model) if log_now and self.run.hsa.enabled else None
        stats = {name: result.stats[name] for name in self.objective.shown}
        shown = {"loss": result.loss, "lr": result.lr, "tokens_per_s": tps, "lambdas": learned, "stats": stats}
        self.console.step(step, shown, log_now)
        if log_now:
            logged = {"loss": result.loss, "lr": result.lr, "tokens_per_s": tps, "grad_norm": result.grad_norm}
            logged["tokens_seen"] = self.progress.tokens_seen
            logged.update({k: v for k, v in result.stats.items() if v is not None})  # KTO: a class the step lacked
            logged.update({f"lambda/{name}": value for name, value in (learned or {}).items()})
            self.tracker.log({f"train/{k}": v for k, v in logged.items()}, step)
            self.restart_throughput_window()

    def restart_throughput_window(self) -> None:
        """Time spent checkpointing or evaluating is not training time."""
        self._window_tokens, self._window_start = 0, time.perf_counter()

    # -- evaluation ----------------------------------------------------------------------------------------------
    def evaluate_samples(self, samples: list, generate: bool = False, name: str = "eval") -> dict | None:
        """Loss per type and final-answer metrics over `samples`, split over the ranks with the same number of
        forwards on each, summed over all of them: the same numbers as one process. `generate`: the answer
        metrics by real decoding (eval.generate) instead of teacher forcing. `name`: the held-out split (eval) or
        the data.eval_sets entry the samples are."""
        if not samples:
            return None
        self.model.eval()

        def batches():
            return eval_batches(samples, self.cfg.eval_batch_size, self.collator, self.info.rank, self.info.world)

        sums = eval_sums(self.forward, batches(), len(self.type_names))
        if generate:
            answers = generated_answer_sums(
                D.unwrap(self.model),
                batches(),
                self.collator,
                self.device,
                self.autocast_dtype,
                synced=self.info.mode == "fsdp",
            )
            sums = sums[: -len(answers)] + answers
        totals = D.all_reduce_sum(sums, self.device, self.info)
        self.model.train()
        return {**summarize(totals, self.type_names), "answers_by": "generation" if generate else "teacher_forcing"}

    def evaluate(self, label: str = "", final: bool = False) -> tuple[dict | None, dict[str, dict | None]]:
        """The held-out split, then each of data.eval_sets: evaluated, printed (`label` after each name) and
        logged at the current step. The final evaluation decodes for real under eval.generate."""
        generate = final and self.run.eval.generate
        result = self.evaluate_samples(self.eval_samples, generate)
        set_results = {
            name: self.evaluate_samples(samples, generate, name) for name, samples in self.extra_evals.items()
        }
        for name, res in [("eval", result), *set_results.items()]:
            if res is not None:
                line, logged = self.eval_report(name + label, "eval/" if name == "eval" else f"eval/{name}/", res)
                self.console.print(line)
                self.tracker.log(logged, self.step)
        self.restart_throughput_window()
        return result, set_results

    def eval_report(self, name: str, prefix: str, result: dict) -> tuple[str, dict[str, float]]:
        """An evaluation's console line, and its scalars for the tracker under `prefix`."""
        return eval_line(name, result), eval_log(prefix, result)

    def eval_summary(self, result: dict | None) -> dict:
        """The held-out split's metrics under their metrics.json names."""
        return eval_summary(result)

    def stage_metrics(self) -> dict:
        """What only this stage reports in metrics.json."""
        return {}

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything beyond model and optimizer that a resumed run needs, as plain data, with the config and
        data fingerprint it must be resumed under."""
        return {
            **self.progress.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "stream": self.stream.state_dict(),
            "config": self.resolved,
            "data": self.data_fingerprint,
        }

    def save(self) -> Path:
        path = checkpoint.save(
            self.ckpt_root,
            self.step,
            self.model,
            self.optimizer,
            self.state_dict(),
            self.info,
            self.cfg.keep_last,
            self.lora,
        )
        self.restart_throughput_window()
        return path

    # -- the end -------------------------------------------------------------------------------------------------
    def finish(self) -> dict:
        """Final evaluation, export, config.yaml and metrics.json; returns the metrics."""
        run, info, p = self.run, self.info, self.progress
        eval_result, set_results = self.evaluate(final=True)
        exported = {}
        if self.cfg.save_model:
            exported = export_model(
                self.model,
                self.processing,
                self.run_dir / "model",
                info,
                lora=self.lora,
                merge=run.export.merge,
                rules=saved_rules(run),
                plain=None if run.hsa.enabled else self.hsa,
            )
        rollouts = None
        if run.eval.rollout.episodes and info.is_main:  # after export: the folder users will deploy acts
            folder = exported.get("model_dir") or exported["adapter_dir"]
            rollouts = closed_loop(folder, run.eval.rollout, str(self.device), log=self.console.print)
        D.barrier(info)
        if info.is_main:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.resolved, sort_keys=False))
        skipped_records = sum(len(rep.load.skipped) for rep in self.data.reports.values())
        metrics = {
            "steps": self.max_steps,
            "world_size": info.world,
            "distributed": info.mode,
            "resumed_from": self.resumed_from,
            "stage": run.stage.name,
            "samples_train": len(self.data.train.ids),  # pairs under stage=dpo, labelled samples under stage=kto
            "samples_eval": len(self.eval_samples),
            "skipped_records": skipped_records,
            "data": self.data.metrics(),
            "skipped_steps": p.skipped_steps,
            "params": self.n_params,
            "params_trained": self.n_trainable,
            "tokens_seen": p.tokens_seen,
            "tokens_per_s": p.tokens_seen / max(p.train_time, 1e-9) if p.train_time else None,
            **(loss_summary(p.losses, self.cfg.log_every) if p.losses else {}),
            "train_losses": p.losses,
            **({"train_stats": p.stats} if p.stats else {}),  # the objective's statistics per step (dpo, kto)
            **self.eval_summary(eval_result),
            "eval_sets": set_results,
            "rollout": rollouts,
            "train_time_s": p.train_time,
            "wall_time_s": time.perf_counter() - self._t_start,
            "device": str(self.device),
            "precision": "bf16" if self.autocast_dtype else "fp32",
            "hsa": dict(run.hsa.lambdas) if run.hsa.enabled else None,
            "hsa_learned": learned_lambdas(self.model) if run.hsa.enabled else None,
            "run_dir": str(self.run_dir),
            **self.stage_metrics(),
            **exported,
        }
        if info.is_main:
            (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        self.tracker.summary({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if p.losses:
            self.console.print(
                f"done: {self.max_steps} steps, loss {p.losses[0]:.4f} -> {p.losses[-1]:.4f}, "
                f"{metrics['tokens_per_s'] or 0:,.0f} tok/s"
            )
        self.console.print(f"run directory: {self.run_dir}")
        return metrics

    def close(self, exit_code: int) -> None:
        """Closes reporting (wandb gets the exit code), releases the run folder and leaves the process group."""
        if self.console is not None:
            self.console.close()
        if self.tracker is not None:
            self.tracker.finish(exit_code)
        for lock in self._locks:
            lock.release()
        D.shutdown(clean=exit_code == 0)
