"""Small torch envs for testing the env adapters of `bridge.envs` (nothing external needed).

Why: the adapters must be shown to read keys from specs, keep final
observations, keep terminated and truncated apart and tokenise instructions,
with envs whose every step is predictable. Two envs:

`TargetReachTD` (seed contract, torch + tensordict + gymnasium spaces only):
    N auto-resetting copies of a 2-D "reach the <left|right|top|bottom> target"
    task. Observations are a TensorDict [N] with nested keys and a language
    string per copy; by default

        rgb              uint8 [S, S, 3]   the agent as a white pixel
        robot/pos        float32 [2]       agent position in [-1, 1]^2
        robot/steps      int64 [1]         steps taken in this episode
        language         str               "reach the left target", ...

    Every key can be renamed or nested (`keys=`), which is how the tests show
    that nothing is assumed about names. Actions Box(-1, 1, (2,)) move the agent
    by 0.25 x action. Reward: distance progress, +1 on reaching the target,
    which terminates; `truncated` at `max_episode_steps` steps. A finished copy
    is reset in the same step; `info["final_obs"]` (a TensorDict [N]) holds the
    observation that ended its episode, `info["success"]` the terminations.
    `specs="gym"` declares gymnasium spaces (Text for the string); "none"
    declares only the action space (the adapter then probes `reset()`).
    `reuse_storage=True` writes every step into the same tensors (like a
    simulator's preallocated buffers) to exercise the adapter's guard.

`make_toy_torchrl_env` (a TorchRL `EnvBase`, needs torchrl): one copy
    (batch_size []) of a 1-D walk to +1 with nested, renamable keys for the
    observation, action, reward and done entries, a Bounded or Categorical /
    OneHot action, an optional NonTensor instruction, termination on reaching
    the goal and truncation after `max_steps`. obs "clock" counts the steps of the
    episode, so a final observation is recognisable.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from tensordict import NonTensorData, NonTensorStack, TensorDict, TensorDictBase

from jaxrl_vla.tokenizer import WordTokenizer

TARGET_NAMES = ("left", "right", "top", "bottom")
TARGETS = torch.tensor([[-0.7, 0.0], [0.7, 0.0], [0.0, -0.7], [0.0, 0.7]])
VOCAB = ("reach", "the", "target", *TARGET_NAMES)
DEFAULT_KEYS = {"rgb": ("rgb",), "pos": ("robot", "pos"), "steps": ("robot", "steps"), "language": ("language",)}
REACH_RADIUS = 0.2
STEP_SIZE = 0.25


def instruction(target: int) -> str:
    return f"reach the {TARGET_NAMES[target]} target"


def _nested_dict(entries: Mapping[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for key, value in entries.items():
        node = out
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    return out


class TargetReachTD:
    """The seed-contract test env (see the module docstring)."""

    def __init__(
        self,
        num_envs: int,
        max_episode_steps: int = 20,
        image_size: int = 8,
        specs: str = "gym",
        keys: Mapping[str, Any] | None = None,
        reuse_storage: bool = False,
    ):
        if specs not in ("gym", "none"):
            raise ValueError(f"specs must be 'gym' or 'none', got {specs!r}")
        self.num_envs = int(num_envs)
        self.max_episode_steps = int(max_episode_steps)
        self.image_size = int(image_size)
        self.keys = {name: tuple(k) if isinstance(k, (list, tuple)) else (k,) for name, k in {**DEFAULT_KEYS, **(keys or {})}.items()}
        self.reuse_storage = reuse_storage
        self.tokenizer = WordTokenizer(VOCAB, max_length=6)
        self.generator = torch.Generator().manual_seed(0)
        n = self.num_envs
        self.pos = torch.zeros(n, 2)
        self.target = torch.zeros(n, dtype=torch.int64)
        self.steps = torch.zeros(n, dtype=torch.int64)
        self.closed = False
        self._buffers: TensorDictBase | None = None
        import gymnasium as gym

        self.single_action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        if specs == "gym":
            self.single_observation_space = self._gym_space(gym)

    def _gym_space(self, gym: Any) -> Any:
        s = self.image_size
        leaves = {
            self.keys["rgb"]: gym.spaces.Box(0, 255, (s, s, 3), np.uint8),
            self.keys["pos"]: gym.spaces.Box(-1.0, 1.0, (2,), np.float32),
            self.keys["steps"]: gym.spaces.Box(0, self.max_episode_steps, (1,), np.int64),
            self.keys["language"]: gym.spaces.Text(64),
        }

        def to_space(tree: dict) -> Any:
            return gym.spaces.Dict({k: to_space(v) if isinstance(v, dict) else v for k, v in tree.items()})

        return to_space(_nested_dict(leaves))

    # ------------------------------------------------------------------ contract

    def reset(self, seed: int | None = None) -> tuple[TensorDictBase, dict]:
        if seed is not None:
            self.generator.manual_seed(int(seed))
        self._reset_where(torch.ones(self.num_envs, dtype=torch.bool))
        return self._obs(), {}

    def step(self, action: torch.Tensor) -> tuple[TensorDictBase, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        if not isinstance(action, torch.Tensor) or tuple(action.shape) != (self.num_envs, 2):
            raise ValueError(f"action must be a tensor [{self.num_envs}, 2], got {getattr(action, 'shape', action)!r}")
        before = self._distance()
        self.pos = (self.pos + STEP_SIZE * action.float().clamp(-1, 1)).clamp(-1, 1)
        self.steps += 1
        after = self._distance()
        terminated = after < REACH_RADIUS
        truncated = self.steps >= self.max_episode_steps
        reward = (before - after) + terminated.float()
        final_obs = self._obs().clone()
        self._reset_where(terminated | truncated)
        info = {"final_obs": final_obs, "success": terminated.clone()}
        return self._obs(), reward, terminated, truncated, info

    def close(self) -> None:
        self.closed = True

    # ------------------------------------------------------------------ internals

    def _distance(self) -> torch.Tensor:
        return (self.pos - TARGETS[self.target]).norm(dim=-1)

    def _reset_where(self, mask: torch.Tensor) -> None:
        count = int(mask.sum())
        if count == 0:
            return
        self.pos[mask] = (torch.rand(count, 2, generator=self.generator) - 0.5) * 0.2
        self.target[mask] = torch.randint(0, len(TARGET_NAMES), (count,), generator=self.generator)
        self.steps[mask] = 0

    def _image(self) -> torch.Tensor:
        s = self.image_size
        rgb = torch.zeros(self.num_envs, s, s, 3, dtype=torch.uint8)
        cells = ((self.pos + 1) / 2 * (s - 1)).round().long().clamp(0, s - 1)
        rgb[torch.arange(self.num_envs), cells[:, 1], cells[:, 0]] = 255
        return rgb

    def _obs(self) -> TensorDictBase:
        entries = {
            self.keys["rgb"]: self._image(),
            self.keys["pos"]: self.pos.clone(),
            self.keys["steps"]: self.steps.clone()[:, None],
        }
        language = NonTensorStack.from_list([instruction(int(t)) for t in self.target])
        td = TensorDict(_nested_dict(entries), batch_size=[self.num_envs])
        td.set(self.keys["language"], language)
        if not self.reuse_storage:
            return td
        if self._buffers is None:
            self._buffers = td
        else:
            for key in (self.keys["rgb"], self.keys["pos"], self.keys["steps"]):
                self._buffers.get(key).copy_(td.get(key))
            self._buffers.set(self.keys["language"], language)
        return self._buffers


def make_target_reach(
    num_envs: int,
    max_episode_steps: int = 20,
    image_size: int = 8,
    specs: str = "gym",
    keys: Mapping[str, Any] | None = None,
    reuse_storage: bool = False,
) -> TargetReachTD:
    """Factory for `env.type: "tensordict"`, `env.name: "bridge.testing_envs:make_target_reach"`."""
    return TargetReachTD(num_envs, max_episode_steps, image_size, specs, keys, reuse_storage)


# --------------------------------------------------------------------------- a TorchRL EnvBase

TOY_KEYS = {
    "pos": ("observation",),
    "clock": ("clock",),
    "instruction": ("instruction",),
    "action": ("action",),
    "reward": ("reward",),
    "done": ("done",),
    "terminated": ("terminated",),
    "truncated": ("truncated",),
}


def _toy_spec_tree(keys: Mapping[str, tuple[str, ...]], specs: Mapping[str, Any]) -> Any:
    from torchrl.data import Composite

    def build(tree: dict) -> Any:
        return Composite({k: build(v) if isinstance(v, dict) else v for k, v in tree.items()})

    return build(_nested_dict({keys[name]: spec for name, spec in specs.items()}))


def make_toy_torchrl_env(
    max_steps: int = 10,
    action: str = "bounded",
    keys: Mapping[str, Any] | None = None,
    with_instruction: bool = False,
) -> Any:
    """One copy of a TorchRL 1-D walk to +1 (see the module docstring).

    action: "bounded" (Bounded(-1, 1, (1,)), step 0.5 x a), "categorical"
    (Categorical(3): left / stay / right by 0.5) or "one_hot" (OneHot(3)).
    A step that reaches x >= 1 terminates with reward 1 (else -0.01).
    """
    from torchrl.data import Bounded, Categorical, NonTensor, OneHot, Unbounded
    from torchrl.envs import EnvBase

    names = {name: tuple(k) if isinstance(k, (list, tuple)) else (k,) for name, k in {**TOY_KEYS, **(keys or {})}.items()}
    action_specs = {
        "bounded": Bounded(-1.0, 1.0, shape=(1,)),
        "categorical": Categorical(3, shape=()),
        "one_hot": OneHot(3),
    }
    if action not in action_specs:
        raise ValueError(f"action must be one of {sorted(action_specs)}, got {action!r}")
    def bool_spec() -> Any:
        return Categorical(2, shape=(1,), dtype=torch.bool)

    obs_specs = {"pos": Bounded(-1.0, 1.0, shape=(1,)), "clock": Unbounded(shape=(1,), dtype=torch.int64)}
    if with_instruction:
        obs_specs["instruction"] = NonTensor(shape=(), example_data="walk right")

    class ToyWalk(EnvBase):
        """1-D walk; keys from `names`."""

        def __init__(self) -> None:
            super().__init__(batch_size=torch.Size([]))
            self.max_episode_steps = int(max_steps)
            self.observation_spec = _toy_spec_tree(names, obs_specs)
            self.action_spec = _toy_spec_tree(names, {"action": action_specs[action]})
            self.reward_spec = _toy_spec_tree(names, {"reward": Unbounded(shape=(1,))})
            self.done_spec = _toy_spec_tree(names, {"done": bool_spec(), "terminated": bool_spec(), "truncated": bool_spec()})
            self.x = torch.zeros(1)
            self.t = 0
            self.rng = torch.Generator().manual_seed(0)

        def _obs(self, **extra: torch.Tensor) -> TensorDictBase:
            entries = {names["pos"]: self.x.clone(), names["clock"]: torch.tensor([self.t], dtype=torch.int64)}
            entries.update({names[k]: v for k, v in extra.items()})
            td = TensorDict(_nested_dict(entries), batch_size=[])
            if with_instruction:
                td.set(names["instruction"], NonTensorData("walk right"))
            return td

        def _reset(self, tensordict: TensorDictBase | None) -> TensorDictBase:
            self.x = (torch.rand(1, generator=self.rng) - 0.5) * 0.2
            self.t = 0
            false = torch.zeros(1, dtype=torch.bool)
            return self._obs(done=false, terminated=false.clone(), truncated=false.clone())

        def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
            a = tensordict.get(names["action"])
            if action == "bounded":
                move = 0.5 * a.float().clamp(-1, 1).reshape(1)
            elif action == "categorical":
                move = 0.5 * (a.reshape(1).float() - 1)
            else:
                move = 0.5 * (a.float().argmax(-1).reshape(1) - 1)
            self.x = (self.x + move).clamp(-1, 1)
            self.t += 1
            terminated = bool(self.x.item() >= 1.0)
            truncated = self.t >= self.max_episode_steps
            return self._obs(
                reward=torch.tensor([1.0 if terminated else -0.01]),
                done=torch.tensor([terminated or truncated]),
                terminated=torch.tensor([terminated]),
                truncated=torch.tensor([truncated]),
            )

        def _set_seed(self, seed: int | None) -> None:
            self.rng.manual_seed(0 if seed is None else int(seed))

    return ToyWalk()
