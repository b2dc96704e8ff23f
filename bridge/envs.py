"""TorchRL and TensorDict envs as jaxrl_vla host envs (`env.type` "torchrl" / "tensordict").

Why: robot-learning teams already have their simulators behind TorchRL's
`EnvBase` or behind the seed framework's TensorDict contract. Both adapters here
turn such an env into the host env protocol of `jaxrl_vla.envs.host` (numpy in,
numpy out, N auto-resetting copies, `info["final_obs"]`), so the Trainer runs
them in standard mode and the AsyncTrainer in vla mode with no other change.

Entry point (what `jaxrl_vla.build` calls for `env.type` "torchrl"/"tensordict"):

    make_torch_env(name, kind, **kwargs) -> TorchRLEnv | TensorDictEnv   (host env specs)

Naming (`env.name`)
-------------------
kind "torchrl":
    "GymEnv:<gym id>"         e.g. "GymEnv:CartPole-v1". TorchRL's `GymWrapper`
                              around ONE gymnasium synchronous vector env of the
                              N copies (batch_size [N], TorchRL's own partial
                              resets via `AutoresetMode.DISABLED`). With
                              `batching: "serial"` / "parallel": N
                              `torchrl.envs.GymEnv(<id>)` in a SerialEnv /
                              ParallelEnv instead.
    "<gym id>"                shorthand for "GymEnv:<gym id>".
    "<Class>:<arg>"           any class of `torchrl.envs`, called `Class(arg, **kwargs)`
                              (e.g. "DMControlEnv:cheetah" with `task_name: "run"`).
    "package.module:factory"  a user callable returning an `EnvBase`. A factory
                              with a `num_envs` parameter builds the N copies
                              itself (batch_size [num_envs]); any other factory
                              is called once per copy (batch_size []) and the
                              copies are batched by TorchRL (see `batching`).
kind "tensordict":
    "package.module:factory"  `factory(num_envs=N, **kwargs)` returns an env with
                              the seed's contract (see `TensorDictEnv`).

Every other `env` key of the config goes to the env constructor / factory,
except these adapter options:

    max_episode_steps  bound of evaluation episodes (default: read from the env:
                       gymnasium's registry for GymEnv, a `max_episode_steps`
                       attribute, a StepCounter transform; else 1000). It is
                       also passed on as the env's time limit to gymnasium
                       ("GymEnv:" names) and to factories with a
                       `max_episode_steps` parameter.
    batching           torchrl only: "auto" (default: native for GymEnv and for
                       factories taking num_envs, else serial), "native",
                       "serial" (SerialEnv: all copies in this process) or
                       "parallel" (ParallelEnv: one process per copy).
    copy_obs           false (default): observations are borrowed views of the
                       env's tensors; true: one copy per leaf (see Ownership).
    tokenizer          for string observations: {"vocab": [...], "max_length": L}
                       (a WordTokenizer), "package.module:factory", or (Python
                       API) any object with `encode(list[str]) -> (ids, mask)`.
                       Default: the env's `tokenizer` attribute.
    final_obs_key      tensordict only: the info key of the final observation
                       (default: "final_obs", then "final_observation").
    obs_keys           the observation keys the policy reads (TorchRL's `in_keys`):
                       a list of keys, nested ones "/"-joined ("agent/pos");
                       default every observation-spec leaf (TorchRL's
                       PendulumEnv would feed its physical `params` too).

Keys come from the env's specs, never assumed
----------------------------------------------
TorchRL: observation leaves from `env.observation_spec` (nested keys become
nested dicts, as in `td_to_jax`), the action from `env.full_action_spec` (exactly
one action key), the reward from `env.reward_keys` (one key, one value per env),
terminated / truncated from `env.done_keys` (the leaves named "terminated" and
"truncated"; an env with only "done" has done = terminated, never truncated),
success from a bool leaf named "success" / "is_success" when a spec has one.
Renamed or nested keys (`RenameTransform`, ("agent", "pos"), ...) just work.

TensorDict (seed) envs: observation keys from `observation_spec` (TorchRL
Composite), else `single_observation_space` / `observation_space` (gymnasium
Dict/Box/Discrete/Text), else the keys of the first `reset()` observation
(unbounded Boxes); the action from `action_spec`, `single_action_space` or
`action_space`. Reward / terminated / truncated are positional in that contract.

Spec conversion
---------------
    Bounded / Unbounded (float)       Box(low, high, shape, float32)   [float64/16 cast]
    Bounded / Unbounded (int, bool)   Box(..., int32 | uint8 | bool)    (observations only)
    Categorical, Binary (obs)         Box(0, n - 1, shape, int32 | bool)
    OneHot (obs)                      Box(0, 1, shape, int32 | bool)
    Categorical action, shape () / (1,)  Discrete(n): the adapter sends int ids
    OneHot action, shape (n,)         Discrete(n): the adapter sends one-hot rows
    Bounded float action              Box: actions clipped to the bounds before
                                      stepping (the transition keeps the sampled
                                      action, whose log-prob PPO re-scores)
    NonTensor / gymnasium Text (obs)  token ids Box(0, vocab - 1, (L,), int32)
                                      plus key + "_mask" Box(0, 1, (L,), bool)
    Composite / gymnasium Dict        nested dict of the above
    anything else (MultiOneHot, MultiCategorical and Binary actions, several
    action keys, integer Box actions, vector rewards) raises naming the key.

Conversion and ownership
------------------------
The host protocol is numpy, so tensor leaves go torch -> numpy with
`Tensor.numpy()`: zero-copy on CPU, ~1 us a leaf. (`td_to_jax` followed by
`np.asarray` is zero-copy as well but measured ~190 us a leaf, as slow as a
whole CartPole step; it is used here only for its string tokenisation.) The
dtype policy is `td_to_jax`'s: int64 -> int32 (values outside int32 raise),
float64 / float16 / bfloat16 -> float32, each a deliberate copy; CUDA tensors
are copied to the host; tensors with grad are detached.

A zero-copy observation BORROWS the env's tensor. The collector keeps the
observation of step t while it runs step t + 1, so an env that writes step t + 1
into the same memory (a preallocated simulator buffer) would silently corrupt
the stored transition. The adapters therefore check every step that no
borrowed leaf comes back in the memory of the previous step's leaf, and raise
`StorageReuseError` naming the key if it does (at the first step): set
`copy_obs: true` for such envs (the copy convert.py's docstring asks for
producers that reuse their storage). TorchRL's `step_and_maybe_reset` returns
fresh tensors every step (verified for GymWrapper and SerialEnv), so TorchRL
envs run zero-copy by default.

Batching choice for TorchRL (measured through this adapter on 2 busy CPU
cores, CartPole, random actions): a GymWrapper over one gymnasium sync vector
env 7,000-11,000 env-steps/s with 8 copies, ~9,600 with 16 (TorchRL's
`step_and_maybe_reset` is ~90% of it; the adapter's reads ~0.1 ms a step);
SerialEnv of GymEnv copies ~2,000-2,350; ParallelEnv works but takes ~10 s to
start its workers. TorchRL's own `GymEnv(id, num_envs=N)` uses gymnasium's
AsyncVectorEnv (a process per copy) and failed to start its workers in this
sandbox. Hence native vector batching for GymEnv, SerialEnv (no processes,
robust) for everything else by default, ParallelEnv on request for envs whose
step is heavy enough to amortise inter-process traffic.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import copy
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
import torch
from tensordict import TensorDictBase, is_non_tensor

from bridge.convert import td_to_jax
from jaxrl_vla.config import ConfigError
from jaxrl_vla.envs.base import Box, Discrete

__all__ = [
    "EnvLayout",
    "ObsLeaf",
    "StorageReuseError",
    "TensorDictEnv",
    "TensorDictVecEnv",
    "TorchRLEnv",
    "TorchRLVecEnv",
    "UnsupportedSpecError",
    "gym_vector_env",
    "make_torch_env",
    "resolve_tokenizer",
    "torchrl_action",
    "torchrl_obs_leaves",
]

NestedKey = tuple[str, ...]
PyTree = Any
DEFAULT_MAX_EPISODE_STEPS = 1000
_INT32 = np.iinfo(np.int32)
_SUCCESS_NAMES = ("success", "is_success")
TORCHRL_OPTIONS = ("max_episode_steps", "batching", "copy_obs", "tokenizer", "obs_keys")
TENSORDICT_OPTIONS = ("max_episode_steps", "copy_obs", "tokenizer", "final_obs_key", "obs_keys")
BATCHING = ("auto", "native", "serial", "parallel")


class UnsupportedSpecError(ValueError):
    """An env spec or value this adapter cannot map to Box / Discrete (names the key)."""


class StorageReuseError(RuntimeError):
    """The env wrote a new observation into the memory of the previous one (set copy_obs)."""


# --------------------------------------------------------------------------- keys and dtypes


def key_path(key: str | NestedKey) -> str:
    """"/"-joined form of a nested key, for messages (the form `td_to_jax` uses)."""
    return "/".join(key) if isinstance(key, tuple) else str(key)


def as_key(key: str | NestedKey) -> NestedKey:
    return tuple(key) if isinstance(key, tuple) else (key,)


def numpy_dtype(dtype: Any) -> np.dtype:
    """The observation dtype the learner sees for a torch / numpy dtype (td_to_jax's policy).

    JAX runs without x64: int64 becomes int32, every float becomes float32
    (numpy has no bfloat16 and the policies compute in float32).
    """
    if isinstance(dtype, torch.dtype):
        if dtype.is_floating_point:
            return np.dtype(np.float32)
        if dtype == torch.bool:
            return np.dtype(bool)
        dtype = torch.empty((), dtype=dtype).numpy().dtype
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.floating):
        return np.dtype(np.float32)
    if dtype in (np.dtype(np.int64), np.dtype(np.uint64)):
        return np.dtype(np.int32)
    return dtype


def box_bound(values: Any) -> float | tuple:
    """A Box bound as Box wants it: one float when uniform, else a nested tuple."""
    flat = np.asarray(values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values, np.float64)
    if flat.size and np.all(flat == flat.flat[0]):
        return float(flat.flat[0])

    def to_tuple(x: Any) -> Any:
        return tuple(to_tuple(v) for v in x) if isinstance(x, list) else float(x)

    return to_tuple(flat.tolist())


def put(tree: dict, key: NestedKey, value: Any) -> None:
    """tree[k0][k1]...[kn] = value, creating the intermediate dicts."""
    node = tree
    for part in key[:-1]:
        node = node.setdefault(part, {})
    node[key[-1]] = value


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class ObsLeaf:
    """One observation entry: where it is in the env's TensorDict and what it becomes.

    `text` leaves hold strings and become (ids [L], mask [L]) under the key's
    name and name + "_mask" (the names `td_to_jax` gives them).
    """

    key: NestedKey
    space: Box
    text: bool = False


@dataclass(frozen=True)
class ActionCodec:
    """numpy actions from the policy -> the tensor the env expects.

    kind "index": Discrete ids sent as integers of `env_shape` (() or (1,));
    "one_hot": Discrete ids sent as one-hot rows of length n;
    "box": real vectors, clipped to [low, high] where those are finite.
    """

    kind: str
    env_shape: tuple[int, ...]
    dtype: torch.dtype
    n: int = 0
    low: np.ndarray | None = None
    high: np.ndarray | None = None

    def encode(self, actions: np.ndarray, num_envs: int) -> torch.Tensor:
        actions = np.asarray(actions)
        if self.kind == "box":
            if self.low is not None:
                actions = np.clip(actions, self.low, self.high)
            t = torch.from_numpy(np.ascontiguousarray(actions, dtype=np.float32))
            return t.to(self.dtype).reshape(num_envs, *self.env_shape)
        ids = torch.from_numpy(np.ascontiguousarray(actions, dtype=np.int64)).reshape(num_envs)
        if self.kind == "one_hot":
            return torch.nn.functional.one_hot(ids, self.n).to(self.dtype)
        return ids.to(self.dtype).reshape(num_envs, *self.env_shape)


@dataclass(frozen=True)
class EnvLayout:
    """Everything the adapter reads from an env's specs, once, at construction.

    `reward_key`, `terminated_key`, `truncated_key` and `success_key` are
    TorchRL keys (relative to the "next" TensorDict); None where absent.
    """

    obs_leaves: tuple[ObsLeaf, ...]
    action_space: Box | Discrete
    codec: ActionCodec
    action_key: NestedKey | None = None
    reward_key: NestedKey | None = None
    terminated_key: NestedKey | None = None
    truncated_key: NestedKey | None = None
    success_key: NestedKey | None = None

    @property
    def observation_space(self) -> dict:
        return observation_space(self.obs_leaves)


def observation_space(leaves: Sequence[ObsLeaf]) -> dict:
    """Nested dict of Boxes; a text leaf gives two (ids and mask)."""
    space: dict = {}
    for leaf in leaves:
        if leaf.text:
            put(space, leaf.key, leaf.space)
            mask_key = leaf.key[:-1] + (leaf.key[-1] + "_mask",)
            put(space, mask_key, Box(0, 1, leaf.space.shape, np.dtype(bool)))
        else:
            put(space, leaf.key, leaf.space)
    return space


def check_unique_keys(leaves: Sequence[ObsLeaf]) -> None:
    """A text leaf's "_mask" must not collide with an observation of that name."""
    names = {leaf.key for leaf in leaves}
    for leaf in leaves:
        mask_key = leaf.key[:-1] + (leaf.key[-1] + "_mask",)
        if leaf.text and mask_key in names:
            raise UnsupportedSpecError(
                f"observation {key_path(leaf.key)!r} holds strings, whose mask would be {key_path(mask_key)!r}, "
                "but the env already has an observation of that name"
            )


def select_obs_leaves(leaves: Sequence[ObsLeaf], obs_keys: Sequence[Any] | None) -> tuple[ObsLeaf, ...]:
    """The leaves named by `obs_keys` ("/"-joined strings or tuples), in that order; all when None.

    A key naming a nested group ("params") selects every leaf under it."""
    if obs_keys is None:
        return tuple(leaves)
    if isinstance(obs_keys, (str, tuple)) or not obs_keys:
        raise ConfigError(f"env.obs_keys: expected a non-empty list of observation keys, got {obs_keys!r}")
    chosen: list[ObsLeaf] = []
    for key in obs_keys:
        wanted = as_key(key) if isinstance(key, str) else tuple(key)
        found = [leaf for leaf in leaves if leaf.key[: len(wanted)] == wanted]
        if not found:
            names = [key_path(leaf.key) for leaf in leaves]
            close = difflib.get_close_matches(key_path(wanted), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"env.obs_keys: the env has no observation {key_path(wanted)!r}{hint} "
                              f"(it has {', '.join(map(repr, names))})")
        chosen.extend(leaf for leaf in found if leaf not in chosen)
    return tuple(chosen)


# --------------------------------------------------------------------------- tokenizers


def resolve_tokenizer(option: Any, env: Any = None) -> Any:
    """The tokenizer for string observations: the option, else the env's `tokenizer`.

    option: None, an object with `encode`, {"vocab": [...], "max_length": L}
    (a WordTokenizer) or "package.module:factory" (called without arguments).
    """
    if option is None:
        own = safe_attr(env, "tokenizer") if env is not None else None
        return own if hasattr(own, "encode") else None
    if hasattr(option, "encode"):
        return option
    if isinstance(option, Mapping):
        from jaxrl_vla.tokenizer import WordTokenizer

        try:
            return WordTokenizer(**option)
        except TypeError as err:
            raise ConfigError(f"env.tokenizer: expected {{'vocab': [...], 'max_length': L}}: {err}") from None
    if isinstance(option, str):
        tokenizer = load_callable(option, "env.tokenizer")()
        if not hasattr(tokenizer, "encode"):
            raise ConfigError(f"env.tokenizer: {option} returned {type(tokenizer).__name__}, which has no encode()")
        return tokenizer
    raise ConfigError(f"env.tokenizer: expected a dict, 'package.module:factory' or a tokenizer, got {option!r}")


def text_space(tokenizer: Any, path: str) -> Box:
    """Box of a string leaf's token ids: length and vocabulary probed from the tokenizer."""
    if tokenizer is None:
        raise UnsupportedSpecError(
            f"observation {path!r} holds strings but no tokenizer was given: set env.tokenizer "
            "({'vocab': [...], 'max_length': L} or 'package.module:factory') or give the env a `tokenizer`"
        )
    ids, _ = tokenizer.encode([""])
    length = int(np.asarray(ids).shape[-1])
    vocab = getattr(tokenizer, "vocab_size", None) or getattr(getattr(tokenizer, "tokenizer", None), "vocab_size", None)
    high = int(vocab) - 1 if vocab else int(_INT32.max)
    return Box(0, high, (length,), np.dtype(np.int32))


# --------------------------------------------------------------------------- TorchRL specs


def _torchrl_data() -> Any:
    import torchrl.data as trd

    return trd


def _bounds(spec: Any, batch_ndim: int) -> tuple[Any, Any]:
    """(low, high) of one env (the batch dims of a batched spec dropped)."""
    index = (0,) * batch_ndim
    return spec.space.low[index], spec.space.high[index]


def torchrl_obs_space(spec: Any, key: NestedKey, batch_ndim: int) -> Box:
    """One TorchRL observation leaf spec -> Box (see the module's table)."""
    trd = _torchrl_data()
    shape = tuple(spec.shape[batch_ndim:])
    dtype = numpy_dtype(spec.dtype)
    if isinstance(spec, trd.Bounded):
        low, high = _bounds(spec, batch_ndim)
        return Box(box_bound(low), box_bound(high), shape, dtype)
    if isinstance(spec, trd.Unbounded):
        return Box(-np.inf, np.inf, shape, dtype)
    if isinstance(spec, trd.OneHot):
        return Box(0, 1, shape, dtype)
    if isinstance(spec, trd.Categorical):
        n = spec.space.n
        high = (np.asarray(n.cpu()) - 1).max() if isinstance(n, torch.Tensor) else int(n) - 1
        return Box(0, float(high), shape, dtype)
    raise UnsupportedSpecError(
        f"observation {key_path(key)!r}: unsupported spec {type(spec).__name__}; use Bounded, Unbounded, "
        "Categorical, OneHot, NonTensor (strings) or a Composite of those"
    )


def torchrl_obs_leaves(composite: Any, tokenizer: Any = None) -> tuple[ObsLeaf, ...]:
    """Every leaf of a TorchRL observation Composite, in spec order.

    The Composite's own shape is the env's batch shape and is dropped from the leaves.
    """
    trd = _torchrl_data()
    batch_ndim = len(composite.shape)
    leaves = []
    for key in composite.keys(include_nested=True, leaves_only=True):
        key = as_key(key)
        spec = composite[key]
        if isinstance(spec, trd.NonTensor):
            leaves.append(ObsLeaf(key, text_space(tokenizer, key_path(key)), text=True))
        elif isinstance(spec, trd.Composite):
            continue  # an empty Composite has no leaves
        else:
            leaves.append(ObsLeaf(key, torchrl_obs_space(spec, key, batch_ndim)))
    if not leaves:
        raise UnsupportedSpecError("the env's observation_spec has no leaves: nothing to observe")
    check_unique_keys(leaves)
    return tuple(leaves)


def torchrl_action(spec: Any, key: NestedKey, batch_ndim: int) -> tuple[Box | Discrete, ActionCodec]:
    """One TorchRL action leaf spec -> (Box | Discrete, how to encode actions for the env)."""
    trd = _torchrl_data()
    shape = tuple(spec.shape[batch_ndim:])
    name = type(spec).__name__
    path = key_path(key)
    if isinstance(spec, (trd.MultiOneHot, trd.MultiCategorical, trd.Binary)):
        raise UnsupportedSpecError(f"action {path!r}: {name} actions are not supported; use OneHot, Categorical or a float Box")
    if isinstance(spec, trd.OneHot):
        if len(shape) != 1:
            raise UnsupportedSpecError(f"action {path!r}: OneHot actions must have shape (n,), got {shape}")
        return Discrete(int(shape[0])), ActionCodec("one_hot", shape, spec.dtype, n=int(shape[0]))
    if isinstance(spec, trd.Categorical):
        if shape not in ((), (1,)):
            raise UnsupportedSpecError(f"action {path!r}: Categorical actions must have shape () or (1,), got {shape}")
        n = int(spec.space.n)
        return Discrete(n), ActionCodec("index", shape, spec.dtype, n=n)
    if isinstance(spec, (trd.Bounded, trd.Unbounded)):
        if not spec.dtype.is_floating_point:
            raise UnsupportedSpecError(f"action {path!r}: integer {name} actions are not supported; use Categorical")
        if isinstance(spec, trd.Bounded):
            low, high = _bounds(spec, batch_ndim)
            space = Box(box_bound(low), box_bound(high), shape, np.dtype(np.float32))
            low_np = np.broadcast_to(np.asarray(low.cpu(), np.float32), shape)
            high_np = np.broadcast_to(np.asarray(high.cpu(), np.float32), shape)
            return space, ActionCodec("box", shape, spec.dtype, low=low_np, high=high_np)
        return Box(-np.inf, np.inf, shape, np.dtype(np.float32)), ActionCodec("box", shape, spec.dtype)
    raise UnsupportedSpecError(f"action {path!r}: unsupported spec {name}; use OneHot, Categorical, Bounded or Unbounded")


def _single_leaf(composite: Any, what: str) -> tuple[NestedKey, Any]:
    """The one leaf of a Composite (action / reward), or an error listing them."""
    keys = [as_key(k) for k in composite.keys(include_nested=True, leaves_only=True)]
    if len(keys) != 1:
        listed = ", ".join(repr(key_path(k)) for k in keys) or "none"
        raise UnsupportedSpecError(f"the env has {len(keys)} {what} keys ({listed}); this adapter handles exactly one")
    return keys[0], composite[keys[0]]


def _done_keys(done_keys: Sequence[Any]) -> tuple[NestedKey, NestedKey | None]:
    """(terminated key, truncated key or None) from TorchRL's done keys.

    "terminated" is the true end of the MDP; an env that only reports "done"
    cannot tell a time limit apart, so done counts as terminated (no bootstrap).
    """
    keys = [as_key(k) for k in done_keys]

    def named(name: str) -> list[NestedKey]:
        return [k for k in keys if k[-1] == name]

    for name in ("terminated", "truncated", "done"):
        if len(named(name)) > 1:
            listed = ", ".join(repr(key_path(k)) for k in named(name))
            raise UnsupportedSpecError(f"the env has several {name!r} keys ({listed}); this adapter handles one agent group")
    terminated = named("terminated") or named("done")
    if not terminated:
        listed = ", ".join(repr(key_path(k)) for k in keys) or "none"
        raise UnsupportedSpecError(f"the env's done_spec has no 'terminated' or 'done' key (has: {listed})")
    truncated = named("truncated")
    return terminated[0], (truncated[0] if truncated else None)


def _success_key(*composites: Any) -> NestedKey | None:
    for composite in composites:
        for key in composite.keys(include_nested=True, leaves_only=True):
            key = as_key(key)
            if key[-1] in _SUCCESS_NAMES and composite[key].dtype == torch.bool:
                return key
    return None


def torchrl_layout(env: Any, tokenizer: Any = None) -> EnvLayout:
    """Read keys and spaces from a TorchRL EnvBase's specs (batched or not)."""
    batch_ndim = len(env.batch_size)
    obs_leaves = torchrl_obs_leaves(env.observation_spec, tokenizer)
    action_key, action_spec = _single_leaf(env.full_action_spec, "action")
    action_space, codec = torchrl_action(action_spec, action_key, batch_ndim)
    reward_key, reward_spec = _single_leaf(env.full_reward_spec, "reward")
    reward_shape = tuple(reward_spec.shape[batch_ndim:])
    if reward_shape not in ((), (1,)):
        raise UnsupportedSpecError(f"reward {key_path(reward_key)!r}: shape {reward_shape} per env; expected one value (() or (1,))")
    terminated_key, truncated_key = _done_keys(env.done_keys)
    return EnvLayout(
        obs_leaves=obs_leaves,
        action_space=action_space,
        codec=codec,
        action_key=action_key,
        reward_key=reward_key,
        terminated_key=terminated_key,
        truncated_key=truncated_key,
        success_key=_success_key(env.observation_spec, env.full_done_spec),
    )


# --------------------------------------------------------------------------- gymnasium spaces (seed envs)


def gym_obs_leaves(space: Any, tokenizer: Any = None, prefix: NestedKey = ()) -> tuple[ObsLeaf, ...]:
    """gymnasium Dict / Box / Discrete / Text observation space -> leaves (nested Dicts nest)."""
    import gymnasium as gym

    path = key_path(prefix) or "<root>"
    if isinstance(space, gym.spaces.Dict):
        leaves: list[ObsLeaf] = []
        for name, sub in space.spaces.items():
            leaves.extend(gym_obs_leaves(sub, tokenizer, prefix + (name,)))
        if not prefix:
            check_unique_keys(leaves)
        return tuple(leaves)
    if not prefix:
        raise UnsupportedSpecError("a TensorDict env's observation space must be a gymnasium Dict (keys of the TensorDict)")
    if isinstance(space, gym.spaces.Box):
        return (ObsLeaf(prefix, Box(box_bound(space.low), box_bound(space.high), tuple(space.shape), numpy_dtype(space.dtype))),)
    if isinstance(space, gym.spaces.Discrete):
        return (ObsLeaf(prefix, Box(float(space.start), float(space.start + space.n - 1), (), np.dtype(np.int32))),)
    if isinstance(space, gym.spaces.Text):
        return (ObsLeaf(prefix, text_space(tokenizer, path), text=True),)
    raise UnsupportedSpecError(f"observation {path!r}: unsupported gymnasium space {type(space).__name__}; use Box, Discrete, Text or Dict")


def gym_action(space: Any) -> tuple[Box | Discrete, ActionCodec]:
    """gymnasium Discrete / float Box action space -> (space, codec)."""
    import gymnasium as gym

    if isinstance(space, gym.spaces.Discrete):
        if int(space.start) != 0:
            raise UnsupportedSpecError(f"action: Discrete spaces must start at 0, got start={space.start}")
        return Discrete(int(space.n)), ActionCodec("index", (), torch.int64, n=int(space.n))
    if isinstance(space, gym.spaces.Box) and np.issubdtype(space.dtype, np.floating):
        shape = tuple(space.shape)
        box = Box(box_bound(space.low), box_bound(space.high), shape, np.dtype(np.float32))
        finite = np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))
        low, high = (np.asarray(space.low, np.float32), np.asarray(space.high, np.float32)) if finite else (None, None)
        return box, ActionCodec("box", shape, torch.float32, low=low, high=high)
    raise UnsupportedSpecError(f"action: unsupported gymnasium space {space!r}; use Discrete or a float Box")


