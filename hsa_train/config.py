"""The schema of a run's config, and its early validation.

The YAML files in `conf/` hold every value and its documentation; this module holds only the types and the rules.
`validate` runs before anything heavy is loaded: an unknown key, a wrong type or a bad value stops the run with one
line that names the key and says what to do.
"""

from __future__ import annotations

import importlib.util
import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, make_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hsa_train.data.rules import SavedRules
from hsa_train.data.spec import DatasetPlan, plan_datasets
from hsa_train.model.settings import HSASettings
from hsa_train.types import (
    DIRECTIONS,
    DISTRIBUTED,
    DTYPES,
    ON_ERROR,
    OVERLONG,
    PRECISIONS,
    PREFERENCE_LOSSES,
    PROGRESS,
    QUANTIZATION,
    STAGES,
    TRAIN_ON,
    SemanticTypes,
    check_choice,
    one_line,
)


class ConfigError(ValueError):
    """A bad config value; the message is one line."""


def bundled_path(relative: str) -> str:
    """Absolute path of a file shipped in `data/` (the `${bundled:...}` resolver)."""
    return str(Path(str(resources.files("hsa_train.bundled"))) / relative)


OmegaConf.register_new_resolver("bundled", bundled_path, replace=True)


@dataclass
class StageConfig:
    """What the run optimises; a stage's keys are null under the others (conf/stage/sft.yaml sets none)."""

    name: str = MISSING
    beta: Optional[float] = None
    label_smoothing: Optional[float] = None
    loss: Optional[str] = None
    desirable_weight: Optional[float] = None
    undesirable_weight: Optional[float] = None
    precompute_reference: Optional[bool] = None

    @property
    def preference(self) -> bool:
        """Trained against a reference model, on twos of samples (pairs, or labelled samples and their KL ones)."""
        return self.name in ("dpo", "kto")

    @property
    def labelled(self) -> bool:
        return self.name == "kto"


# The keys each stage sets (conf/stage/<name>.yaml); any other stage key stays null.
STAGE_KEYS = {
    "sft": (),
    "dpo": ("beta", "label_smoothing", "loss", "precompute_reference"),
    "kto": ("beta", "desirable_weight", "undesirable_weight", "precompute_reference"),
}


@dataclass
class LoraConfig:
    enabled: bool = MISSING
    r: int = MISSING
    alpha: float = MISSING
    dropout: float = MISSING
    target_modules: Any = MISSING  # "all-linear" or a list of module names


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = MISSING
    tokenizer: Optional[str] = MISSING
    chat_template: Optional[str] = MISSING
    trust_remote_code: bool = MISSING
    dtype: str = MISSING
    arch: Optional[dict[str, Any]] = MISSING
    freeze_vision: Optional[bool] = MISSING
    image_processor: dict[str, Any] = MISSING
    quantization: Optional[str] = MISSING
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    train_files: list[str] = MISSING
    datasets: list[Any] = MISSING
    dataset_info: Optional[str] = MISSING
    eval_files: list[str] = MISSING
    eval_datasets: list[Any] = MISSING
    eval_ratio: float = MISSING
    eval_sets: dict[str, list[Any]] = MISSING
    on_error: str = MISSING
    cutoff_len: Optional[int] = MISSING
    overlong: str = MISSING
    keep_types: list[str] = MISSING
    noise_window: Optional[int] = MISSING
    packing: bool = MISSING
    train_on: str = MISSING
    train_reasoning: bool = MISSING
    pad_to_multiple_of: Optional[int] = MISSING
    ignore_keys: list[str] = MISSING
    cache: bool = MISSING
    cache_dir: Optional[str] = MISSING
    num_proc: int = MISSING


def _settings_schema(settings: type, name: str, leave_out: tuple[str, ...], **extra: type) -> type:
    """The config node of a settings dataclass: its fields (their types; `Any` for unions OmegaConf cannot
    check), each without a default (conf/ holds every value), plus `extra`. One definition, two uses."""
    hints = typing.get_type_hints(settings)
    plain = (bool, int, float, str)
    specs = [(key, kind, field(default=MISSING)) for key, kind in extra.items()]
    for f in fields(settings):
        if f.name in leave_out:
            continue
        kind = hints[f.name]
        args = typing.get_args(kind)
        if args and all(a in plain for a in args):  # e.g. bool | str: OmegaConf 2.3 takes no such union
            kind = Any
        specs.append((f.name, kind, field(default=MISSING)))
    return make_dataclass(name, specs)


