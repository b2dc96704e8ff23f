"""Environments that run on the host, outside JAX: the protocol and two adapters.

Why a second env protocol: simulators, real robots, gymnasium and TorchRL envs
cannot be traced by JAX. The async (VLA) trainer steps them from a host thread,
and the standard trainer steps them in its main loop; both speak only this
protocol, so adding a new kind of env means writing one adapter.

The protocol (numpy in, numpy out)
----------------------------------
A *spec* describes the env and builds vectorised instances:

    spec.is_host_env          True (the Trainer steps such envs on the host)
    spec.observation_space    jaxrl_vla.envs.base Box / Discrete, or a dict of them
    spec.action_space         Box or Discrete
    spec.max_episode_steps    int (bounds evaluation episodes)
    spec.reports_success      bool: step infos carry "success" at episode ends
    spec.seeded_reset         optional bool (default False): reset(seed=s) reproduces the same
                              initial states for the same s (GRPO's groups; jaxrl_vla.envs.base)
    spec.make(num_envs, seed) -> HostVecEnv

A `HostVecEnv` holds N auto-resetting copies; every array has the leading N axis:

    obs = env.reset(seed=None)                 # None: the seed given to make; pytree of np.ndarray [N, ...]
    obs, reward, terminated, truncated, info = env.step(actions)   # actions [N, ...]
    env.close()

    reward      float32 [N]
    terminated  bool [N]  true end of the episode: no bootstrap
    truncated   bool [N]  time limit: the learner bootstraps V(final_obs); both may be
                          true on the same step, then terminated wins
    obs         for a copy that finished this step, already the FIRST observation
                of its next episode (auto-reset in the same step)
    info["final_obs"]  pytree like obs [N, ...]: the observation that ended the
                       episode where terminated | truncated (any value elsewhere)
    info["success"]    optional bool [N], meaningful where the episode ended

Observations are numpy with the dtypes of `observation_space` (float32 for
real-valued boxes: JAX runs without x64). `step` may block (a real robot); the
async trainer fails the run with a clear error after `trainer.env_step_timeout`
seconds. One instance is only ever stepped by one thread.

The torch bridge implements the same protocol for TorchRL / TensorDict envs
(TensorDict leaves become nested dicts of numpy arrays, or "/"-joined keys).

Adapters here
-------------
`make_gymnasium_env(name, **kwargs)` -> `GymnasiumEnv`: gymnasium's synchronous
vector env with `autoreset_mode=SAME_STEP` (the final observation is kept in
info and the reset observation returned, matching this protocol); Box actions
are clipped to the space's bounds before stepping (the transition keeps the
sampled action, whose log-prob PPO re-scores).

`JaxHostEnv(env)` runs a JAX-native `Env` on the host through its jitted
`VecEnv` step, so every JAX env also works with the async collector.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Protocol, runtime_checkable

import jax
import numpy as np

from jaxrl_vla.envs.base import Box, Discrete, Env, supports_seeded_reset
from jaxrl_vla.envs.wrappers import VecEnv

PyTree = Any
StepResult = tuple[PyTree, np.ndarray, np.ndarray, np.ndarray, dict]


@runtime_checkable
class HostVecEnv(Protocol):
    """N auto-resetting env copies stepped with numpy arrays (see module docstring)."""

    num_envs: int

    def reset(self, seed: int | None = None) -> PyTree: ...

    def step(self, actions: np.ndarray) -> StepResult: ...

    def close(self) -> None: ...


@runtime_checkable
class HostEnvSpec(Protocol):
    """Describes a host env and makes vectorised instances (see module docstring)."""

    is_host_env: bool
    observation_space: Any
    action_space: Any
    max_episode_steps: int
    reports_success: bool

    def make(self, num_envs: int, seed: int) -> HostVecEnv: ...


def is_host_env(env: Any) -> bool:
    return bool(getattr(env, "is_host_env", False))


# --------------------------------------------------------------------------- gymnasium


def _bound(values: np.ndarray) -> float | tuple:
    """A Box bound as Box wants it: one float when uniform, else a nested tuple."""
    flat = np.asarray(values, np.float64)
    if flat.size and np.all(flat == flat.flat[0]):
        return float(flat.flat[0])

    def to_tuple(x: Any) -> Any:
        return tuple(to_tuple(v) for v in x) if isinstance(x, list) else float(x)

    return to_tuple(flat.tolist())


def convert_space(space: Any) -> Any:
    """gymnasium Discrete / Box / Dict -> jaxrl_vla Discrete / Box / dict of them."""
    import gymnasium as gym

    if isinstance(space, gym.spaces.Discrete):
        if int(space.start) != 0:
            raise ValueError(f"gymnasium Discrete spaces must start at 0, got start={space.start}")
        return Discrete(int(space.n))
    if isinstance(space, gym.spaces.Box):
        dtype = np.float32 if np.issubdtype(space.dtype, np.floating) else np.dtype(space.dtype)
        return Box(_bound(space.low), _bound(space.high), tuple(space.shape), dtype)
    if isinstance(space, gym.spaces.Dict):
        return {key: convert_space(sub) for key, sub in space.spaces.items()}
    raise ValueError(f"unsupported gymnasium space {space!r}: use Discrete, Box or Dict")


def _cast_like_space(x: Any, space: Any) -> Any:
    """Observation leaves in the dtypes of the converted space (float64 -> float32)."""
    if isinstance(space, dict):
        return {key: _cast_like_space(x[key], sub) for key, sub in space.items()}
    return np.asarray(x, dtype=space.dtype)


def _stack_final_obs(obs: PyTree, final_obs: np.ndarray | None, done: np.ndarray) -> PyTree:
    """Full [N, ...] final observations: gymnasium's per-env objects where done, `obs` elsewhere."""
    out = jax.tree_util.tree_map(np.array, obs)  # a private copy to write into
    if final_obs is None:
        return out
    for i in np.flatnonzero(done):

        def put(dst: np.ndarray, src: Any, i: int = i) -> None:
            dst[i] = src

        jax.tree_util.tree_map(put, out, final_obs[i])
    return out