def probe_obs_leaves(obs: TensorDictBase, num_envs: int, tokenizer: Any = None) -> tuple[ObsLeaf, ...]:
    """Leaves of an observation TensorDict itself, for envs that publish no spec.

    Bounds are unknown (unbounded Boxes); shapes drop the leading num_envs.
    """
    leaves = []
    for key, value in _td_leaves(obs):
        if is_non_tensor(value):
            leaves.append(ObsLeaf(key, text_space(tokenizer, key_path(key)), text=True))
        elif isinstance(value, torch.Tensor):
            if value.ndim == 0 or value.shape[0] != num_envs:
                raise UnsupportedSpecError(f"observation {key_path(key)!r}: shape {tuple(value.shape)} does not lead with num_envs={num_envs}")
            leaves.append(ObsLeaf(key, Box(-np.inf, np.inf, tuple(value.shape[1:]), numpy_dtype(value.dtype))))
        else:
            raise UnsupportedSpecError(f"observation {key_path(key)!r}: unsupported value {type(value).__name__}")
    if not leaves:
        raise UnsupportedSpecError("the env's reset() observation has no entries")
    check_unique_keys(leaves)
    return tuple(leaves)


def _td_leaves(node: Any, prefix: NestedKey = ()) -> Iterator[tuple[NestedKey, Any]]:
    """(nested key, value) of every tensor / string leaf of a TensorDict or mapping."""
    for name, value in node.items():
        key = prefix + (name,)
        if is_non_tensor(value) or isinstance(value, torch.Tensor):
            yield key, value
        elif isinstance(value, (TensorDictBase, Mapping)):
            yield from _td_leaves(value, key)
        else:
            yield key, value


