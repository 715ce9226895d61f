"""minigrid's Memory task as text (the `[envs]` extra): the environment's own dynamics, reward and termination;
only the agent's 7x7 view is put in words, and the action text parsed.

The agent starts in a small room where one object (a key or a ball) lies, walks a hallway, and at its end must go
to the matching one of two objects: it has to remember what it saw at the start. `size` (odd, >= 7) sets the
hallway: the key event lies `size - 3` cells back from the decision. The messages are untyped; their words say
what they are, and a run's typing rules (conf/data/agent_demo.yaml) type them as training data is typed:

- `Mission: ...` (system): the task, GLOBAL_CONDITION;
- `Event: you see ...`: the first observation that shows the start room's object, KEY_EVENT;
- `Obs: ...`: every other observation (the hallway steps), PROCESS_NOISE.

An observation reads e.g. `Obs: facing east, ahead 2, left wall, right wall; green ball 2 ahead 2 left`: the
heading is minigrid's own `direction` field, without which a view in the hallway reads the same both ways.
Actions: `left`, `right`, `forward` (the reply's first word); anything else is minigrid's no-op `done`, and still
costs a step. The expert (`expert_action`) plans over the grid: back to the start room until the object is in
view, then the shortest path to the matching object.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from hsa_train.agent.envs.base import Messages, TextEnv

ACTIONS = {"left": 0, "right": 1, "forward": 2}
NO_OP = 6  # minigrid's `done`: unused by Memory, a wasted step
DIRECTIONS = [(1, 0), (0, 1), (-1, 0), (0, -1)]  # minigrid's agent_dir: east, south, west, north
HEADINGS = ("east", "south", "west", "north")


def _minigrid():
    try:
        from minigrid.core.constants import IDX_TO_COLOR, IDX_TO_OBJECT
        from minigrid.envs.memory import MemoryEnv
    except ImportError:
        raise ImportError(
            "the minigrid environments need the minigrid package: pip install 'hsa_train[envs]'"
        ) from None
    return MemoryEnv, IDX_TO_OBJECT, IDX_TO_COLOR


class MemoryText(TextEnv):
    """`MiniGrid-Memory` of `size` x `size` as a text environment (see the module docstring)."""

    actions = tuple(ACTIONS)

    def __init__(self, size: int = 9, max_steps: int | None = None):
        if size < 7 or size % 2 == 0:
            raise ValueError(f"env.size={size}: minigrid's Memory needs an odd size >= 7")
        memory_env, self._objects, self._colors = _minigrid()
        self.size = size
        self.name = f"minigrid-memory-{size}"
        self.env = memory_env(size=size, max_steps=max_steps)
        self.seen = False

    # -- the protocol --------------------------------------------------------------------------------------------
    def reset(self, seed: int) -> Messages:
        obs, _ = self.env.reset(seed=seed)
        self.seen = False
        mission = f"Mission: {self.env.mission}. Reply with one action: left, right or forward."
        return [{"role": "system", "content": mission}, {"role": "user", "content": self._describe(obs)}]

    def step(self, action: str) -> tuple[Messages, float, bool, bool, dict[str, Any]]:
        words = action.strip().lower().split()
        code = ACTIONS.get(words[0].strip(".,!") if words else "", NO_OP)
        obs, reward, terminated, truncated, info = self.env.step(code)
        info = {**info, "success": bool(terminated and reward > 0), "valid_action": code != NO_OP}
        return [{"role": "user", "content": self._describe(obs)}], float(reward), terminated, truncated, info

    def expert_action(self) -> str:
        env = self.env
        mid = self.size // 2
        if self.seen:
            goal = {tuple(env.success_pos)}
        else:  # the start room's object is at (1, mid - 1): stand beside it, facing west, and it is in view
            goal = {(2, mid)}
        path = self._plan(tuple(env.agent_pos), env.agent_dir, goal, need_dir=None if self.seen else 2)
        return path[0] if path else "left"

    # -- words -----------------------------------------------------------------------------------------------------
    def _describe(self, obs: dict) -> str:
        """The view in words; the first that shows the start room's object is the key event."""
        image = obs["image"]  # (7, 7, 3): [lateral x (3 = the agent's column), depth y (6 = the agent's row)]
        kind = lambda x, y: self._objects[int(image[x, y, 0])]  # noqa: E731
        ahead = 0
        while ahead < 6 and kind(3, 5 - ahead) in ("empty", "floor"):
            ahead += 1
        sides = [f"{side} {'wall' if kind(x, 6) == 'wall' else 'open'}" for side, x in (("left", 2), ("right", 4))]
        things = []
        for y in range(6, -1, -1):
            for x in range(7):
                name = kind(x, y)
                if name in ("key", "ball"):
                    lateral = x - 3
                    where = f"{6 - y} ahead" + (
                        f" {abs(lateral)} {'left' if lateral < 0 else 'right'}" if lateral else ""
                    )
                    things.append(f"{self._colors[int(image[x, y, 1])]} {name} {where}")
        text = f"facing {HEADINGS[int(obs['direction'])]}, ahead {ahead}, {', '.join(sides)}"
        text += f"; {'; '.join(things)}" if things else ""
        first_sight = not self.seen and self._sees_start_object()
        self.seen = self.seen or first_sight
        return f"Event: you see {text}" if first_sight else f"Obs: {text}"

    def _sees_start_object(self) -> bool:
        mid = self.size // 2
        return bool(self.env.agent_sees(1, mid - 1))

    # -- the expert's planner ------------------------------------------------------------------------------------
    def _plan(self, start: tuple[int, int], direction: int, goals: set, need_dir: int | None) -> list[str]:
        """The shortest action sequence from (start, direction) to a goal cell (facing `need_dir` if given)."""
        grid = self.env.grid

        def free(x: int, y: int) -> bool:
            cell = grid.get(x, y)
            return cell is None or cell.can_overlap()

        first = (start, direction)
        came: dict = {first: None}
        todo = deque([first])
        while todo:
            state = todo.popleft()
            (x, y), d = state
            if (x, y) in goals and (need_dir is None or d == need_dir):
                actions = []
                while came[state] is not None:
                    state, action = came[state]
                    actions.append(action)
                return actions[::-1]
            dx, dy = DIRECTIONS[d]
            moves = [("left", ((x, y), (d - 1) % 4)), ("right", ((x, y), (d + 1) % 4))]
            if free(x + dx, y + dy):
                moves.append(("forward", ((x + dx, y + dy), d)))
            for action, nxt in moves:
                if nxt not in came:
                    came[nxt] = (state, action)
                    todo.append(nxt)
        return []

    def close(self) -> None:
        self.env.close()
