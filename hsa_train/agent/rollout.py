"""Episodes in a text environment: batched agent sessions (or the environment's expert) acting turn by turn.

Each episode is written as a record in the training data's `messages` format, every message with the type it
was given (so the record trains as it was seen), and its outcome under `episode` (seed, return, success, steps,
tokens): `data.ignore_keys` lists `episode`, so rollouts load as training data as they are. The summary gives the
success rate with its 95% interval (Wilson's), the mean return, steps and tokens per episode.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from hsa_train.agent.decoding import DecodeOptions
from hsa_train.agent.envs.base import TextEnv
from hsa_train.agent.session import Agent, Session


@dataclass
class Episode:
    env: str
    seed: int
    messages: list[dict[str, Any]] = field(default_factory=list)
    reward: float = 0.0  # the return: the sum of the environment's rewards
    success: bool = False
    steps: int = 0
    tokens: int = 0  # the conversation's length in tokens at its last turn (0 for the expert)
    truncated: bool = False  # ended by the environment's step limit (or the rollout's max_turns)
    cuts: int = 0  # times the session was cut to fit the model's limit
    masked: int = 0  # noise turns the observation window (data.noise_window) left out of the session
    invalid_actions: int = 0
    sample: int | None = None  # which of a seed's episodes (run_episodes' samples > 1), else None

    def record(self) -> dict[str, Any]:
        """The episode as training data: messages (role, content, semantic_type) and its outcome."""
        return {"messages": self.kept_messages(), "episode": self.outcome()}

    def kept_messages(self) -> list[dict[str, Any]]:
        keep = ("role", "content", "semantic_type", "tool_calls")
        return [{k: m[k] for k in keep if k in m} for m in self.messages]

    def outcome(self) -> dict[str, Any]:
        outcome = {k: v for k, v in asdict(self).items() if k != "messages"}
        if not self.masked:  # only a model with an observation window masks: records of others stay as they were
            del outcome["masked"]
        if self.sample is None:  # one episode per seed: records stay as they were
            del outcome["sample"]
        return outcome


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a success rate (sound at 0 and 1, unlike the normal approximation)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(episodes: Sequence[Episode]) -> dict[str, Any]:
    n = len(episodes)
    wins = sum(e.success for e in episodes)
    low, high = wilson_interval(wins, n)
    mean = lambda values: sum(values) / n if n else 0.0  # noqa: E731
    return {
        "episodes": n,
        "success_rate": wins / n if n else 0.0,
        "success_ci95": [low, high],
        "return_mean": mean([e.reward for e in episodes]),
        "steps_mean": mean([e.steps for e in episodes]),
        "tokens_mean": mean([e.tokens for e in episodes]),
        "truncated": sum(e.truncated for e in episodes),
        "invalid_actions": sum(e.invalid_actions for e in episodes),
        "cuts": sum(e.cuts for e in episodes),
        "masked_turns": sum(e.masked for e in episodes),
    }


def env_maker(env_cfg: Any, check: bool = True) -> Callable[[], TextEnv]:
    """A function making the environment a config names (Hydra `_target_` and its fields); `check` makes one now,
    so that a bad config fails before any model loads."""
    from hydra.utils import instantiate

    def make() -> TextEnv:
        env = instantiate(env_cfg)
        if not isinstance(env, TextEnv):
            raise ValueError(f"env._target_={env_cfg['_target_']} is not a TextEnv (reset(seed), step(action))")
        return env

    if check:
        make().close()
    return make


def preference_pairs(episodes: Sequence[Episode]) -> list[dict[str, Any]]:
    """Episodes of one seed with different outcomes as preference pairs, in the pair format stage=dpo trains on:
    per seed, its first successful episode (in sample order) against its first failed one. The prompt is what
    both saw before they parted (the environment is seeded: the same actions give the same observations), each
    side the rest of its episode from its first differing action on: an agent trained on its own successes
    against its own failures. `episode` keeps the seed and both outcomes."""
    by_seed: dict[int, list[Episode]] = {}
    for episode in episodes:
        by_seed.setdefault(episode.seed, []).append(episode)
    pairs = []
    for seed, group in by_seed.items():
        won = next((e for e in group if e.success), None)
        lost = next((e for e in group if not e.success), None)
        if won is None or lost is None:
            continue
        a, b = won.kept_messages(), lost.kept_messages()
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        while k > 0 and not all(k < len(side) and side[k]["role"] == "assistant" for side in (a, b)):
            k -= 1  # both sides start at an action
        if k == 0:
            continue
        outcome = {"seed": seed, "chosen": won.outcome(), "rejected": lost.outcome()}
        pairs.append({"messages": a[:k], "chosen": a[k:], "rejected": b[k:], "episode": outcome})
    return pairs


def summary_line(summary: dict[str, Any]) -> str:
    """A summary on one line: success with its interval, return, steps and tokens per episode."""
    low, high = summary["success_ci95"]
    return (
        f"success {summary['success_rate']:.1%} (95% CI {low:.1%}-{high:.1%}) over {summary['episodes']} episodes, "
        f"return {summary['return_mean']:.3f}, {summary['steps_mean']:.1f} steps and {summary['tokens_mean']:.0f} "
        "tokens per episode"
    )


class _Slot:
    """One environment and the episode running in it."""

    def __init__(self, env: TextEnv):
        self.env = env
        self.episode: Episode | None = None
        self.session: Session | None = None


def run_episodes(
    make_env: Callable[[], TextEnv],
    seeds: Sequence[int],
    agent: Agent | None = None,
    batch_size: int = 8,
    options: DecodeOptions | None = None,
    max_turns: int | None = None,
    typing: str | None = None,
    on_episode: Callable[[Episode], None] | None = None,
    expert_noise: float = 0.0,
    samples: int = 1,
) -> list[Episode]:
    """`samples` episodes per seed (in seed order, then sample order, in the result), `batch_size` at a time,
    acted by `agent` (batched sessions) or, with no agent, by each environment's expert; `expert_noise` of the
    expert's steps take a random one of the environment's `actions` instead (seeded by episode, sample and step),
    so that its episodes also show how to recover from a wrong step, which an agent trained on them will take.
    The samples of a seed differ by their sampling (an agent's temperature, the expert's noise): the same seed
    with different outcomes (preference_pairs)."""
    if not 0.0 <= expert_noise < 1.0:
        raise ValueError(f"expert_noise={expert_noise}: give a share in [0, 1)")
    if samples < 1:
        raise ValueError(f"samples={samples}: give an integer >= 1")
    options = options or DecodeOptions(max_new_tokens=16, temperature=0.0)
    slots = [_Slot(make_env()) for _ in range(max(1, min(batch_size, len(seeds))))]
    jobs = [(seed, k if samples > 1 else None) for seed in seeds for k in range(samples)]
    todo = jobs[::-1]
    done: dict[tuple[int, int | None], Episode] = {}
    try:
        while todo or any(s.episode for s in slots):
            for slot in slots:
                if slot.episode is None and todo:
                    _start(slot, *todo.pop(), agent, typing)
            active = [s for s in slots if s.episode is not None]
            if agent is not None:
                per_turn = [_turn_options(options, s.episode) for s in active]
                replies = agent.respond([s.session for s in active], per_turn)
                actions = [r.message["content"] for r in replies]
                for slot, reply in zip(active, replies):
                    slot.episode.messages.append(reply.message)
                    slot.episode.tokens = reply.prompt_tokens + reply.completion_tokens
            else:
                actions = [_expert(s, expert_noise) for s in active]
            for slot, action in zip(active, actions):
                if _act(slot, action, agent, max_turns):
                    finished = slot.episode
                    done[finished.seed, finished.sample] = finished
                    slot.episode = slot.session = None
                    if on_episode is not None:
                        on_episode(finished)
    finally:
        for slot in slots:
            slot.env.close()
    return [done[job] for job in jobs]


def _expert(slot: _Slot, noise: float) -> str:
    if noise:
        episode = slot.episode
        draw = random.Random(episode.seed * 10_007 + episode.steps + (episode.sample or 0) * 1_000_033)
        if draw.random() < noise:
            return draw.choice(list(slot.env.actions))
    return slot.env.expert_action()


def _turn_options(options: DecodeOptions, episode: Episode) -> DecodeOptions:
    """Sampling seeded by the episode (its seed and sample) and the turn: an episode acts the same whichever others
    share its batch."""
    if options.greedy:
        return options
    base = options.seed or 0
    turn = base * 1_000_003 + episode.seed * 10_007 + episode.steps + (episode.sample or 0) * 1_000_033
    return replace(options, seed=turn % 2**63)


def _start(slot: _Slot, seed: int, sample: int | None, agent: Agent | None, typing: str | None) -> None:
    messages = slot.env.reset(seed)
    slot.episode = Episode(env=slot.env.name, seed=seed, sample=sample)
    if agent is not None:
        slot.session = agent.session(messages, typing=typing)
        slot.episode.messages = list(slot.session.messages)  # the whole episode, whatever cuts the session makes
    else:
        slot.episode.messages = [dict(m) for m in messages]


def _act(slot: _Slot, action: str, agent: Agent | None, max_turns: int | None) -> bool:
    """Steps the environment with `action`; True when the episode is over."""
    episode = slot.episode
    if agent is None:
        episode.messages.append({"role": "assistant", "content": action})
    new, reward, terminated, truncated, info = slot.env.step(action)
    episode.steps += 1
    episode.reward += reward
    episode.invalid_actions += not info.get("valid_action", True)
    over = terminated or truncated or (max_turns is not None and episode.steps >= max_turns)
    if agent is not None:
        episode.messages.extend(slot.session.add(*new))  # the last observation too: how the episode ended
        episode.cuts, episode.masked = slot.session.cuts, slot.session.masked
    else:
        episode.messages.extend(dict(m) for m in new)
    if over:
        episode.success = bool(info.get("success", terminated and reward > 0))
        episode.truncated = bool(truncated or not terminated)
    return over