# --------------------------------------------------------------------------- TensorDict -> numpy


def tensor_to_numpy(t: Any, dtype: np.dtype, path: str, copy: bool = False) -> np.ndarray:
    """One observation tensor -> numpy of `dtype`; a view of the same memory when it can be.

    Zero-copy (`Tensor.numpy()`) for CPU tensors already of `dtype`; one copy for
    casts (int64 -> int32 checked for range), device tensors, neg/conj views,
    and when `copy` asks for an owned array.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"observation {path!r}: expected a tensor, got {type(t).__name__}")
    t = t.detach()
    if t.device.type != "cpu":
        t, copy = t.cpu(), False  # the transfer is the copy
    if t.is_neg() or t.is_conj():
        t, copy = t.resolve_neg().resolve_conj(), False
    if t.dtype in (torch.bfloat16, torch.float16):
        t, copy = t.float(), False  # numpy has no bfloat16
    arr = t.numpy()
    if arr.dtype != dtype:
        if arr.dtype in (np.int64, np.uint64) and dtype == np.int32 and arr.size:
            if arr.min() < _INT32.min or arr.max() > _INT32.max:
                raise ValueError(f"observation {path!r}: int64 values outside int32 (JAX runs without x64)")
        return arr.astype(dtype)
    return arr.copy() if copy else arr


@dataclass
class ObsReader:
    """Reads the observation leaves of a TensorDict into a nested dict of numpy [N, ...].

    Keeps the source tensors of the previous read alive and remembers their
    data pointers, so an env that writes a new step into the same memory is
    caught (`StorageReuseError`) instead of corrupting borrowed observations.
    """

    leaves: tuple[ObsLeaf, ...]
    num_envs: int
    tokenizer: Any = None
    copy: bool = False
    _held: dict = field(default_factory=dict)

    def read(self, td: Any, *, guard: bool = True, what: str = "observation") -> dict:
        out: dict = {}
        held: dict = {}
        for leaf in self.leaves:
            value = self._get(td, leaf.key, what)
            if leaf.text:
                self._put_text(out, leaf, value)
                continue
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{what} {key_path(leaf.key)!r}: expected a tensor, got {type(value).__name__}")
            expected = (self.num_envs,) + tuple(leaf.space.shape)
            if tuple(value.shape) != expected:
                raise ValueError(f"{what} {key_path(leaf.key)!r}: shape {tuple(value.shape)}, the spec says {expected} ([num_envs, ...])")
            arr = tensor_to_numpy(value, np.dtype(leaf.space.dtype), key_path(leaf.key), self.copy)
            if guard and self._borrowed(arr, value):
                self._check_reuse(leaf.key, value)
                held[leaf.key] = value
            put(out, leaf.key, arr)
        if guard:
            self._held = held
        return out

    @staticmethod
    def _borrowed(arr: np.ndarray, t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and t.numel() > 0 and arr.__array_interface__["data"][0] == t.data_ptr()

    def _check_reuse(self, key: NestedKey, t: torch.Tensor) -> None:
        previous = self._held.get(key)
        if previous is not None and previous.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            raise StorageReuseError(
                f"observation {key_path(key)!r}: the env returned this step's value in the memory of the previous "
                "step's (it reuses its storage), which would overwrite the observation the collector still holds; "
                "set env.copy_obs = true so the adapter copies each observation"
            )

    @staticmethod
    def _get(td: Any, key: NestedKey, what: str) -> Any:
        node = td
        for part in key:
            try:
                node = node.get(part) if isinstance(node, TensorDictBase) else node[part]
            except KeyError:
                node = None
            if node is None:
                available = ", ".join(repr(key_path(k)) for k, _ in _td_leaves(td)) if isinstance(td, (TensorDictBase, Mapping)) else "?"
                raise KeyError(f"{what} {key_path(key)!r} (from the env's spec) is missing from the env's TensorDict; it has: {available}")
        return node

    def _put_text(self, out: dict, leaf: ObsLeaf, value: Any) -> None:
        """Tokenise one string leaf with td_to_jax: ids under the key, mask under key + "_mask"."""
        name = leaf.key[-1]
        converted = td_to_jax({name: value}, tokenizer=self.tokenizer)
        ids, mask = np.asarray(converted[name]), np.asarray(converted[name + "_mask"])
        length = leaf.space.shape[-1]
        if ids.shape[-1] != length:
            raise ValueError(f"observation {key_path(leaf.key)!r}: tokenizer gave length {ids.shape[-1]}, expected {length}")
        if ids.ndim == 1:  # one string for the whole batch
            ids, mask = np.broadcast_to(ids, (self.num_envs, length)), np.broadcast_to(mask, (self.num_envs, length))
        ids = ids.reshape(self.num_envs, length)
        put(out, leaf.key, np.ascontiguousarray(ids, np.int32))
        put(out, leaf.key[:-1] + (name + "_mask",), np.ascontiguousarray(mask.reshape(self.num_envs, length), bool))


def flat(x: Any, num_envs: int, dtype: Any, what: str) -> np.ndarray:
    """A per-env value ([N], [N, 1], tensor or array) -> numpy [N] of `dtype`."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.size != num_envs:
        raise ValueError(f"{what}: expected one value per env ({num_envs}), got shape {arr.shape}")
    return arr.reshape(num_envs).astype(dtype, copy=False)