def _episode_success(info: dict, done: np.ndarray) -> np.ndarray | None:
    """Success flags at episode ends (gymnasium moves the last info to "final_info")."""
    final_info = info.get("final_info", {})
    for key in ("success", "is_success"):
        if key in final_info:
            mask = final_info.get(f"_{key}", done)
            return np.logical_and(np.asarray(final_info[key], bool), np.logical_and(mask, done))
    return None


class GymnasiumVecEnv:
    """`HostVecEnv` over `gymnasium.make_vec(..., vectorization_mode="sync")`, SAME_STEP autoreset."""

    def __init__(self, name: str, num_envs: int, seed: int, observation_space: Any, action_space: Any, kwargs: dict,
                 factory: Callable[[], Any] | None = None):
        import gymnasium as gym

        self.num_envs = int(num_envs)
        self.seed = int(seed)
        self._observation_space = observation_space
        self._action_space = action_space
        if factory is not None:  # a user's env object (its spec) or callable: one fresh env per copy
            self._env = gym.vector.SyncVectorEnv([factory] * self.num_envs,
                                                 autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
            return
        self._env = gym.make_vec(
            name,
            num_envs=self.num_envs,
            vectorization_mode="sync",
            vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
            **kwargs,
        )

    def reset(self, seed: int | None = None) -> PyTree:
        obs, _ = self._env.reset(seed=self.seed if seed is None else seed)
        return _cast_like_space(obs, self._observation_space)

    def _env_actions(self, actions: np.ndarray) -> np.ndarray:
        actions = np.asarray(actions)
        if isinstance(self._action_space, Box):
            return np.clip(actions, self._action_space.low, self._action_space.high)
        return actions.astype(np.int64)

    def step(self, actions: np.ndarray) -> StepResult:
        obs, reward, terminated, truncated, info = self._env.step(self._env_actions(actions))
        obs = _cast_like_space(obs, self._observation_space)
        terminated = np.asarray(terminated, bool)
        truncated = np.asarray(truncated, bool)
        done = np.logical_or(terminated, truncated)
        out_info = {"final_obs": _cast_like_space(_stack_final_obs(obs, info.get("final_obs"), done), self._observation_space)}
        success = _episode_success(info, done)
        if success is not None:
            out_info["success"] = success
        return obs, np.asarray(reward, np.float32), terminated, truncated, out_info

    def close(self) -> None:
        self._env.close()


class GymnasiumEnv:
    """`HostEnvSpec` for a registered gymnasium id; `make` builds `GymnasiumVecEnv`s."""

    is_host_env = True

    def __init__(self, name: str, *, factory: Callable[[], Any] | None = None, **kwargs: Any):
        import gymnasium as gym

        self.factory = factory  # builds one copy instead of gym.make(name, **kwargs) (`from_object`)
        try:
            probe = gym.make(name, **kwargs) if factory is None else factory()
        except gym.error.Error as err:
            raise ValueError(f"env.name: gymnasium cannot make {name!r}: {err}") from None
        try:
            self.observation_space = convert_space(probe.observation_space)
            self.action_space = convert_space(probe.action_space)
            steps = probe.spec.max_episode_steps if probe.spec is not None else None
        finally:
            probe.close()
        self.name = name
        self.kwargs = kwargs
        self.nameable = factory is None  # config.json can name it as "gymnasium:<name>" with its kwargs
        self.max_episode_steps = int(steps) if steps else 1000
        self.reports_success = False  # success_rate is logged whenever infos carry it
        self.seeded_reset = True  # gymnasium's reset(seed=s) contract: copy i starts from seed s + i

    def make(self, num_envs: int, seed: int) -> GymnasiumVecEnv:
        return GymnasiumVecEnv(self.name, num_envs, seed, self.observation_space, self.action_space, dict(self.kwargs),
                               self.factory)

    @classmethod
    def from_object(cls, env: Any) -> "GymnasiumEnv":
        """The spec of a user's `gymnasium.Env` / `gymnasium.vector.VectorEnv` object.

        The object itself is never stepped: the trainer needs num_envs copies for training and
        num_eval_episodes for evaluation, so each copy is made afresh from the object's
        `EnvSpec` (what `gym.make` recorded: id, kwargs and the wrappers applied since, which
        `gym.make(spec)` re-applies), with the same-step auto-reset the host protocol wants."""
        import gymnasium as gym

        spec = env.spec
        if spec is None:
            raise ValueError(f"env: {type(env).__name__} was not made by gymnasium.make, so its copies cannot be "
                             "made; pass a callable instead (env=lambda: MyEnv()) or register it with gymnasium")
        if isinstance(env, gym.vector.VectorEnv):  # make_vec records its own arguments beside the env's
            kwargs = {k: v for k, v in spec.kwargs.items()
                      if k not in ("num_envs", "vectorization_mode", "vector_kwargs", "wrappers")}
            factory = functools.partial(gym.make, spec.id, **kwargs)
            out = cls(spec.id, factory=factory, **kwargs)
            out.default_num_envs = int(env.num_envs)  # the Trainer's num_envs unless given
            return out
        kwargs = dict(spec.kwargs) if not spec.additional_wrappers else None
        registered = gym.spec(spec.id).max_episode_steps if spec.id in gym.registry else None
        if kwargs is not None and spec.max_episode_steps != registered:  # gym.make(id, max_episode_steps=...)
            kwargs["max_episode_steps"] = spec.max_episode_steps
        out = cls(spec.id, factory=functools.partial(gym.make, spec), **(kwargs or {}))
        out.nameable = kwargs is not None  # wrappers applied after make cannot be written to config.json
        return out

    @classmethod
    def from_callable(cls, factory: Callable[[], Any]) -> "GymnasiumEnv":
        """The spec of a callable that returns a new `gymnasium.Env` each call (one per copy)."""
        out = cls(getattr(factory, "__name__", repr(factory)), factory=factory)
        out.nameable = False
        return out

    def __repr__(self) -> str:
        return f"GymnasiumEnv({self.name!r})"


def make_gymnasium_env(name: str, **kwargs: Any) -> GymnasiumEnv:
    """The spec of gymnasium env `name` (kwargs go to `gymnasium.make_vec`, i.e. the env)."""
    return GymnasiumEnv(name, **kwargs)


# --------------------------------------------------------------------------- JAX-native envs on the host


class JaxHostVecEnv:
    """`HostVecEnv` that steps a JAX-native env with the jitted `VecEnv.step`.

    The env state stays on the device between steps; only what the protocol
    returns is copied to the host.
    """

    def __init__(self, env: Env, num_envs: int, seed: int = 0):
        self.num_envs = int(num_envs)
        self.seed = int(seed)
        vec_env = VecEnv(env, self.num_envs)
        # compiled here (ahead of time) so the first step in a collector thread is
        # not a multi-second compile that the step timeout would mistake for a hang
        key = jax.random.PRNGKey(0)
        self._reset = jax.jit(vec_env.reset).lower(key).compile()
        state, _ = jax.eval_shape(vec_env.reset, key)
        action = jax.ShapeDtypeStruct((self.num_envs,) + tuple(env.action_space.shape), env.action_space.dtype)
        self._step = jax.jit(vec_env.step).lower(state, action).compile()
        self._action_dtype = np.dtype(env.action_space.dtype)
        self._state = None

    def reset(self, seed: int | None = None) -> PyTree:
        self._state, obs = self._reset(jax.random.PRNGKey(self.seed if seed is None else seed))
        return jax.device_get(obs)

    def step(self, actions: np.ndarray) -> StepResult:
        if self._state is None:
            raise RuntimeError("JaxHostVecEnv.step before reset")
        self._state, ts = self._step(self._state, np.asarray(actions, self._action_dtype))
        wanted = {"final_obs": ts.info["final_obs"]}
        if "success" in ts.info:
            wanted["success"] = ts.info["success"]
        obs, reward, terminated, truncated, info = jax.device_get((ts.obs, ts.reward, ts.terminated, ts.truncated, wanted))
        return obs, np.asarray(reward, np.float32), np.asarray(terminated, bool), np.asarray(truncated, bool), info

    def close(self) -> None:
        self._state = None


class JaxHostEnv:
    """`HostEnvSpec` around a JAX-native `Env` (what the async trainer uses for JAX envs)."""

    is_host_env = True

    def __init__(self, env: Env):
        self.env = env
        self.observation_space = env.observation_space
        self.action_space = env.action_space
        self.max_episode_steps = int(getattr(env, "max_episode_steps", 1000))
        self.reports_success = bool(getattr(env, "reports_success", False))
        self.seeded_reset = supports_seeded_reset(env)  # a pure reset: reset(seed) is PRNGKey(seed)'s

    def make(self, num_envs: int, seed: int) -> JaxHostVecEnv:
        return JaxHostVecEnv(self.env, num_envs, seed)

    def __repr__(self) -> str:
        return f"JaxHostEnv({self.env!r})"


def as_host_env(env: Any) -> HostEnvSpec:
    """A host env spec for `env`: host specs pass through, JAX envs get `JaxHostEnv`."""
    return env if is_host_env(env) else JaxHostEnv(env)


# --------------------------------------------------------------------------- whatever env a user holds


def _is_jax_env(env: Any) -> bool:
    return all(hasattr(env, name) for name in ("reset", "step")) and isinstance(
        getattr(env, "action_space", None), (Box, Discrete))


def _from_module(obj: Any, *packages: str) -> bool:
    return any(cls.__module__.split(".")[0] in packages for cls in type(obj).__mro__)


def as_trainer_env(env: Any, obs_keys: Any = None) -> Any:
    """Whatever env a user holds -> a JAX-native `Env` or a host env spec (what the trainers run).

    Accepted: a JAX-native env; a host env spec (passes through); an env id string (what
    `env.name` takes in a config: "CartPole-v1", "gymnasium:Acrobot-v1", "gymnax:...",
    "metaworld:..."); a `gymnasium.Env` or `gymnasium.vector.VectorEnv` made by gymnasium
    (`GymnasiumEnv.from_object`); a TorchRL `EnvBase` (`bridge.envs.as_torch_env`); a callable
    returning a new gymnasium or TorchRL env, or a seed-contract factory `f(num_envs=N)`.
    `obs_keys` (TorchRL / TensorDict envs): the observation keys the policy reads.
    Anything else raises ValueError naming its type."""
    if isinstance(env, str):
        from jaxrl_vla.build import build_env

        if obs_keys is not None:
            raise ValueError("obs_keys: give it with the env's options (a config's env.obs_keys), not with an env id")
        return build_env({"name": env})
    if _from_module(env, "torchrl"):  # first: a SerialEnv's __getattr__ recurses on any probe before it starts
        from bridge.envs import as_torch_env

        return as_torch_env(env, **({} if obs_keys is None else {"obs_keys": list(obs_keys)}))
    if is_host_env(env) or _is_jax_env(env):
        if obs_keys is not None:
            raise ValueError(f"obs_keys: {type(env).__name__} is built already; pass obs_keys where it is made "
                             "(bridge.envs.make_torch_env(..., obs_keys=[...]))")
        return env
    if _from_module(env, "gymnasium"):
        return GymnasiumEnv.from_object(env)
    seed_contract = all(hasattr(env, name) for name in ("num_envs", "reset", "step")) and "tensordict" in sys.modules
    if _from_module(env, "torchrl", "tensordict") or seed_contract or (callable(env) and obs_keys is not None):
        from bridge.envs import as_torch_env

        return as_torch_env(env, **({} if obs_keys is None else {"obs_keys": list(obs_keys)}))
    if callable(env) and not hasattr(env, "step"):
        import inspect

        try:
            takes_num_envs = "num_envs" in inspect.signature(env).parameters
        except (TypeError, ValueError):
            takes_num_envs = False
        probe = None if takes_num_envs else env()
        if probe is not None and _from_module(probe, "gymnasium"):
            probe.close()
            return GymnasiumEnv.from_callable(env)
        if probe is not None and hasattr(probe, "close"):
            probe.close()
        from bridge.envs import as_torch_env

        return as_torch_env(env)
    raise ValueError(f"env: a {type(env).__name__} is not an env the Trainer can run; give a JAX env, an env id "
                     "('CartPole-v1', 'gymnasium:Acrobot-v1'), a gymnasium env, a TorchRL env or a factory of one")
