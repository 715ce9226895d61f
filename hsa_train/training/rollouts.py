"""Closed-loop evaluation after training (`eval.rollout`): the exported model acts in its environment, each named
variant (e.g. a longer hallway) on its own seeds, and its success rate goes into metrics.json, where a sweep can
take it as its objective: a λ sweep then optimises what the agent achieves, not the eval loss."""

from __future__ import annotations

from typing import Any

from hsa_train.agent.decoding import DecodeOptions
from hsa_train.agent.folder import load_trained
from hsa_train.agent.rollout import env_maker, run_episodes, summarize, summary_line
from hsa_train.agent.session import Agent


def closed_loop(model_dir: str, cfg: Any, device: str, log=print) -> dict[str, dict[str, Any]]:
    """{variant: summary} of `cfg.episodes` greedy episodes per variant of `cfg.env` (conf/eval/default.yaml)."""
    agent = Agent(load_trained(model_dir, device=device))
    variants = dict(cfg.variants or {}) or {"default": {}}
    results = {}
    for name, changes in variants.items():
        make = env_maker({**dict(cfg.env), **dict(changes)})
        seeds = list(range(cfg.seed, cfg.seed + cfg.episodes))
        options = DecodeOptions(max_new_tokens=cfg.max_new_tokens)
        episodes = run_episodes(make, seeds, agent, cfg.batch_size, options, cfg.max_turns)
        results[name] = summarize(episodes)
        log(f"rollout {name}: {summary_line(results[name])}")
    return results