# --------------------------------------------------------------------------- names and factories


def load_callable(path: str, where: str) -> Callable:
    """'package.module:attr' -> the attribute (a callable), or ConfigError naming `where`."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{where}: expected 'package.module:factory', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(f"{where}: cannot import module {module_name!r} ({err})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: {module_name!r} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{where}: {path!r} is not callable")
    return obj


def accepts(factory: Callable, name: str) -> bool:
    """Whether `factory` takes a parameter called `name` (explicitly)."""
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def gym_vector_env(env_name: str, num_envs: int, **kwargs: Any) -> Any:
    """TorchRL's GymWrapper over gymnasium's synchronous vector env of `num_envs` copies.

    `AutoresetMode.DISABLED` lets TorchRL reset only the finished copies (the
    mode TorchRL prefers); everything runs in this process (see the module
    docstring for why not torchrl's `GymEnv(num_envs=...)`).
    """
    import gymnasium as gym
    from torchrl.envs import GymWrapper

    vec = gym.make_vec(
        env_name,
        num_envs=int(num_envs),
        vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.DISABLED},
        **kwargs,
    )
    return GymWrapper(vec)


@dataclass(frozen=True)
class TorchRLSource:
    """How to build the env.

    `factory(num_envs=N, **kwargs)` when `native`, else `factory(**kwargs)` per
    copy; `copy_factory` overrides the per-copy builder where the native one
    differs (GymEnv: the vector env natively, `torchrl.envs.GymEnv` per copy).
    """

    factory: Callable
    native: bool
    label: str
    max_episode_steps: int | None = None
    copy_factory: Callable | None = None


def resolve_torchrl_name(name: str, kwargs: dict) -> TorchRLSource:
    """`env.name` for kind "torchrl" -> how to build it (see the module docstring)."""
    left, sep, right = name.partition(":")
    if not sep:
        left, right = "GymEnv", name
    if left == "GymEnv":
        steps = kwargs.get("max_episode_steps")
        if steps is None:
            import gymnasium as gym

            try:
                steps = gym.spec(right).max_episode_steps
            except gym.error.Error as err:
                raise ConfigError(f"env.name: gymnasium has no env {right!r}: {err}") from None
        from torchrl.envs import GymEnv

        return TorchRLSource(partial(gym_vector_env, right), True, f"GymEnv:{right}", steps, partial(GymEnv, right))
    import torchrl.envs as tre

    if "." not in left and hasattr(tre, left):
        cls = getattr(tre, left)
        return TorchRLSource(partial(cls, right), False, f"{left}:{right}")
    if "." not in left and importlib.util.find_spec(left) is None:
        close = difflib.get_close_matches(left, [n for n in dir(tre) if n.endswith("Env")], n=1)
        hint = f"; did you mean '{close[0]}:{right}'?" if close else ""
        raise ConfigError(f"env.name: {left!r} is neither a class of torchrl.envs nor an importable module{hint}")
    factory = load_callable(name, "env.name")
    return TorchRLSource(factory, accepts(factory, "num_envs"), name)


def per_copy_factory(source: TorchRLSource, env_kwargs: dict) -> Callable:
    """A no-argument callable building ONE unbatched copy (for SerialEnv / ParallelEnv)."""
    return partial(source.copy_factory or source.factory, **env_kwargs)


def batched_env(source: TorchRLSource, env_kwargs: dict, batching: str, num_envs: int) -> Any:
    """The TorchRL env holding `num_envs` copies, batch_size [num_envs]."""
    if batching == "native":
        env = source.factory(num_envs=num_envs, **env_kwargs)
    elif batching == "serial":
        from torchrl.envs import SerialEnv

        env = SerialEnv(num_envs, per_copy_factory(source, env_kwargs))
    else:
        from torchrl.envs import ParallelEnv

        env = ParallelEnv(num_envs, per_copy_factory(source, env_kwargs))
    if tuple(env.batch_size) != (num_envs,):
        hint = " (a factory that builds batched envs should take a num_envs parameter)" if batching != "native" else ""
        raise UnsupportedSpecError(f"{source.label}: expected batch_size [{num_envs}], the env has {list(env.batch_size)}{hint}")
    return env


def safe_attr(obj: Any, name: str) -> Any:
    """getattr that treats any error as absent: env wrappers forward __getattr__ in odd ways."""
    if _is_batched_torchrl(obj):
        return None
    try:
        return getattr(obj, name, None)
    except Exception:  # noqa: BLE001 - a probe, not a contract
        return None


def _is_batched_torchrl(env: Any) -> bool:
    """SerialEnv / ParallelEnv: their __getattr__ recurses before start, so never probe them."""
    try:
        from torchrl.envs.batched_envs import BatchedEnvBase
    except ImportError:
        return False
    return isinstance(env, BatchedEnvBase)


def discover_max_steps(env: Any) -> int | None:
    """An episode bound declared by the env or one of its wrappers, if any.

    Looks at `max_episode_steps` / `_max_episode_steps` attributes, a gymnasium
    `spec.max_episode_steps` of a wrapped gym env, and StepCounter transforms.
    """
    seen: set[int] = set()
    stack = [env]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen or _is_batched_torchrl(obj):
            continue
        seen.add(id(obj))
        for attr in ("max_episode_steps", "_max_episode_steps"):
            value = safe_attr(obj, attr)
            if isinstance(value, (int, np.integer)) and value > 0:
                return int(value)
        value = safe_attr(safe_attr(obj, "spec"), "max_episode_steps")
        if isinstance(value, (int, np.integer)) and value > 0:
            return int(value)
        transform = safe_attr(obj, "transform")
        for t in list(safe_attr(transform, "transforms") or []) + [transform]:
            if type(t).__name__ == "StepCounter" and safe_attr(t, "max_steps"):
                return int(t.max_steps)
        stack.extend(safe_attr(obj, name) for name in ("base_env", "_env", "env"))
    return None


def check_env_kwargs(factory: Callable, env_kwargs: dict, reserved: Sequence[str] = ("num_envs",)) -> None:
    """Unknown constructor keys are config errors naming the key (unless the factory takes **kwargs)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [name for name in params if name not in reserved]
    for key in env_kwargs:
        if key not in params:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.4)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid) or 'none'}"
            raise ConfigError(f"env.{key}: unknown key{hint}")


