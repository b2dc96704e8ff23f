"""Jitted collection from JAX-native envs: `lax.scan` over vmapped env steps.

With action chunks of H steps the scan is nested: the outer scan runs one
inference per chunk, the inner scan executes its H actions. Chunk boundaries are
shared by all envs; an env that resets mid-chunk finishes the chunk's remaining
actions in its new episode (GAE does not cross the boundary).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from jaxrl_vla.envs.wrappers import VecEnv, VecEnvState
from jaxrl_vla.training.acting import (ApplyFn, act_chunk, act_chunk_with_info, correlated_noise, state_value,
                                       value_where)
from jaxrl_vla.training.normalizer import RunningStats, normalize
from jaxrl_vla.types import Transition

ObsEncoder = Callable[[Any, Any], Any]  # (params, obs) -> obs the policy also accepts


@struct.dataclass
class EpisodeStats:
    """Sums over the episodes that ended during a rollout (host divides)."""

    count: jax.Array
    return_sum: jax.Array
    length_sum: jax.Array
    success_sum: jax.Array


def episode_stats(info: dict) -> EpisodeStats:
    done = info["done"].astype(jnp.float32)
    success = info.get("success", jnp.zeros_like(info["done"])).astype(jnp.float32)
    return EpisodeStats(
        done.sum(),
        (info["episode_return"] * done).sum(),
        (info["episode_length"].astype(jnp.float32) * done).sum(),
        (success * done).sum(),
    )


def _add_stats(a: EpisodeStats, b: EpisodeStats) -> EpisodeStats:
    return jax.tree_util.tree_map(jnp.add, a, b)


def make_rollout_fn(
    apply_fn: ApplyFn,
    vec_env: VecEnv,
    num_steps: int,
    chunk: int = 1,
    obs_encoder: ObsEncoder | None = None,
    noise_correlation: float = 0.0,
) -> Callable[..., tuple[VecEnvState, Any, Transition, jax.Array, EpisodeStats]]:
    """Build `rollout(params, obs_stats, env_state, obs, key, version)`.

    Returns (env_state, obs, transitions [T, N], last_value [N], EpisodeStats).
    Pure and traceable: the Trainer jits it inside the whole iteration.

    `obs_encoder(params, obs)`: the part of the policy that training does not
    change (a frozen vision encoder, `frozen_vision_encoder`), run once per
    collected observation; the policy acts on its output and the transitions
    store it, so the update's epochs reuse it. Only for raw observations
    (no running normalisation). The returned `obs` stays the env's.

    `noise_correlation` rho > 0 (Gaussian policies): each inference's exploration
    noise is an AR(1) step from the previous one (`correlated_noise`), per env and
    action entry; the process starts afresh (stationary) at each rollout.
    """
    if num_steps % chunk:
        raise ValueError(f"trainer.buffer_size ({num_steps}) must be a multiple of policy.action_chunk ({chunk})")

    def rollout(params, obs_stats: RunningStats | None, env_state, obs, key, version):
        def policy_input(env_obs):
            return env_obs if obs_encoder is None else obs_encoder(params, env_obs)

        def run_chunk(carry, chunk_key):
            env_state, env_obs, noise = carry
            chunk_obs = policy_input(env_obs)
            if noise is not None:
                noise = correlated_noise(noise, chunk_key, noise_correlation)
            actions, log_probs, values, sample_info = act_chunk_with_info(apply_fn, params, obs_stats, chunk_obs,
                                                                          chunk_key, noise=noise)

            def env_step(inner, j):
                env_state, obs = inner
                env_state, ts = vec_env.step(env_state, actions[:, j])
                transition = Transition(
                    obs=chunk_obs,
                    action=actions[:, j],
                    log_prob=log_probs[:, j],
                    value=values[:, j],
                    reward=ts.reward.astype(jnp.float32),
                    terminated=ts.terminated,
                    truncated=ts.truncated,
                    final_value=value_where(apply_fn, params, obs_stats, ts.info["final_obs"], ts.truncated),
                    chunk_index=jnp.full(ts.reward.shape, j, jnp.int32),
                    policy_version=jnp.full(ts.reward.shape, version, jnp.int32),
                    sample_info=sample_info,
                )
                return (env_state, ts.obs), (transition, episode_stats(ts.info))

            (env_state, env_obs), out = jax.lax.scan(env_step, (env_state, env_obs), jnp.arange(actions.shape[1]))
            return (env_state, env_obs, noise), out

        noise = None
        if noise_correlation > 0:
            noise_key, key = jax.random.split(key)
            mean = jax.eval_shape(lambda: apply_fn(params, normalize(obs_stats, policy_input(obs)))[0].mean)
            noise = jax.random.normal(noise_key, mean.shape, mean.dtype)
        keys = jax.random.split(key, num_steps // chunk)
        (env_state, obs, _), (transitions, stats) = jax.lax.scan(run_chunk, (env_state, obs, noise), keys)
        transitions = jax.tree_util.tree_map(lambda x: x.reshape((num_steps,) + x.shape[2:]), transitions)
        stats = jax.tree_util.tree_map(jnp.sum, stats)
        last_value = state_value(apply_fn, params, obs_stats, obs)
        return env_state, obs, transitions, last_value, stats

    return rollout


def make_evaluate_fn(
    apply_fn: ApplyFn,
    vec_env: VecEnv,
    max_steps: int,
    chunk: int = 1,
    constrain: Callable[[Any], Any] | None = None,
):
    """Build `evaluate(params, obs_stats, key) -> EpisodeStats` of the FIRST episode of
    each of the vec_env's N envs, with deterministic (mode) actions.

    `constrain` (`sharding.env_batch_constraint`) places the freshly reset env
    batch on the mesh, so that the episodes are split over the devices."""
    num_chunks = -(-max_steps // chunk)

    def evaluate(params, obs_stats, key):
        env_state, obs = vec_env.reset(key)
        if constrain is not None:
            env_state, obs = constrain((env_state, obs))
        n = vec_env.num_envs
        init = (env_state, obs, jnp.zeros((n,), bool), EpisodeStats(*(jnp.zeros((n,)) for _ in range(4))))

        def run_chunk(carry, _):
            env_state, obs, finished, acc = carry
            actions, _, _ = act_chunk(apply_fn, params, obs_stats, obs, key, deterministic=True)

            def env_step(inner, j):
                env_state, obs, finished, acc = inner
                env_state, ts = vec_env.step(env_state, actions[:, j])
                first_end = jnp.logical_and(ts.info["done"], ~finished)
                success = ts.info.get("success", jnp.zeros_like(first_end)).astype(jnp.float32)
                acc = EpisodeStats(
                    acc.count + first_end,
                    acc.return_sum + jnp.where(first_end, ts.info["episode_return"], 0.0),
                    acc.length_sum + jnp.where(first_end, ts.info["episode_length"], 0),
                    acc.success_sum + jnp.where(first_end, success, 0.0),
                )
                return (env_state, ts.obs, finished | ts.info["done"], acc), None

            inner, _ = jax.lax.scan(env_step, (env_state, obs, finished, acc), jnp.arange(actions.shape[1]))
            return inner, None

        (_, _, _, acc), _ = jax.lax.scan(run_chunk, init, None, length=num_chunks)
        return jax.tree_util.tree_map(jnp.sum, acc)

    return evaluate