# The `hsa` group: HSASettings' fields (but the per-head λ a run learns) and `enabled`.
HSAConfig = _settings_schema(HSASettings, "HSAConfig", ("lambdas_per_head",), enabled=bool)


@dataclass
class TrainConfig:
    max_steps: Optional[int] = MISSING
    epochs: Optional[float] = MISSING
    micro_batch_size: int = MISSING
    grad_accum: int = MISSING
    lr: float = MISSING
    min_lr_ratio: float = MISSING
    warmup_steps: int = MISSING
    weight_decay: float = MISSING
    betas: list[float] = MISSING
    eps: float = MISSING
    max_grad_norm: Optional[float] = MISSING
    precision: str = MISSING
    device: str = MISSING
    log_every: int = MISSING
    eval_every: int = MISSING
    eval_batch_size: int = MISSING
    save_model: bool = MISSING
    distributed: str = MISSING
    save_every: int = MISSING
    keep_last: Optional[int] = MISSING
    checkpoint_dir: Optional[str] = MISSING
    resume: Optional[str] = MISSING
    resume_allow_changes: list[str] = MISSING
    skip_nonfinite: bool = MISSING
    stop_grace_s: float = MISSING
    collective_timeout_s: float = MISSING
    gradient_checkpointing: bool = MISSING
    compile: bool = MISSING


@dataclass
class ExportConfig:
    merge: bool = MISSING
    typing_dataset: Optional[str] = None


@dataclass
class RolloutConfig:
    episodes: int = 0
    env: Optional[Any] = None
    variants: Optional[dict[str, Any]] = None
    seed: int = 0
    batch_size: int = 8
    max_new_tokens: int = 16
    max_turns: Optional[int] = None


@dataclass
class EvalConfig:
    generate: bool = MISSING
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


@dataclass
class LoggingConfig:
    wandb: bool = MISSING
    project: str = MISSING
    entity: Optional[str] = MISSING
    name: Optional[str] = MISSING
    group: Optional[str] = MISSING
    tags: list[str] = MISSING
    progress: str = MISSING


@dataclass
class ObjectiveConfig:
    metric: str = MISSING
    direction: str = MISSING


@dataclass
class RunConfig:
    seed: int = MISSING
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    hsa: HSAConfig = field(default_factory=HSAConfig)  # type: ignore[valid-type]
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def dataset_plan(self) -> DatasetPlan:
        """Every dataset the `data` group names, resolved once: validation checks it, the run's data uses it (a
        `data` group edited after validation, as benchmarks do, is resolved again)."""
        d, h = self.data, self.hsa
        names = [d.train_files, d.datasets, d.dataset_info, d.eval_files, d.eval_datasets, d.eval_sets, h.types]
        key = json.dumps([*names, h.default_type], sort_keys=True, default=str)
        memo = self.__dict__.get("_dataset_plan")
        if memo is None or memo[0] != key:
            memo = self.__dict__["_dataset_plan"] = (key, plan_datasets(d, hsa_settings(self).semantic_types))
        return memo[1]


def saved_rules(run: RunConfig) -> SavedRules:
    """What the run's model folders keep of its data settings (`hsa_rules.json`): typing rules and truncation."""
    d = run.data
    return SavedRules.from_plan(run.dataset_plan, d.cutoff_len, d.keep_types, run.export.typing_dataset, d.noise_window)


def _omegaconf_line(exc: OmegaConfBaseException) -> str:
    msg = one_line(exc, "first")
    key = getattr(exc, "full_key", None)
    return f"{key}: {msg}" if key and key not in msg else msg