def split_options(kwargs: dict, allowed: Sequence[str]) -> tuple[dict, dict]:
    """(adapter options, env constructor kwargs)."""
    options = {k: kwargs[k] for k in allowed if k in kwargs}
    return options, {k: v for k, v in kwargs.items() if k not in allowed}


# --------------------------------------------------------------------------- TorchRL adapter


class TorchRLVecEnv:
    """`HostVecEnv` over a TorchRL env of batch_size [N], stepped with `step_and_maybe_reset`.

    TorchRL's "next" convention maps directly onto the protocol: `out["next"]`
    holds the reward, done flags and the observation that ended an episode
    (-> info["final_obs"]); the second TensorDict is the root of the next step,
    already reset where an episode ended (-> obs).
    """

    def __init__(self, env: Any, layout: EnvLayout, num_envs: int, seed: int, tokenizer: Any, copy_obs: bool):
        self.env = env
        self.layout = layout
        self.num_envs = int(num_envs)
        self.seed = int(seed)
        self._reader = ObsReader(layout.obs_leaves, self.num_envs, tokenizer, copy_obs)
        self._final_reader = ObsReader(layout.obs_leaves, self.num_envs, tokenizer, copy_obs)
        self._td: TensorDictBase | None = None

    def reset(self, seed: int | None = None) -> PyTree:
        self.env.set_seed(self.seed if seed is None else int(seed))
        self._td = self.env.reset()
        return self._reader.read(self._td)

    def step(self, actions: np.ndarray) -> tuple[PyTree, np.ndarray, np.ndarray, np.ndarray, dict]:
        if self._td is None:
            raise RuntimeError("TorchRLVecEnv.step before reset")
        layout, n = self.layout, self.num_envs
        td = self._td
        td.set(layout.action_key, layout.codec.encode(actions, n))
        out, self._td = self.env.step_and_maybe_reset(td)
        nxt = out.get("next")
        reward = flat(nxt.get(layout.reward_key), n, np.float32, f"reward {key_path(layout.reward_key)!r}")
        terminated = flat(nxt.get(layout.terminated_key), n, bool, f"done {key_path(layout.terminated_key)!r}")
        if layout.truncated_key is not None:
            truncated = flat(nxt.get(layout.truncated_key), n, bool, f"done {key_path(layout.truncated_key)!r}")
        else:
            truncated = np.zeros(n, bool)
        info = {"final_obs": self._final_reader.read(nxt, guard=False, what="final observation")}
        if layout.success_key is not None:
            info["success"] = flat(nxt.get(layout.success_key), n, bool, f"success {key_path(layout.success_key)!r}")
        return self._reader.read(self._td), reward, terminated, truncated, info

    def close(self) -> None:
        self._td = None
        if not self.env.is_closed:
            self.env.close()


