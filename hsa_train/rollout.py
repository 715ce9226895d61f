"""Roll a trained agent out in a text environment: N seeded episodes, batched, with a summary.

    python -m hsa_train.rollout outputs/<run>/model env=minigrid_memory env.size=15 episodes=50
    python -m hsa_train.rollout expert env=minigrid_memory episodes=400 out=data/agent_demo   # expert trajectories
    python -m hsa_train.rollout outputs/<run>/model episodes=200 samples=4 temperature=1.0 pairs=true
                                                # the agent's own successes against its own failures, for stage=dpo

Writes `<out>/episodes.jsonl` (one record per episode in the messages format, each message with its type, the
outcome under `episode`: loadable as training data as it is) and `<out>/summary.json` (success rate with its 95%
interval, return, steps and tokens per episode); with `pairs=true` also `<out>/pairs.jsonl` (rollout.preference_pairs:
episodes of one seed with different outcomes as preference pairs). Keys: conf/rollout.yaml; environments: conf/env/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hsa_train.agent.decoding import DecodeOptions
from hsa_train.agent.folder import load_trained
from hsa_train.agent.rollout import env_maker, preference_pairs, run_episodes, summarize, summary_line
from hsa_train.agent.session import Agent
from hsa_train.types import one_line

USAGE = "usage: python -m hsa_train.rollout MODEL_DIR|expert [key=value ...]  (keys: conf/rollout.yaml)"


def compose(overrides: list[str]) -> Any:
    """The rollout config with `overrides` (an unknown key or a bad value fails here, before any model loads)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="hsa_train.conf", version_base="1.3"):
        cfg = hydra_compose(config_name="rollout", overrides=overrides)
    checks = [
        (isinstance(cfg.episodes, int) and cfg.episodes >= 1, f"episodes={cfg.episodes}: give an integer >= 1"),
        (isinstance(cfg.batch_size, int) and cfg.batch_size >= 1, f"batch_size={cfg.batch_size}: give >= 1"),
        (cfg.max_turns is None or cfg.max_turns >= 1, f"max_turns={cfg.max_turns}: give >= 1 or null"),
        (0 <= cfg.expert_noise < 1, f"expert_noise={cfg.expert_noise}: give a share in [0, 1)"),
        (isinstance(cfg.samples, int) and cfg.samples >= 1, f"samples={cfg.samples}: give an integer >= 1"),
        (not cfg.pairs or cfg.samples >= 2, "pairs=true pairs episodes of one seed: set samples >= 2"),
    ]
    for ok, problem in checks:
        if not ok:
            raise ValueError(problem)
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or "=" in argv[0]:
        print(f"{USAGE}\n\n{__doc__}", file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    source, overrides = argv[0], argv[1:]
    try:
        cfg = compose(overrides)
        make_env = env_maker(cfg.env)
        options = DecodeOptions(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed)
        agent = None
        if cfg.pairs and cfg.samples > 1:  # samples that cannot differ give no pair: say so before any episode
            varied = cfg.expert_noise > 0 if source == "expert" else cfg.temperature > 0
            if not varied:
                fix = "expert_noise > 0" if source == "expert" else "temperature > 0 (greedy decoding repeats itself)"
                raise ValueError(f"pairs=true: the samples of a seed would all be the same episode; set {fix}")
        if source != "expert":
            agent = Agent(load_trained(source, cfg.device, cfg.dtype, cfg.backend, merge=True))
        name = make_env().name
        default_out = Path(source).resolve().parent / "rollouts" / name if agent else Path("rollouts") / name
        out = Path(cfg.out) if cfg.out else default_out
        out.mkdir(parents=True, exist_ok=True)
        episodes = _run(cfg, make_env, agent, options, out)
    except Exception as exc:  # noqa: BLE001  (one line for the user; hydra's own errors included)
        print(f"hsa_train.rollout: error: {one_line(exc)}", file=sys.stderr)
        return 2
    summary = {"env": name, "model": source, **summarize(episodes), "seeds": [cfg.seed, cfg.seed + cfg.episodes - 1]}
    if cfg.pairs:
        pairs = preference_pairs(episodes)
        (out / "pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
        summary["pairs"] = len(pairs)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    pairs_note = f"; {summary['pairs']} preference pairs" if cfg.pairs else ""
    print(f"{name}: {summary_line(summary)}{pairs_note} -> {out}")
    return 0


def _run(cfg: Any, make_env, agent, options: DecodeOptions, out: Path):
    """The episodes, written in seed order (the same file for the same config)."""
    from rich.progress import Progress

    seeds = list(range(cfg.seed, cfg.seed + cfg.episodes))
    with Progress(transient=True, disable=not cfg.progress) as progress:
        task = progress.add_task("episodes", total=len(seeds) * cfg.samples)
        episodes = run_episodes(
            make_env, seeds, agent, cfg.batch_size, options, cfg.max_turns, cfg.typing,
            on_episode=lambda _: progress.advance(task), expert_noise=cfg.expert_noise, samples=cfg.samples,
        )  # fmt: skip
    with (out / "episodes.jsonl").open("w", encoding="utf-8") as f:
        for episode in episodes:
            f.write(json.dumps(episode.record(), ensure_ascii=False) + "\n")
    return episodes


if __name__ == "__main__":
    sys.exit(main())