def _choice(name: str, value: Any, choices: tuple) -> None:
    try:
        check_choice(name, value, choices)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"train.lr": 0.003, ...}: a plain nested config as dotted keys and their values (an empty dict is a leaf)."""
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


# Keys that were renamed, and what to write instead (checked before the schema calls them unknown).
RENAMED = {"data.max_length": "data.cutoff_len (with data.overlong=error for the old refuse-if-longer behaviour)"}


def _check_data(run: RunConfig, types: SemanticTypes) -> None:
    """The data keys, and every dataset entry (formats, columns, type rules, regexes) before anything is read."""
    d = run.data
    _check(
        len(d.train_files) + len(d.datasets) > 0,
        "no training data: set data.train_files=[file.jsonl] or data.datasets=[...]",
    )
    _check(0.0 <= d.eval_ratio < 1.0, f"data.eval_ratio={d.eval_ratio} must be in [0, 1)")
    _check(
        d.dataset_info is None or Path(d.dataset_info).is_file(),
        f"data.dataset_info={d.dataset_info!r}: no such file; give the path of a LLaMA-Factory dataset_info.json",
    )
    for name, entries in d.eval_sets.items():
        _check(
            bool(name) and name.replace("_", "").replace("-", "").isalnum(),
            f"data.eval_sets: name {name!r} must be letters, digits, - or _ (it names metrics: eval/{name}/loss)",
        )
        _check(len(entries) > 0, f"data.eval_sets.{name} is empty; give one or more files or dataset entries")
    try:
        run.dataset_plan  # noqa: B018  (resolved here, once: the run's data takes the plan from `run`)
        saved_rules(run)  # export.typing_dataset names a training dataset
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    everything, stage = run.dataset_plan.everything, run.stage.name
    files = " (data.train_files=[] leaves out the files listed there)" if d.train_files else ""
    kinds = {  # what each stage trains on, the entry key that says a dataset holds it, and how to set it
        "sft": ("conversations", None, None),
        "dpo": ("preference pairs", "ranking: true", "mark a pairs dataset ranking: true"),
        "kto": ("labelled samples", "columns.kto_tag", "name a dataset's label column in columns.kto_tag"),
    }

    def kind(spec) -> str:
        return "dpo" if spec.ranking else "kto" if spec.labelled else "sft"

    wrong = [spec for spec in everything if kind(spec) != stage]
    if wrong and stage in kinds:
        names, has = ", ".join(spec.name for spec in wrong), kind(wrong[0])
        if stage == "sft":
            _check(
                False,
                f"data: {names} holds {kinds[has][0]} ({kinds[has][1]}), and stage=sft trains conversations: train it "
                f"with stage={has}, or leave it out of the run's data",
            )
        _check(
            False,
            f"data: {names} holds {kinds[has][0]}, and stage={stage} trains on {kinds[stage][0]}: "
            f"{kinds[stage][2]} (in its entry or dataset_info.json), or leave it out of the run's data{files}",
        )
    if run.stage.preference:
        _check(
            not d.packing, f"data.packing=true does not apply to stage={stage} (twos are never packed): set it false"
        )
        _check(
            d.noise_window is None,
            f"data.noise_window does not apply to stage={stage} (both sides keep the whole prompt): set it to null",
        )
    _choice("data.on_error", d.on_error, ON_ERROR)
    _choice("data.train_on", d.train_on, TRAIN_ON)
    _choice("data.overlong", d.overlong, OVERLONG)
    _check(d.cutoff_len is None or d.cutoff_len > 0, f"data.cutoff_len={d.cutoff_len} must be > 0 or null")
    _check(not d.packing or d.cutoff_len is not None, "data.packing=true packs rows of data.cutoff_len: set it")
    unknown = [t for t in d.keep_types if t not in types.names]
    _check(not unknown, f"data.keep_types: unknown type(s) {unknown}; known: {', '.join(types.names)}")
    _check(d.noise_window is None or d.noise_window >= 0, f"data.noise_window={d.noise_window} must be >= 0 or null")
    _check(d.pad_to_multiple_of is None or d.pad_to_multiple_of > 0, "data.pad_to_multiple_of must be > 0 or null")
    _check(d.num_proc > 0, f"data.num_proc={d.num_proc} must be > 0")


def _check_stage(run: RunConfig) -> None:
    """A stage sets its own keys (STAGE_KEYS) and no other stage's; their values are in range."""
    st = run.stage
    _choice("stage.name", st.name, STAGES)
    mine = STAGE_KEYS[st.name]
    given = [key for keys in STAGE_KEYS.values() for key in keys if key not in mine and getattr(st, key) is not None]
    if given:
        owners = [name for name, keys in STAGE_KEYS.items() if given[0] in keys]
        _check(False, f"stage.{given[0]} applies to stage={' or '.join(owners)}; this run is stage={st.name}")
    missing = [key for key in mine if getattr(st, key) is None]
    _check(not missing, f"stage.{missing[0] if missing else ''} has no value: stage={st.name} needs it "
           f"(conf/stage/{st.name}.yaml)")  # fmt: skip
    if not st.preference:
        return
    _check(st.beta > 0 and math.isfinite(st.beta), f"stage.beta={st.beta} must be a positive number")
    if st.labelled:
        for key in ("desirable_weight", "undesirable_weight"):
            value = getattr(st, key)
            _check(value > 0 and math.isfinite(value), f"stage.{key}={value} must be a positive number")
        return
    _choice("stage.loss", st.loss, PREFERENCE_LOSSES)
    _check(0.0 <= st.label_smoothing < 0.5, f"stage.label_smoothing={st.label_smoothing} must be in [0, 0.5)")
    _check(
        st.label_smoothing == 0.0 or st.loss == "sigmoid",
        f"stage.label_smoothing={st.label_smoothing} applies to stage.loss=sigmoid; set it to 0 for {st.loss}",
    )


