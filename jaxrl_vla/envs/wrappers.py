"""Batching, auto-reset and episode statistics for JAX-native envs.

`VecEnv` turns a single-instance `Env` into N vmapped copies. When a copy's
episode ends (terminated or truncated) it is reset inside the same jitted step,
and the observation that ended the episode is kept in `info["final_obs"]` so the
learner can bootstrap V(final_obs) on truncation (MuJoCo Playground dropped it;
its users measured the bias).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxrl_vla.envs.base import Env, PyTree, TimeStep


@struct.dataclass
class VecEnvState:
    """State of N env copies plus what auto-reset and episode stats need."""

    env_state: PyTree
    key: jax.Array  # [N] keys, one per copy, for its next reset
    episode_return: jax.Array  # [N] running return of the current episode
    episode_length: jax.Array  # [N] running length of the current episode


def _select(mask: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    """Per-env `where` over matching pytrees whose leaves lead with the batch axis."""

    def pick(a: jax.Array, b: jax.Array) -> jax.Array:
        m = mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim))
        return jnp.where(m, a, b)

    return jax.tree_util.tree_map(pick, on_true, on_false)


class VecEnv:
    """N auto-resetting copies of `env`, stepped together by `vmap`.

    `step` returns a TimeStep whose `obs` is already the first observation of the
    next episode for copies that finished; `info` adds:
      final_obs       the observation that ended the step (before any reset)
      done            terminated | truncated
      episode_return  return of the episode that just ended (valid where done)
      episode_length  its length (valid where done)
    """

    def __init__(self, env: Env, num_envs: int):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.env = env
        self.num_envs = num_envs

    @property
    def observation_space(self) -> Any:
        return self.env.observation_space

    @property
    def action_space(self) -> Any:
        return self.env.action_space

    def reset(self, key: jax.Array) -> tuple[VecEnvState, PyTree]:
        reset_keys, next_keys = jnp.split(jax.random.split(key, 2 * self.num_envs), 2)
        env_state, obs = jax.vmap(self.env.reset)(reset_keys)
        zeros = jnp.zeros((self.num_envs,), jnp.float32)
        state = VecEnvState(env_state, next_keys, zeros, jnp.zeros((self.num_envs,), jnp.int32))
        return state, obs

    def step(self, state: VecEnvState, action: jax.Array) -> tuple[VecEnvState, TimeStep]:
        env_state, ts = jax.vmap(self.env.step)(state.env_state, action)
        done = jnp.logical_or(ts.terminated, ts.truncated)
        ep_return = state.episode_return + ts.reward.astype(jnp.float32)
        ep_length = state.episode_length + 1

        split = jax.vmap(lambda k: jax.random.split(k, 2))(state.key)
        reset_keys, next_keys = split[:, 0], split[:, 1]
        reset_state, reset_obs = jax.vmap(self.env.reset)(reset_keys)
        env_state = _select(done, reset_state, env_state)
        obs = _select(done, reset_obs, ts.obs)
        key = _select(done, next_keys, state.key)

        info = dict(ts.info)
        info.update(
            final_obs=ts.obs,
            done=done,
            episode_return=ep_return,
            episode_length=ep_length,
        )
        new_state = VecEnvState(
            env_state=env_state,
            key=key,
            episode_return=jnp.where(done, 0.0, ep_return),
            episode_length=jnp.where(done, 0, ep_length),
        )
        return new_state, TimeStep(obs, ts.reward, ts.terminated, ts.truncated, info)