class TorchRLEnv:
    """`HostEnvSpec` for a TorchRL env; `make(N, seed)` builds N copies (see `batching`).

    `factory` builds the env: with `native=True` it is called as
    `factory(num_envs=N, **env_kwargs)` and must return batch_size [N];
    otherwise `factory(**env_kwargs)` builds one copy and TorchRL's SerialEnv
    or ParallelEnv batches them. Specs are read once from a probe env.
    """

    is_host_env = True
    reports_success = False  # success_rate is logged whenever infos carry it

    def __init__(
        self,
        factory: Callable,
        *,
        native: bool | None = None,
        batching: str = "auto",
        label: str | None = None,
        env_kwargs: dict | None = None,
        max_episode_steps: int | None = None,
        copy_obs: bool = False,
        tokenizer: Any = None,
        copy_factory: Callable | None = None,
        obs_keys: Sequence[Any] | None = None,
        probe_num_envs: int = 1,
    ):
        if batching not in BATCHING:
            raise ConfigError(f"env.batching: {batching!r} must be one of {', '.join(map(repr, BATCHING))}")
        native = accepts(factory, "num_envs") if native is None else native
        self.source = TorchRLSource(factory, native, label or getattr(factory, "__name__", repr(factory)),
                                    copy_factory=copy_factory)
        if batching == "auto":
            batching = "native" if native else "serial"
        if batching == "native" and not native:
            raise ConfigError(f"env.batching: 'native' needs a factory that takes num_envs; {self.source.label} does not")
        self.batching = batching
        self.env_kwargs = dict(env_kwargs or {})
        self.copy_obs = bool(copy_obs)
        probe = (factory(num_envs=probe_num_envs, **self.env_kwargs) if native
                 else per_copy_factory(self.source, self.env_kwargs)())
        try:
            self.tokenizer = resolve_tokenizer(tokenizer, probe)
            layout = torchrl_layout(probe, self.tokenizer)
            self.layout = replace(layout, obs_leaves=select_obs_leaves(layout.obs_leaves, obs_keys))
            steps = max_episode_steps or discover_max_steps(probe)
        finally:
            if not getattr(probe, "is_closed", False):  # a SerialEnv that never started counts as closed
                probe.close()
        self.steps_declared = steps is not None  # False: DEFAULT_MAX_EPISODE_STEPS is a guess, no time limit
        self.observation_space = self.layout.observation_space
        self.action_space = self.layout.action_space
        self.max_episode_steps = int(steps or DEFAULT_MAX_EPISODE_STEPS)

    @classmethod
    def from_source(cls, source: TorchRLSource, options: dict, env_kwargs: dict, probe_num_envs: int = 1) -> "TorchRLEnv":
        steps = options.get("max_episode_steps", source.max_episode_steps)
        return cls(
            source.factory, native=source.native, batching=options.get("batching", "auto"), label=source.label,
            env_kwargs=env_kwargs, max_episode_steps=steps, copy_obs=options.get("copy_obs", False),
            tokenizer=options.get("tokenizer"), copy_factory=source.copy_factory, obs_keys=options.get("obs_keys"),
            probe_num_envs=probe_num_envs,
        )

    def make(self, num_envs: int, seed: int) -> TorchRLVecEnv:
        env = batched_env(self.source, self.env_kwargs, self.batching, int(num_envs))
        return TorchRLVecEnv(env, self.layout, num_envs, seed, self.tokenizer, self.copy_obs)

    def __repr__(self) -> str:
        return f"TorchRLEnv({self.source.label!r}, batching={self.batching!r})"