def _check_rollout(run: RunConfig) -> None:
    """eval.rollout: closed-loop episodes after training, on the exported model."""
    r = run.eval.rollout
    _check(r.episodes >= 0, f"eval.rollout.episodes={r.episodes} must be >= 0")
    if r.episodes == 0:
        return
    _check(
        isinstance(r.env, dict) and isinstance(r.env.get("_target_"), str),
        "eval.rollout.env: give the environment, e.g. {_target_: hsa_train.agent.envs.minigrid.MemoryText, size: 9}",
    )
    _check(run.train.save_model, "eval.rollout rolls out the exported model: set train.save_model=true")
    _check(r.batch_size >= 1 and r.max_new_tokens >= 1, "eval.rollout.batch_size and max_new_tokens must be >= 1")
    _check(r.max_turns is None or r.max_turns >= 1, f"eval.rollout.max_turns={r.max_turns} must be >= 1 or null")
    for name, changes in (r.variants or {}).items():
        _check(
            bool(name) and name.replace("_", "").replace("-", "").isalnum() and isinstance(changes, dict),
            f"eval.rollout.variants.{name}: give a name of letters, digits, - or _ and a mapping of env fields",
        )


def validate(cfg: DictConfig) -> RunConfig:
    """The typed, checked run config (raises ConfigError). `hydra` keys are ignored."""
    plain = OmegaConf.create({k: v for k, v in cfg.items() if k != "hydra"}) if "hydra" in cfg else cfg
    for old, new in RENAMED.items():
        if OmegaConf.select(plain, old, default=None) is not None:
            raise ConfigError(f"{old} was renamed: use {new}")
    schema = OmegaConf.structured(RunConfig)
    try:
        merged = OmegaConf.merge(schema, plain)
        OmegaConf.resolve(merged)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(
                f"config keys without a value: {', '.join(missing)}; set them in conf/ or on the command line"
            )
        run: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_line(exc)) from None

    m, h, t, lg = run.model, run.hsa, run.train, run.logging
    _choice("model.dtype", m.dtype, DTYPES)
    if not m.name_or_path:
        _check(bool(m.arch) and "type" in m.arch, "model.arch.type must be set when model.name_or_path is null")
    _check(
        all(isinstance(k, str) for k in m.image_processor),
        "model.image_processor: give settings by name, e.g. {max_pixels: 200704}",
    )
    if m.lora.enabled:
        _check(bool(m.name_or_path), "model.lora.enabled=true needs a pretrained base: set model.name_or_path")
        _check(m.lora.r > 0 and m.lora.alpha > 0, f"model.lora: r={m.lora.r} and alpha={m.lora.alpha} must be > 0")
        _check(0.0 <= m.lora.dropout < 1.0, f"model.lora.dropout={m.lora.dropout} must be in [0, 1)")
        tm = m.lora.target_modules
        _check(
            tm == "all-linear" or (isinstance(tm, list) and tm and all(isinstance(x, str) for x in tm)),
            f"model.lora.target_modules={tm!r}: use all-linear or a list of module names",
        )
    _check(
        not run.export.merge or m.lora.enabled, "export.merge=true merges a LoRA adapter: set model.lora.enabled=true"
    )
    if m.quantization is not None:
        _choice("model.quantization", m.quantization, QUANTIZATION)
        q = f"model.quantization={m.quantization}"
        _check(m.lora.enabled, f"{q} trains LoRA adapters over a frozen quantized base: set model.lora.enabled=true")
        _check(
            importlib.util.find_spec("bitsandbytes") is not None,
            f"{q} needs bitsandbytes: pip install 'hsa_train[qlora]'",
        )
        _check(
            run.train.distributed != "fsdp",
            f"{q} does not shard with train.distributed=fsdp (FSDP2 over bitsandbytes' packed weights is not "
            "supported here): use ddp, or a full-precision base",
        )
        _check(
            not run.export.merge,
            f"export.merge=true would merge the adapter into the quantized base ({q}): export the adapter "
            "(export.merge=false), and merge it into the full-precision base",
        )

    _check_stage(run)
    try:
        settings = hsa_settings(run)  # HSASettings validates the group, once
    except ValueError as exc:
        raise ConfigError(str(exc) if str(exc).startswith("hsa.") else f"hsa: {exc}") from None
    _check_data(run, settings.semantic_types)

    _check(t.max_steps is not None or t.epochs is not None, "set train.max_steps or train.epochs")
    _check(t.max_steps is None or t.max_steps > 0, f"train.max_steps={t.max_steps} must be > 0 (or null to use epochs)")
    _check(t.epochs is None or t.epochs > 0, f"train.epochs={t.epochs} must be > 0 or null")
    _check(t.micro_batch_size > 0, f"train.micro_batch_size={t.micro_batch_size} must be > 0")
    _check(t.grad_accum > 0, f"train.grad_accum={t.grad_accum} must be > 0")
    _check(t.lr > 0 and math.isfinite(t.lr), f"train.lr={t.lr} must be a positive number")
    _check(0.0 <= t.min_lr_ratio <= 1.0, f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    _check(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be >= 0")
    _check(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be >= 0")
    _check(
        len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), f"train.betas={t.betas} must be two numbers in [0, 1)"
    )
    _check(t.eps > 0, f"train.eps={t.eps} must be > 0")
    _check(t.max_grad_norm is None or t.max_grad_norm > 0, f"train.max_grad_norm={t.max_grad_norm} must be > 0 or null")
    _choice("train.precision", t.precision, PRECISIONS)
    _check(
        t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"),
        f"train.device={t.device!r} is not allowed; use auto, cpu, cuda or cuda:N",
    )
    _check(
        not (h.enabled and h.backend == "flex" and t.device == "cpu"),
        "hsa.backend=flex cannot train on CPU (FlexAttention's backward needs CUDA): use hsa.backend=auto (sdpa on "
        "CPU, flex on CUDA), sdpa or eager",
    )
    _check(t.log_every > 0, f"train.log_every={t.log_every} must be > 0")
    _check(t.eval_every >= 0, f"train.eval_every={t.eval_every} must be >= 0 (0 = only at the end)")
    _check(t.eval_batch_size > 0, f"train.eval_batch_size={t.eval_batch_size} must be > 0")

    _choice("train.distributed", t.distributed, DISTRIBUTED)
    _check(t.save_every >= 0, f"train.save_every={t.save_every} must be >= 0 (0 = no periodic checkpoints)")
    _check(t.keep_last is None or t.keep_last > 0, f"train.keep_last={t.keep_last} must be > 0 or null (keep all)")
    for key in ("stop_grace_s", "collective_timeout_s"):
        value = getattr(t, key)
        _check(value > 0 and math.isfinite(value), f"train.{key}={value} must be a positive number of seconds")
    _check(
        t.resume is None or t.resume == "auto" or Path(t.resume).is_dir(),
        f"train.resume={t.resume!r}: use auto, null, or the path of a checkpoint folder (step_NNNNNNN)",
    )
    known = flatten(OmegaConf.to_container(merged, resolve=False))
    for key in t.resume_allow_changes:
        _check(
            key == "data" or any(k == key or k.startswith(key + ".") for k in known),
            f"train.resume_allow_changes: {key!r} names no config key; list keys or prefixes (hsa.lambdas, "
            "train.lr), or data for the training data",
        )
    _choice("logging.progress", lg.progress, PROGRESS)
    _check_rollout(run)
    _check(
        not (run.stage.preference and run.eval.generate),
        f"eval.generate decodes conversations' final answers; stage={run.stage.name} evaluates "
        f"{'labelled samples' if run.stage.labelled else 'pairs'}: set eval.generate=false",
    )
    _choice("objective.direction", run.objective.direction, DIRECTIONS)
    _check(bool(run.objective.metric), "objective.metric is empty; name a metrics.json key, e.g. eval_loss")
    return run


def hsa_settings(run: RunConfig) -> HSASettings:
    """The run's HSA settings (the `hsa` group without `enabled`), as `enable_hsa` takes them."""
    return HSASettings.from_mapping(vars(run.hsa))
