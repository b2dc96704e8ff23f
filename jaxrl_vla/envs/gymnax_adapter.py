"""Use any gymnax environment through this package's `Env` protocol.

gymnax is optional: it is imported only when an env is made by name, and a
missing install gives an ImportError that says how to fix it.

Two things differ between gymnax and `Env`, and the adapter bridges both:

* gymnax's `step` auto-resets and needs a key per call. We call the
  non-resetting `step_env`/`reset_env` instead (VecEnv does the resetting and
  keeps `final_obs`) and carry the PRNG key inside the adapter's state.
* termination vs. truncation. gymnax < 1.0 merges them into one `done`; we split
  it with the time limit: truncated = done & (time >= max_steps_in_episode),
  terminated = done & ~truncated (a true termination on the very last step is
  then reported as truncation only; gymnax gives no way to tell). gymnax >= 1.0
  already returns `terminated` from `step_env` and exposes `is_truncated`; we use
  those directly, so both flags can be true on the last step, as in gymnasium.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxrl_vla.envs.base import Box, Discrete, PyTree, TimeStep

_INSTALL_HINT = "gymnax is not installed; `pip install gymnax` to use gymnax envs"


@struct.dataclass
class GymnaxState:
    """gymnax's own env state plus the key its `step_env` consumes."""

    env_state: PyTree
    key: jax.Array


def _import_gymnax() -> Any:
    """Import gymnax on demand so the rest of the package never depends on it."""
    try:
        import gymnax
    except ImportError as err:
        missing = getattr(err, "name", None)
        if missing and missing.split(".")[0] != "gymnax":  # installed, but one of its imports is not
            raise ImportError(f"gymnax is installed but importing it failed: {err} "
                              f"(`pip install {missing.split('.')[0]}`; gymnax 1.0.1 imports six "
                              f"without declaring it)") from err
        raise ImportError(_INSTALL_HINT) from err
    return gymnax


def _as_static(bound: Any) -> float | tuple:
    """Space bounds must be hashable (they are static pytree fields): floats or nested tuples."""
    arr = np.asarray(bound, dtype=np.float64)
    return float(arr) if arr.ndim == 0 else tuple(arr.tolist())


def convert_space(space: Any) -> Any:
    """Map a gymnax Discrete/Box onto ours (duck-typed); other spaces pass through unchanged."""
    if hasattr(space, "n"):
        return Discrete(int(space.n))
    if all(hasattr(space, a) for a in ("low", "high", "shape")):
        dtype = getattr(space, "dtype", jnp.float32)
        return Box(_as_static(space.low), _as_static(space.high), tuple(space.shape), dtype)
    return space


def split_done(
    done: jax.Array, time: jax.Array, max_steps: int
) -> tuple[jax.Array, jax.Array]:
    """Split gymnax < 1.0's merged `done` into (terminated, truncated) by the time limit."""
    done = jnp.asarray(done, bool)
    truncated = done & (time >= max_steps)
    return done & ~truncated, truncated


class GymnaxEnv:
    """A gymnax env (given by registered id or as an instance) as an `Env`.

    `params` override fields of the env's `default_params`, e.g.
    `GymnaxEnv("CartPole-v1", max_steps_in_episode=200)`.
    """

    def __init__(self, env_name_or_env: Any, **params: Any):
        if isinstance(env_name_or_env, str):
            gymnax = _import_gymnax()
            env, default_params = gymnax.make(env_name_or_env)
        else:
            env, default_params = env_name_or_env, env_name_or_env.default_params
        self.env = env
        self.params = default_params.replace(**params) if params else default_params
        # gymnax >= 1.0 separates truncation itself; older versions merge it into done.
        self._splits_truncation = hasattr(env, "is_truncated")
        # Converted once, here: gymnax builds its bounds with jnp ops (CartPole's `-high`), and converting
        # them to static floats inside a trace (the Trainer initialises the policy inside jit) fails.
        with jax.ensure_compile_time_eval():
            self._observation_space = convert_space(env.observation_space(self.params))
            self._action_space = convert_space(env.action_space(self.params))

    @property
    def observation_space(self) -> Any:
        return self._observation_space

    @property
    def action_space(self) -> Any:
        return self._action_space

    @property
    def max_episode_steps(self) -> int:
        return int(self.params.max_steps_in_episode)

    def reset(self, key: jax.Array) -> tuple[GymnaxState, PyTree]:
        """Reset with one half of the key; keep the other half for future steps."""
        reset_key, carry_key = jax.random.split(key)
        obs, env_state = self.env.reset_env(reset_key, self.params)
        return GymnaxState(env_state, carry_key), obs

    def step(self, state: GymnaxState, action: jax.Array) -> tuple[GymnaxState, TimeStep]:
        """One non-resetting gymnax step with terminated/truncated kept apart."""
        step_key, carry_key = jax.random.split(state.key)
        obs, env_state, reward, flag, info = self.env.step_env(
            step_key, state.env_state, action, self.params
        )
        if self._splits_truncation:
            terminated = jnp.asarray(flag, bool)
            truncated = jnp.asarray(self.env.is_truncated(env_state, self.params), bool)
        else:
            terminated, truncated = split_done(flag, env_state.time, self.max_episode_steps)
        ts = TimeStep(obs, jnp.asarray(reward, jnp.float32), terminated, truncated, dict(info))
        return GymnaxState(env_state, carry_key), ts
