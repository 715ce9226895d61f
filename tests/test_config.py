"""The shipped configs compose and validate; bad keys and values fail early with one line naming the key."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import open_dict

from hsa_train.config import ConfigError, bundled_path, validate


def composed(*overrides):
    with initialize_config_module(config_module="hsa_train.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_defaults_validate_and_point_at_bundled_data():
    run = validate(composed())
    assert run.hsa.lambdas == {"GLOBAL_CONDITION": 0.0, "KEY_EVENT": 0.01, "PROCESS_NOISE": 0.1}
    assert run.hsa.types == ["GLOBAL_CONDITION", "KEY_EVENT", "PROCESS_NOISE"]
    assert run.data.train_files == [bundled_path("demo/trajectories.jsonl")]
    assert run.model.name_or_path is None and run.model.arch["type"] == "qwen2"


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lr=-1", "train.lr=-1.0 must be a positive number"),
        ("train.lr=abc", "train.lr"),
        ("hsa.backend=flash", "hsa.backend='flash' is not allowed"),
        ("hsa.lambdas.PROCESS_NOISE=-0.5", "λ[PROCESS_NOISE]=-0.5 must be finite and >= 0"),
        ("+hsa.lambdas.URGENT=0.5", "λ for unknown types ['URGENT']"),
        ("+train.learning_rate=0.1", "learning_rate"),
        ("data.on_error=ignore", "data.on_error='ignore' is not allowed"),
        ("train.precision=fp8", "train.precision='fp8'"),
        ("hsa.default_type=URGENT", "default_type 'URGENT' is not one of the types"),
        ("train.max_steps=null", "set train.max_steps or train.epochs"),
        ("objective.direction=up", "objective.direction='up' is not allowed"),
        ("+data.eval_sets.long=[]", "data.eval_sets.long is empty"),
        ("+data.max_length=512", "data.max_length was renamed: use data.cutoff_len"),
        ("data.overlong=cut", "data.overlong='cut' is not allowed"),
        ("data.keep_types=[TASK]", "data.keep_types: unknown type(s) ['TASK']"),
        ("data.packing=true data.cutoff_len=null", "data.packing=true packs rows of data.cutoff_len"),
        ("data.dataset_info=/nowhere/dataset_info.json", "data.dataset_info='/nowhere/dataset_info.json': no such"),
        ("data.datasets=[{path:a.json,format:csv}]", "data.datasets[0] (a): "),
        ("data.datasets=[{path:a.json,semantic_type_rules:[{pattern:'(',type:KEY_EVENT}]}]", "does not compile"),
        ("data.datasets=[{path:a.json,semantic_type_by_role:{system:TASK}}]", "TASK"),
        ("data.train_files=[]", "no training data"),
        ("hsa.learnable=per_type", "hsa.learnable='per_type': use false, true"),
        ("hsa.generated_type=TOOL", "hsa.generated_type='TOOL' is not one of hsa.types"),
        ("hsa.backend=flex train.device=cpu", "hsa.backend=flex cannot train on CPU"),
        ("eval.generate=maybe", "eval.generate"),
        ("+eval.max_new_tokens=4", "max_new_tokens"),
        ("train.stop_grace_s=0", "train.stop_grace_s=0.0 must be a positive number of seconds"),
        ("train.collective_timeout_s=inf", "train.collective_timeout_s=inf must be a positive number of seconds"),
    ],
)
def test_bad_values_fail_with_one_line(override, fragment):
    with pytest.raises(ConfigError) as info:
        validate(composed(*override.split(" ")))
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_new_type_with_its_lambda_is_accepted():
    run = validate(composed("hsa.types=[GLOBAL_CONDITION,KEY_EVENT,PROCESS_NOISE,TOOL]", "+hsa.lambdas.TOOL=0.05"))
    assert run.hsa.lambdas["TOOL"] == 0.05


def test_recall_experiment_composes():
    """experiment=recall swaps in the recall data, its longer eval sets and the objective the README sorts by."""
    with initialize_config_module(config_module="hsa_train.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=recall"], return_hydra_config=True)
    run = validate(cfg)
    assert run.data.train_files == [bundled_path("recall/train.jsonl")]
    assert run.data.eval_files == [bundled_path("recall/eval_1x.jsonl")]
    assert run.data.eval_sets == {
        "len2x": [bundled_path("recall/eval_2x.jsonl")],
        "len4x": [bundled_path("recall/eval_4x.jsonl")],
    }
    assert all(Path(f).is_file() for files in run.data.eval_sets.values() for f in files)
    assert (run.objective.metric, run.objective.direction) == ("eval_sets.len4x.exact_match", "maximize")
    assert cfg.hydra.callbacks.sweep_summary.metric == "eval_sets.len4x.exact_match"  # the summary follows
    assert run.hsa.lambdas == {"GLOBAL_CONDITION": 0.0, "KEY_EVENT": 0.01, "PROCESS_NOISE": 0.1}


@pytest.mark.parametrize("experiment, prefix", [("mqar", ""), ("mqar_latest", "latest_")])
def test_mqar_experiments_compose(experiment, prefix):
    """experiment=mqar / mqar_latest: their data, the three test lengths, the 2-layer shape of the evidence's base
    (for a run without one) and an objective that names one of the run's metrics."""
    with initialize_config_module(config_module="hsa_train.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    run = validate(cfg)
    assert run.data.train_files == [bundled_path(f"mqar/{prefix}train.jsonl")]
    assert run.data.eval_files == [bundled_path(f"mqar/{prefix}valid.jsonl")]
    assert run.data.eval_sets == {
        n: [bundled_path(f"mqar/{prefix}eval_{n[3:]}.jsonl")] for n in ("len1x", "len2x", "len4x")
    }
    assert all(Path(f).is_file() for files in run.data.eval_sets.values() for f in files)
    assert run.objective.metric == "eval_sets.len4x.answer_token_accuracy" and run.model.arch["num_hidden_layers"] == 2
    assert (run.train.max_steps, run.train.warmup_steps, run.train.lr) == (200, 50, 1e-3)


def test_eval_set_names_must_be_usable_in_metric_names():
    cfg = composed()
    with open_dict(cfg):
        cfg.data.eval_sets = {"len 4x": ["x.jsonl"]}
    with pytest.raises(ConfigError, match="name 'len 4x' must be letters, digits"):
        validate(cfg)


@pytest.mark.parametrize(
    "arm, expected",
    [
        ("plain", (False, None, "none", False, None)),
        ("hsa", (True, 0.1, "none", False, None)),
        ("learnable", (True, 0.1, "none", "per_head", None)),
        ("type_blind", (True, 0.5, "alibi", False, None)),
        ("obs_mask", (False, None, "none", False, 4)),
        ("hsa_obs_mask", (True, 0.1, "none", False, 4)),
        ("hsa_noise", (True, 0.1, "none", False, None)),
    ],
)
def test_each_evidence_arm_sets_what_its_file_says(arm, expected):
    """conf/arm/*.yaml: (hsa on, PROCESS_NOISE λ when on, head scaling, learnable, noise window); the type-blind
    arm's every type follows hsa.lambdas.PROCESS_NOISE."""
    from hydra import compose, initialize_config_module

    extra = ["hsa.lambdas.PROCESS_NOISE=0.5"] if arm == "type_blind" else []
    with initialize_config_module(config_module="hsa_train.conf", version_base="1.3"):
        run = validate(compose(config_name="config", overrides=[f"arm={arm}", *extra]))
    h = run.hsa
    got = (h.enabled, h.lambdas["PROCESS_NOISE"] if h.enabled else None, h.head_scaling, h.learnable)
    assert (*got, run.data.noise_window) == expected
    if arm == "type_blind":
        assert set(dict(h.lambdas).values()) == {0.5}
    if arm == "hsa_noise":
        assert dict(h.lambdas) == {"GLOBAL_CONDITION": 0.0, "KEY_EVENT": 0.0, "PROCESS_NOISE": 0.1}


def test_the_stage_group_composes_sft_by_default_and_dpo_on_request():
    run = validate(composed())
    assert run.stage.name == "sft" and not run.stage.preference and run.stage.beta is None
    dpo = validate(composed("stage=dpo", "data=dpo_demo"))
    assert dpo.stage.preference and (dpo.stage.beta, dpo.stage.label_smoothing, dpo.stage.loss) == (0.1, 0.0, "sigmoid")
    assert [spec.ranking for spec in dpo.dataset_plan.train] == [True]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["+stage.beta=0.5"], "stage.beta applies to stage=dpo or kto; this run is stage=sft"),  # hydra needs the +
        (["stage.name=ppo"], "stage.name='ppo' is not allowed; use one of: sft, dpo"),
        (["stage=dpo"], "data: trajectories holds conversations, and stage=dpo trains on preference pairs"),
        (["stage=dpo", "data=dpo_demo", "stage.beta=0"], "stage.beta=0.0 must be a positive number"),
        (["stage=dpo", "data=dpo_demo", "stage.beta=null"], "stage.beta has no value: stage=dpo needs it"),
        (["stage=dpo", "data=dpo_demo", "stage.loss=hinge"], "stage.loss='hinge' is not allowed; use one of: sigmoid"),
        (["stage=dpo", "data=dpo_demo", "stage.label_smoothing=0.5"], "stage.label_smoothing=0.5 must be in [0, 0.5)"),
        (
            ["stage=dpo", "data=dpo_demo", "stage.loss=ipo", "stage.label_smoothing=0.1"],
            "stage.label_smoothing=0.1 applies to stage.loss=sigmoid; set it to 0 for ipo",
        ),
        (["stage=dpo", "data=dpo_demo", "data.packing=true"], "data.packing=true does not apply to stage=dpo"),
        (["stage=dpo", "data=dpo_demo", "data.noise_window=4"], "data.noise_window does not apply to stage=dpo"),
        (["stage=dpo", "data=dpo_demo", "eval.generate=true"], "stage=dpo evaluates pairs: set eval.generate=false"),
        (
            ["stage=dpo", "data=dpo_demo", f"data.eval_files=[{bundled_path('demo/trajectories.jsonl')}]"],
            "data: trajectories holds conversations",
        ),
        (["model.quantization=2bit"], "model.quantization='2bit' is not allowed; use one of: 4bit, 8bit"),
        (["model.quantization=4bit"], "model.quantization=4bit trains LoRA adapters over a frozen quantized base"),
        (
            ["model.quantization=4bit", "model.lora.enabled=true", "model.name_or_path=x", "train.distributed=fsdp"],
            "model.quantization=4bit does not shard with train.distributed=fsdp",
        ),
        (
            ["model.quantization=8bit", "model.lora.enabled=true", "model.name_or_path=x", "export.merge=true"],
            "export.merge=true would merge the adapter into the quantized base",
        ),
    ],
)
def test_bad_stage_and_quantization_settings_fail_with_one_line(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        validate(composed(*overrides))
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_the_agent_dpo_experiment_trains_rollout_pairs_typed_as_the_agent_was():
    run = validate(composed("experiment=agent_demo_dpo", "model.name_or_path=/m", "data.datasets.0.path=/p.jsonl"))
    [spec] = run.dataset_plan.train
    assert run.stage.name == "dpo" and spec.ranking and spec.path == "/p.jsonl" and run.data.eval_ratio == 0.2
    assert [rule["type"] for rule in spec.semantic_type_rules] == ["GLOBAL_CONDITION", "KEY_EVENT"]
    assert spec.default_semantic_type == "PROCESS_NOISE"
    assert run.eval.rollout.episodes == 50 and set(run.eval.rollout.variants) == {"len1x", "len2x", "len4x"}
