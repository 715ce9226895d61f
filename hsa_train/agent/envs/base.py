"""The text-environment protocol: what a user implements to roll an agent out in their own environment.

    reset(seed) -> messages                                    the task and the first observation
    step(action_text) -> messages, reward, terminated, truncated, info

Messages are in the training data's format (role, content, optionally `semantic_type`); an untyped one is typed
by the rules the model was trained with, as at training time. `info["success"]` (when the environment knows)
says whether the episode reached its goal. An environment with an expert (`expert_action`) can write training
trajectories. Name yours in a config by `_target_: my_pkg.MyEnv` (Hydra instantiates it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

Messages = list[dict[str, Any]]


class TextEnv(ABC):
    """An environment that speaks text: observations as messages, actions as the agent's reply text."""

    name: str = "env"
    actions: tuple[str, ...] = ()  # the action words, where the environment has a fixed set (expert noise draws them)

    @abstractmethod
    def reset(self, seed: int) -> Messages:
        """Starts an episode: the messages the agent sees first (the task, the first observation)."""

    @abstractmethod
    def step(self, action: str) -> tuple[Messages, float, bool, bool, dict[str, Any]]:
        """Acts: (new messages, reward, terminated, truncated, info); info["success"] when known."""

    def expert_action(self) -> str:
        """The expert's next action for the current state (environments with an expert only)."""
        raise NotImplementedError(f"{type(self).__name__} has no expert")

    def close(self) -> None:  # noqa: B027  (optional: most text environments hold nothing)
        """Releases what the environment holds."""
