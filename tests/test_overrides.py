"""The command-line pre-check: unknown keys get one line with a suggestion; everything valid passes through."""

import pytest

from hsa_train.overrides import unknown_key_message


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["train.max_steps=3", "hsa.lambdas.PROCESS_NOISE=0.2", "hydra.run.dir=/tmp/x"],
        ["-m", "hsa.lambdas.PROCESS_NOISE=0.0,0.05", "hsa.lambdas.KEY_EVENT=0,0.01"],
        ["+hsa.lambdas.TOOL=0.1", "model=tiny_qwen2", "data.train_files=[a.jsonl,b.jsonl]", "model.name_or_path=null"],
        ["hydra/job_logging=disabled", "--cfg", "job"],
        ["train.max_steps=[1"],  # a syntax error is Hydra's to report
        # a list entry's key that waits for its value (`???`) is a key: experiment=agent_demo_rft's own episodes
        ["experiment=agent_demo_rft", "data.datasets.1.path=own/episodes.jsonl"],
    ],
)
def test_valid_or_foreign_command_lines_pass(argv):
    assert unknown_key_message(argv) is None


@pytest.mark.parametrize(
    "argv, key, suggestion",
    [
        (["train.max_stepz=3"], "train.max_stepz", "train.max_steps"),
        (["hsa.lambda.PROCESS_NOISE=0.2"], "hsa.lambda.PROCESS_NOISE", "hsa.lambdas.PROCESS_NOISE"),
        (["-m", "hsa.lambdas.PROCES_NOISE=0,0.1"], "hsa.lambdas.PROCES_NOISE", "hsa.lambdas.PROCESS_NOISE"),
        (["data.train_file=[x.jsonl]"], "data.train_file", "data.train_files"),
        (["experiment=agent_demo_rft", "data.datasets.1.pat=x.jsonl"], "data.datasets.1.pat", "data.datasets.1.path"),
    ],
)
def test_unknown_keys_are_named_with_the_closest_key(argv, key, suggestion):
    message = unknown_key_message(argv)
    assert f"unknown config key '{key}'" in message
    assert f"did you mean {suggestion}" in message
    assert "\n" not in message