# --------------------------------------------------------------------------- TensorDict (seed contract) adapter


def seed_reset(env: Any, seed: int | None) -> tuple[TensorDictBase, dict]:
    """`env.reset(seed=...)` when the env takes a seed, else `env.seed(seed)` / `set_seed` first."""
    if seed is not None and accepts(env.reset, "seed"):
        result = env.reset(seed=int(seed))
    else:
        for setter in ("seed", "set_seed"):
            fn = getattr(env, setter, None)
            if seed is not None and callable(fn):
                fn(int(seed))
                break
        result = env.reset()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(f"{type(env).__name__}.reset() must return (obs TensorDict, info), got {type(result).__name__}")
    return result


def seed_env_layout(env: Any, obs: TensorDictBase, tokenizer: Any) -> EnvLayout:
    """Observation leaves and action space of a seed-contract env, from its specs."""
    num_envs = int(env.num_envs)
    if getattr(env, "observation_spec", None) is not None:
        leaves = torchrl_obs_leaves(env.observation_spec, tokenizer)
    elif getattr(env, "single_observation_space", None) is not None:
        leaves = gym_obs_leaves(env.single_observation_space, tokenizer)
    elif getattr(env, "observation_space", None) is not None:
        leaves = gym_obs_leaves(env.observation_space, tokenizer)
    else:
        leaves = probe_obs_leaves(obs, num_envs, tokenizer)
    if getattr(env, "action_spec", None) is not None:
        batch_ndim = len(getattr(env, "batch_size", ()))
        space, codec = torchrl_action(env.action_spec, ("action",), batch_ndim)
    elif getattr(env, "single_action_space", None) is not None:
        space, codec = gym_action(env.single_action_space)
    elif getattr(env, "action_space", None) is not None:
        space, codec = gym_action(env.action_space)
    else:
        raise UnsupportedSpecError(f"{type(env).__name__} declares no action_spec, single_action_space or action_space")
    return EnvLayout(obs_leaves=leaves, action_space=space, codec=codec)


class TensorDictVecEnv:
    """`HostVecEnv` over a seed-contract env (batched, auto-resetting, TensorDict observations).

    The contract: `num_envs`; `reset(seed=None) -> (obs TensorDict [N], info)`;
    `step(action [N, ...] tensor) -> (obs, reward [N], terminated [N],
    truncated [N], info)`, where a copy whose episode ended is already reset
    (obs is its next episode's first observation) and info[final_obs_key] holds
    the observation that ended it (a TensorDict [N]; a per-env sequence with
    None elsewhere is accepted too). Without it, an episode that ends by
    truncation raises: bootstrapping needs that observation.
    """

    def __init__(self, env: Any, layout: EnvLayout, seed: int, tokenizer: Any, copy_obs: bool, final_obs_key: str | None):
        self.env = env
        self.layout = layout
        self.num_envs = int(env.num_envs)
        self.seed = int(seed)
        self.final_obs_keys = (final_obs_key,) if final_obs_key else ("final_obs", "final_observation")
        self._reader = ObsReader(layout.obs_leaves, self.num_envs, tokenizer, copy_obs)
        self._final_reader = ObsReader(layout.obs_leaves, self.num_envs, tokenizer, copy_obs)
        self._started = False

    def reset(self, seed: int | None = None) -> PyTree:
        obs, _ = seed_reset(self.env, self.seed if seed is None else seed)
        self._started = True
        return self._reader.read(obs)

    def step(self, actions: np.ndarray) -> tuple[PyTree, np.ndarray, np.ndarray, np.ndarray, dict]:
        if not self._started:
            raise RuntimeError("TensorDictVecEnv.step before reset")
        n = self.num_envs
        result = self.env.step(self.layout.codec.encode(actions, n))
        if not (isinstance(result, tuple) and len(result) == 5):
            raise TypeError(f"{type(self.env).__name__}.step must return (obs, reward, terminated, truncated, info)")
        obs_td, reward, terminated, truncated, info = result
        info = info or {}
        reward = flat(reward, n, np.float32, "reward")
        terminated, truncated = flat(terminated, n, bool, "terminated"), flat(truncated, n, bool, "truncated")
        obs = self._reader.read(obs_td)
        out_info = {"final_obs": self._final_obs(obs, info, terminated, truncated)}
        for name in _SUCCESS_NAMES:
            if name in info:
                out_info["success"] = flat(info[name], n, bool, f"info[{name!r}]")
                break
        return obs, reward, terminated, truncated, out_info

    def _final_obs(self, obs: PyTree, info: dict, terminated: np.ndarray, truncated: np.ndarray) -> PyTree:
        done = terminated | truncated
        key = next((k for k in self.final_obs_keys if k in info and info[k] is not None), None)
        if key is None or not done.any():
            if truncated.any():
                raise KeyError(
                    f"{type(self.env).__name__}.step truncated an episode but its info has none of "
                    f"{list(self.final_obs_keys)} (has {sorted(map(str, info))}): the learner bootstraps from the "
                    "observation that ended the episode; put it there (or name its key with env.final_obs_key)"
                )
            return obs  # only terminations: their final value is never used
        final = info[key]
        if isinstance(final, (TensorDictBase, Mapping)):
            return self._final_reader.read(final, guard=False, what="final observation")
        return self._final_per_env(obs, final, done, key)

    def _final_per_env(self, obs: PyTree, final: Any, done: np.ndarray, key: str) -> PyTree:
        """gymnasium style: one final observation per finished copy, None elsewhere."""
        if len(final) != self.num_envs:
            raise ValueError(f"info[{key!r}]: expected {self.num_envs} entries, got {len(final)}")
        out = jax.tree_util.tree_map(np.array, obs)
        single = ObsReader(self.layout.obs_leaves, 1, self._reader.tokenizer, True)
        for i in np.flatnonzero(done):
            item = final[i]
            item = item.unsqueeze(0) if isinstance(item, TensorDictBase) and item.batch_size == () else item
            row = single.read(item, guard=False, what=f"info[{key!r}][{i}]")

            def set_row(dst: np.ndarray, src: np.ndarray, i: int = i) -> None:
                dst[i] = src[0]

            jax.tree_util.tree_map(set_row, out, row)
        return out

    def close(self) -> None:
        fn = getattr(self.env, "close", None)
        if callable(fn):
            fn()


