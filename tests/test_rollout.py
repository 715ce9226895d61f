"""Rollouts: minigrid's Memory task as text (the package's own dynamics, reward and termination), its expert,
batched episodes by a model, episodes as training data, the rollout CLI, and `eval.rollout` after training."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("minigrid")

from conftest import cli_env  # noqa: E402
from minigrid.envs.memory import MemoryEnv  # noqa: E402

from hsa_train.agent import Agent, load_trained  # noqa: E402
from hsa_train.agent.envs.minigrid import ACTIONS, MemoryText  # noqa: E402
from hsa_train.agent.rollout import run_episodes, summarize, wilson_interval  # noqa: E402
from hsa_train.config import bundled_path  # noqa: E402
from hsa_train.data.loader import iter_records  # noqa: E402
from hsa_train.data.spec import DatasetSpec  # noqa: E402
from hsa_train.types import SemanticTypes  # noqa: E402

AGENT_DEMO_RULES = {
    "semantic_type_rules": [
        {"pattern": "^Mission:", "type": "GLOBAL_CONDITION", "role": None},
        {"pattern": "^Event:", "type": "KEY_EVENT", "role": None},
    ],
    "default_semantic_type": "PROCESS_NOISE",
}


@pytest.mark.parametrize("size", [9, 15])
def test_the_text_env_is_minigrid_itself_and_its_expert_succeeds(size):
    """Stepping the adapter moves minigrid's agent exactly as stepping MemoryEnv does; the expert reaches the
    matching object on every seed, after exactly one key event: the start room's object, seen before the end."""
    for seed in range(12):
        text, raw = MemoryText(size), MemoryEnv(size=size)
        messages = text.reset(seed)
        raw.reset(seed=seed)
        assert messages[0]["content"].startswith("Mission: go to the matching object")
        start_object = text.env.grid.get(1, size // 2 - 1).type
        while True:
            action = text.expert_action()
            new, reward, terminated, truncated, info = text.step(action)
            _, raw_reward, raw_terminated, raw_truncated, _ = raw.step(ACTIONS[action])
            assert tuple(text.env.agent_pos) == tuple(raw.agent_pos) and text.env.agent_dir == raw.agent_dir
            assert (reward, terminated, truncated) == (raw_reward, raw_terminated, raw_truncated)
            messages += [{"role": "assistant", "content": action}, *new]
            if terminated or truncated:
                break
        assert info["success"] and reward > 0
        events = [m["content"] for m in messages if m["content"].startswith("Event:")]
        assert len(events) == 1 and f"green {start_object}" in events[0]
        headings = [m["content"].split("facing ")[1].split(",")[0] for m in messages if m["role"] == "user"]
        assert headings[-1] == ("east", "south", "west", "north")[raw.agent_dir]  # minigrid's own direction
    env = MemoryText(9)
    env.reset(0)
    assert env.step("jump")[4]["valid_action"] is False  # not an action: minigrid's no-op, one step
    assert env.env.step_count == 1
    with pytest.raises(ValueError, match="odd size"):
        MemoryText(8)


def test_expert_episodes_are_training_data_typed_by_the_demo_rules(tmp_path):
    episodes = run_episodes(lambda: MemoryText(9), [3, 1, 2], batch_size=2)
    assert [e.seed for e in episodes] == [3, 1, 2] and all(e.success for e in episodes)
    path = tmp_path / "episodes.jsonl"
    path.write_text("".join(json.dumps(e.record()) + "\n" for e in episodes))
    spec = DatasetSpec(path=str(path), **AGENT_DEMO_RULES)
    records = list(iter_records(spec, SemanticTypes(), ignore_keys=("id", "episode")))
    assert len(records) == 3
    types = {m["content"].split(":")[0]: m["semantic_type"] for r in records for m in r.messages if ":" in m["content"]}
    assert types == {"Mission": "GLOBAL_CONDITION", "Event": "KEY_EVENT", "Obs": "PROCESS_NOISE"}
    summary = summarize(episodes)
    assert summary["success_rate"] == 1.0 and summary["episodes"] == 3
    assert summary["steps_mean"] == sum(e.steps for e in episodes) / 3


def test_successful_episodes_only_load_as_training_data(tmp_path):
    """Rejection sampling: `successful_only` keeps the episodes whose outcome says success, counts the others, and
    refuses a record that is no episode; the cache keys of entries without it are those of before."""
    from hsa_train.data.loader import LoadReport
    from hsa_train.data.spec import resolve_datasets

    episodes = run_episodes(lambda: MemoryText(9), list(range(6)), expert_noise=0.6)
    wins = sum(e.success for e in episodes)
    assert 0 < wins < 6  # a noisy expert: some walk into the wrong object
    path = tmp_path / "episodes.jsonl"
    path.write_text("".join(json.dumps(e.record()) + "\n" for e in episodes))
    (spec,) = resolve_datasets([{"path": str(path), "successful_only": True}], None, SemanticTypes(), "data.datasets")
    report = LoadReport()
    kept = list(iter_records(spec, SemanticTypes(), report=report))
    assert len(kept) == wins and report.unsuccessful == 6 - wins
    assert f"{6 - wins} unsuccessful episodes left out" in report.summary()
    plain = tmp_path / "plain.jsonl"
    plain.write_text(
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    )
    (spec,) = resolve_datasets([{"path": str(plain), "successful_only": True}], None, SemanticTypes(), "data.datasets")
    with pytest.raises(ValueError, match="no episode.success"):
        list(iter_records(spec, SemanticTypes()))
    with pytest.raises(ValueError, match="successful_only"):
        resolve_datasets([{"path": str(plain), "successful_only": "yes"}], None, SemanticTypes(), "data.datasets")


def test_a_noisy_expert_recovers_from_random_steps_reproducibly():
    seeds = list(range(20))
    clean = run_episodes(lambda: MemoryText(9), seeds)
    noisy = run_episodes(lambda: MemoryText(9), seeds, expert_noise=0.3)
    assert [e.record() for e in noisy] == [
        e.record() for e in run_episodes(lambda: MemoryText(9), seeds, expert_noise=0.3)
    ]
    assert sum(e.steps for e in noisy) > sum(e.steps for e in clean)  # random steps, then the way back
    assert sum(e.success for e in noisy) >= 12  # it recovers, unless a random step walks into the wrong object
    with pytest.raises(ValueError, match="expert_noise"):
        run_episodes(lambda: MemoryText(9), seeds, expert_noise=1.0)


def test_the_bundled_expert_episodes_are_what_the_documented_command_writes():
    bundled = [json.loads(line) for line in open(bundled_path("agent_demo/memory9_expert.jsonl"))]
    assert len(bundled) == 600
    again = run_episodes(lambda: MemoryText(9), list(range(1000, 1010)), batch_size=8, expert_noise=0.2)
    assert [e.record() for e in again] == bundled[:10]


def test_episodes_of_one_seed_with_different_outcomes_become_preference_pairs(tmp_path):
    """A noisy expert sampled 4 times per seed: where a seed both won and lost, its first win against its first
    loss, parted at their first differing action; the pairs load as a ranking dataset."""
    from hsa_train.agent.rollout import preference_pairs
    from hsa_train.data.spec import resolve_datasets

    seeds = list(range(12))
    episodes = run_episodes(lambda: MemoryText(7), seeds, expert_noise=0.4, samples=4)
    assert [(e.seed, e.sample) for e in episodes] == [(s, k) for s in seeds for k in range(4)]
    # the first sample of a seed is the episode one sample per seed gives (the same noise draws)
    single = run_episodes(lambda: MemoryText(7), seeds, expert_noise=0.4)
    assert [e.messages for e in episodes[::4]] == [e.messages for e in single]
    pairs = preference_pairs(episodes)
    mixed = [s for s in seeds if len({e.success for e in episodes if e.seed == s}) == 2]
    assert len(pairs) == len(mixed) > 0
    for pair in pairs:
        group = [e for e in episodes if e.seed == pair["episode"]["seed"]]
        won = next(e for e in group if e.success)
        lost = next(e for e in group if not e.success)
        assert (pair["episode"]["chosen"]["sample"], pair["episode"]["rejected"]["sample"]) == (won.sample, lost.sample)
        k = len(pair["messages"])
        assert won.kept_messages() == pair["messages"] + pair["chosen"]
        assert lost.kept_messages() == pair["messages"] + pair["rejected"]
        assert pair["chosen"][0]["role"] == pair["rejected"][0]["role"] == "assistant"
        assert pair["chosen"][0] != pair["rejected"][0]  # they part at an action
        assert won.kept_messages()[:k] == lost.kept_messages()[:k]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (spec,) = resolve_datasets([{"path": str(path), "ranking": True}], None, SemanticTypes(), "data.datasets")
    records = list(iter_records(spec, SemanticTypes(), ignore_keys=("id", "episode")))
    assert len(records) == len(pairs) and all(r.is_pair for r in records)
    assert [r.prompt_len for r in records] == [len(p["messages"]) for p in pairs]
    with pytest.raises(ValueError, match="samples=0"):
        run_episodes(lambda: MemoryText(7), seeds, samples=0)


def test_the_rollout_cli_writes_pairs_that_stage_dpo_trains_on(tmp_path, capsys):
    from conftest import run_in_process

    from hsa_train.rollout import main

    out = tmp_path / "noisy"
    args = ["expert", "episodes=8", "samples=4", "expert_noise=0.4", "pairs=true", f"out={out}", "env.size=7"]
    done = subprocess.run(
        [sys.executable, "-m", "hsa_train.rollout", *args], capture_output=True, text=True, env=cli_env(), timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["episodes"] == 32 and summary["pairs"] == len((out / "pairs.jsonl").read_text().splitlines()) > 0
    assert f"; {summary['pairs']} preference pairs -> " in done.stdout
    metrics = run_in_process(
        tmp_path / "dpo", "stage=dpo", f"data.datasets=[{{path:{out / 'pairs.jsonl'},ranking:true}}]",
        "data.ignore_keys=[episode]", "data.train_files=[]", "data.eval_ratio=0", "train.max_steps=2",
        "train.micro_batch_size=2", "logging.progress=none", "model.arch.hidden_size=32",
        "model.arch.intermediate_size=64", "model.arch.num_hidden_layers=2",
    )  # fmt: skip
    assert metrics["samples_train"] == summary["pairs"] and len(metrics["train_stats"]["rewards/accuracy"]) == 2
    for bad, says in [
        (["samples=1"], "pairs=true pairs episodes of one seed: set samples >= 2"),
        (["samples=2", "expert_noise=0"], "set expert_noise > 0"),
    ]:
        assert main(["expert", f"out={tmp_path / 'bad'}", "pairs=true", *bad]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1


def test_wilson_interval_matches_the_textbook_values():
    low, high = wilson_interval(8, 10)  # Newcombe (1998), table I: 0.4902 - 0.9433
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert wilson_interval(0, 10)[0] == 0.0 and round(wilson_interval(0, 10)[1], 4) == 0.2775


def test_model_episodes_are_batched_sessions_and_do_not_depend_on_the_batch(tmp_path):
    from test_agent import write_folder

    from hsa_train.data.rules import SavedRules

    folder = write_folder(tmp_path / "model")
    SavedRules({"memory9": AGENT_DEMO_RULES | {"semantic_type_by_role": {}}}, "memory9").save(folder)
    agent = Agent(load_trained(folder))
    seeds = [5, 6, 7]
    one = run_episodes(lambda: MemoryText(7), seeds, agent, batch_size=1, max_turns=4)
    three = run_episodes(lambda: MemoryText(7), seeds, agent, batch_size=3, max_turns=4)
    assert [e.record() for e in one] == [e.record() for e in three]
    for episode in three:
        assert episode.steps == 4 and episode.tokens > 0 and episode.truncated
        roles = [m["role"] for m in episode.messages]
        assert roles[:2] == ["system", "user"] and roles.count("assistant") == 4
        assert episode.messages[0]["semantic_type"] == "GLOBAL_CONDITION"  # the saved rules typed it
        assert all(m["semantic_type"] == "PROCESS_NOISE" for m in episode.messages if m["content"].startswith("Obs:"))


def test_a_model_samples_a_seed_several_ways_reproducibly(tmp_path):
    from test_agent import write_folder

    from hsa_train.agent.decoding import DecodeOptions

    agent = Agent(load_trained(write_folder(tmp_path / "model")))
    options = DecodeOptions(max_new_tokens=4, temperature=1.0, seed=3)
    runs = [
        run_episodes(lambda: MemoryText(7), [5, 6], agent, batch_size=b, options=options, max_turns=3, samples=3)
        for b in (1, 4)
    ]
    assert [e.record() for e in runs[0]] == [e.record() for e in runs[1]]  # whatever shares the batch
    replies = [[m["content"] for m in e.messages if m["role"] == "assistant"] for e in runs[0]]
    assert len({tuple(r) for r in replies[:3]}) > 1  # the samples of seed 5 act differently
    assert [e.record()["episode"]["sample"] for e in runs[0]] == [0, 1, 2, 0, 1, 2]


def test_the_rollout_cli(tmp_path, capsys):
    from hsa_train.rollout import main

    out = tmp_path / "expert"
    done = subprocess.run(
        [sys.executable, "-m", "hsa_train.rollout", "expert", "episodes=4", f"out={out}", "env.size=11"],
        capture_output=True, text=True, env=cli_env(), timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "minigrid-memory-11: success 100.0% (95% CI 51.0%-100.0%) over 4 episodes" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["episodes"] == 4 and summary["seeds"] == [0, 3]
    assert len((out / "episodes.jsonl").read_text().splitlines()) == 4
    for bad, says in [(["env.size=8"], "odd size"), (["episodes=0"], "episodes=0"), (["colour=1"], "colour")]:
        assert main(["expert", f"out={tmp_path / 'bad'}", *bad]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1


def test_eval_rollout_puts_success_rates_in_metrics(tmp_path):
    from test_training import tiny_run

    from hsa_train.config import ConfigError
    from hsa_train.sweep import metric_value
    from hsa_train.training.loop import train

    env = "{_target_:hsa_train.agent.envs.minigrid.MemoryText,size:7}"
    rollout = ["eval.rollout.episodes=2", f"eval.rollout.env={env}", "eval.rollout.max_turns=3"]
    variants = "eval.rollout.variants={short:{size:7},long:{size:9}}"
    cfg, resolved = tiny_run(tmp_path, "train.max_steps=2", "train.save_model=true", *rollout, variants)
    metrics = train(cfg, resolved, tmp_path / "run")
    assert set(metrics["rollout"]) == {"short", "long"}
    for summary in metrics["rollout"].values():
        assert summary["episodes"] == 2 and summary["steps_mean"] <= 3 and 0 <= summary["success_rate"] <= 1
    assert metric_value(metrics, "rollout.long.success_rate") == metrics["rollout"]["long"]["success_rate"]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["rollout"] == metrics["rollout"]
    with pytest.raises(ConfigError, match="eval.rollout.env"):
        tiny_run(tmp_path, "eval.rollout.episodes=2")
    with pytest.raises(ConfigError, match="train.save_model"):
        tiny_run(tmp_path, *rollout)  # tiny_run exports nothing