class TensorDictEnv:
    """`HostEnvSpec` for seed-contract envs: `factory(num_envs=N, **env_kwargs)` builds one.

    The spec is read once from a probe env of `probe_num_envs` copies (see
    `TensorDictVecEnv` for the contract and the module docstring for key discovery).
    """

    is_host_env = True

    def __init__(
        self,
        factory: Callable,
        *,
        label: str | None = None,
        env_kwargs: dict | None = None,
        max_episode_steps: int | None = None,
        copy_obs: bool = False,
        tokenizer: Any = None,
        final_obs_key: str | None = None,
        obs_keys: Sequence[Any] | None = None,
        probe_num_envs: int = 1,
    ):
        self.factory = factory
        self.label = label or getattr(factory, "__name__", repr(factory))
        self.env_kwargs = dict(env_kwargs or {})
        self.copy_obs = bool(copy_obs)
        self.final_obs_key = final_obs_key
        probe = self._build(probe_num_envs)
        try:
            self.tokenizer = resolve_tokenizer(tokenizer, probe)
            obs, _ = seed_reset(probe, 0)
            layout = seed_env_layout(probe, obs, self.tokenizer)
            self.layout = replace(layout, obs_leaves=select_obs_leaves(layout.obs_leaves, obs_keys))
            steps = max_episode_steps or discover_max_steps(probe)
            self.steps_declared = steps is not None
            self.reports_success = bool(getattr(probe, "reports_success", False))
        finally:
            fn = getattr(probe, "close", None)
            if callable(fn):
                fn()
        self.observation_space = self.layout.observation_space
        self.action_space = self.layout.action_space
        self.max_episode_steps = int(steps or DEFAULT_MAX_EPISODE_STEPS)

    def _build(self, num_envs: int) -> Any:
        if not accepts(self.factory, "num_envs") and not _has_var_kwargs(self.factory):
            raise ConfigError(f"env.name: {self.label} must take a num_envs argument (the seed contract's batched env)")
        env = self.factory(num_envs=num_envs, **self.env_kwargs)
        if int(getattr(env, "num_envs", -1)) != num_envs:
            raise UnsupportedSpecError(f"{self.label}: asked for num_envs={num_envs}, the env reports num_envs={getattr(env, 'num_envs', None)}")
        return env

    def make(self, num_envs: int, seed: int) -> TensorDictVecEnv:
        return TensorDictVecEnv(self._build(int(num_envs)), self.layout, seed, self.tokenizer, self.copy_obs, self.final_obs_key)

    def __repr__(self) -> str:
        return f"TensorDictEnv({self.label!r})"


def _has_var_kwargs(fn: Callable) -> bool:
    try:
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- entry point


def make_torch_env(name: str | Callable, kind: str, probe_num_envs: int = 1, **kwargs: Any) -> TorchRLEnv | TensorDictEnv:
    """The host env spec for `env.type` "torchrl" or "tensordict" (naming and options above).

    `name` may also be a callable (Python API): a TorchRL factory or a
    seed-contract factory. Problems with the name, the options or the env's
    specs raise `ConfigError` (exit code 2 in the CLI) naming the field or key.
    """
    if kind not in ("torchrl", "tensordict"):
        raise ConfigError(f"env.type: make_torch_env handles 'torchrl' and 'tensordict', got {kind!r}")
    options, env_kwargs = split_options(kwargs, TORCHRL_OPTIONS if kind == "torchrl" else TENSORDICT_OPTIONS)
    steps = options.get("max_episode_steps")
    if steps is not None and (not isinstance(steps, int) or steps <= 0):
        raise ConfigError(f"env.max_episode_steps: expected a positive integer, got {steps!r}")
    try:
        if kind == "torchrl":
            if callable(name):
                source = TorchRLSource(name, accepts(name, "num_envs"), getattr(name, "__name__", repr(name)))
            else:
                source = resolve_torchrl_name(name, kwargs)
            if steps is not None and (source.copy_factory is not None or accepts(source.factory, "max_episode_steps")):
                env_kwargs["max_episode_steps"] = steps  # the env applies the time limit too
            check_env_kwargs(source.copy_factory or source.factory, env_kwargs)
            return TorchRLEnv.from_source(source, options, env_kwargs, probe_num_envs)
        factory = name if callable(name) else load_callable(name, "env.name")
        if steps is not None and accepts(factory, "max_episode_steps"):
            env_kwargs["max_episode_steps"] = steps
        check_env_kwargs(factory, env_kwargs)
        return TensorDictEnv(
            factory, label=name if isinstance(name, str) else getattr(factory, "__name__", repr(factory)),
            env_kwargs=env_kwargs, max_episode_steps=steps,
            copy_obs=options.get("copy_obs", False), tokenizer=options.get("tokenizer"),
            final_obs_key=options.get("final_obs_key"), obs_keys=options.get("obs_keys"),
            probe_num_envs=probe_num_envs,
        )
    except UnsupportedSpecError as err:
        raise ConfigError(f"env.name: {name}: {err}") from err


def is_torch_env(env: Any) -> bool:
    """A TorchRL `EnvBase` (or anything stepped with TensorDicts: the seed's contract)."""
    from torchrl.envs import EnvBase

    return isinstance(env, EnvBase) or (hasattr(env, "num_envs") and hasattr(env, "step") and hasattr(env, "reset"))


def _copies_of(env: Any, batched: bool) -> Callable:
    """A factory of deep copies of `env` (the object itself is never stepped); ConfigError if it cannot be copied."""
    try:
        copy.deepcopy(env)
    except Exception as err:  # noqa: BLE001 - named for the user, who can pass a factory instead
        raise ConfigError(f"env: {type(env).__name__} cannot be copied ({type(err).__name__}: {err}); pass a "
                          "factory that builds one (env=lambda: ...)") from None

    def copies(num_envs: int) -> Any:  # a batched env: always its own count (batched_env checks it)
        return copy.deepcopy(env)

    def one_copy() -> Any:
        return copy.deepcopy(env)

    factory = copies if batched else one_copy
    factory.__name__ = type(env).__name__
    return factory


def as_torch_env(env: Any, **options: Any) -> TorchRLEnv | TensorDictEnv:
    """The host env spec for a TorchRL / TensorDict env a user holds (Python API: `Trainer(..., env=...)`).

    `env` is a TorchRL `EnvBase` or seed-contract env object, or a factory of one (a TorchRL
    factory, or a seed-contract `factory(num_envs=N)`). An object is never stepped itself: the
    trainer steps deep copies of it (training's and evaluation's copies never share state). An
    unbatched `EnvBase` is one copy (SerialEnv batches num_envs of them); a batched object (batch_size
    [N], or a seed-contract env of num_envs N) holds N copies, so trainer.num_envs (per collector)
    is N and evaluation runs rounds of N episodes (`fixed_num_envs`). `options` are the adapter
    options of `make_torch_env` (`obs_keys`, `max_episode_steps`, ...).
    """
    from torchrl.envs import EnvBase

    if isinstance(env, EnvBase) and not tuple(env.batch_size):
        return make_torch_env(_copies_of(env, batched=False), "torchrl", **options)
    if isinstance(env, EnvBase) or (hasattr(env, "num_envs") and hasattr(env, "step")):
        count = int(env.batch_size[0]) if isinstance(env, EnvBase) else int(env.num_envs)
        if isinstance(env, EnvBase) and len(env.batch_size) != 1:
            raise ConfigError(f"env: {type(env).__name__} has batch_size {list(env.batch_size)}; one batch dimension "
                              "(the env copies) is supported")
        factory = _copies_of(env, batched=True)
        if isinstance(env, EnvBase):
            options = {"batching": "native", **options}
        spec = make_torch_env(factory, "torchrl" if isinstance(env, EnvBase) else "tensordict",
                              probe_num_envs=count, **options)
        spec.fixed_num_envs = spec.default_num_envs = count
        return spec
    if callable(env):
        probe = env(num_envs=1) if accepts(env, "num_envs") else env()
        try:
            kind = "torchrl" if isinstance(probe, EnvBase) else "tensordict"
        finally:
            close = getattr(probe, "close", None)
            if callable(close):
                close()
        return make_torch_env(env, kind, **options)
    raise ConfigError(f"env: a {type(env).__name__} is neither a TorchRL / TensorDict env nor a factory of one")
