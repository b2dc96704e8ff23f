"""Acting with a policy: one inference gives an action chunk of H >= 1 steps.

Every policy is treated as chunking: a plain policy (value [N]) is a chunk of
H = 1. `act_chunk` returns the chunk, its per-step log-probs and values, all
with an explicit H axis, so collection code has a single path.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxrl_vla.training.normalizer import RunningStats, normalize

ApplyFn = Callable[[Any, Any], tuple[Any, jax.Array]]


def is_chain_policy(dist: Any) -> bool:
    """Whether `dist` scores stored sampling chains (a flow-matching head) rather than executed actions."""
    return hasattr(dist, "log_prob_and_entropy") and not hasattr(dist, "mean")


def act_chunk(
    apply_fn: ApplyFn,
    params: Any,
    obs_stats: RunningStats | None,
    obs: Any,
    key: jax.Array,
    deterministic: bool = False,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(actions [N, H, ...], log_probs [N, H], values [N, H]) from raw observations.

    `noise` (Gaussian policies): the standard-normal draw to act with instead of
    one from `key` (correlated exploration, `correlated_noise`)."""
    return act_chunk_with_info(apply_fn, params, obs_stats, obs, key, deterministic, noise)[:3]


def act_chunk_with_info(
    apply_fn: ApplyFn,
    params: Any,
    obs_stats: RunningStats | None,
    obs: Any,
    key: jax.Array,
    deterministic: bool = False,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
    """`act_chunk` plus the sample info the learner re-scores (`Transition.sample_info`; None for
    Gaussian and categorical policies).

    A flow-matching policy samples its chunk by a denoising chain whose joint
    log-density is exact, while the executed actions have none of their own: every
    step of the chunk carries the chain's log-prob, and the chain goes to the
    learner, which re-scores it under the current parameters (PPO's ratio is then the
    chunk's, weighted by each step's advantage)."""
    dist, value = apply_fn(params, normalize(obs_stats, obs))
    if is_chain_policy(dist):
        if noise is not None:
            raise ValueError("algorithm.cfg.noise_correlation: a flow-matching policy draws its own noise; use 0")
        action, log_prob, info = dist.sample(key, deterministic=deterministic)
        steps = action.shape[1]
        return action, jnp.broadcast_to(log_prob[:, None], (action.shape[0], steps)), value, info
    if deterministic:
        action = dist.mode()
    elif noise is not None:
        action = dist.sample_from_noise(noise)
    else:
        action = dist.sample(key)
    log_prob = dist.log_prob(action)
    if value.ndim == 1:  # no chunks: add H = 1
        return action[:, None], log_prob[:, None], value[:, None], None
    return action, log_prob, value, None


def correlated_noise(previous: jax.Array, key: jax.Array, correlation: float) -> jax.Array:
    """The next draw of an AR(1) process with standard-normal marginals:
    rho * previous + sqrt(1 - rho^2) * z. Each draw alone is N(0, 1), so the action it makes
    is a sample of the policy's Gaussian and its log-prob the policy's; consecutive draws
    share a fraction rho, so exploration keeps a direction for ~1 / (1 - rho) steps instead of
    averaging out (a route around an obstacle needs several steps off the mean's line)."""
    fresh = jax.random.normal(key, previous.shape, previous.dtype)
    return correlation * previous + jnp.sqrt(1.0 - correlation**2) * fresh


def state_value(apply_fn: ApplyFn, params: Any, obs_stats: RunningStats | None, obs: Any) -> jax.Array:
    """V(obs) [N] of the first step of a fresh chunk (what bootstrapping needs)."""
    value = apply_fn(params, normalize(obs_stats, obs))[1]
    return value if value.ndim == 1 else value[:, 0]


def value_where(
    apply_fn: ApplyFn, params: Any, obs_stats: RunningStats | None, obs: Any, mask: jax.Array
) -> jax.Array:
    """V(obs) where `mask`, 0 elsewhere; skips the forward pass when no entry needs it.

    Truncations are rare (once per episode), so the extra value pass for the final
    observation runs only on the steps that have one.
    """
    return jax.lax.cond(
        jnp.any(mask),
        lambda: jnp.where(mask, state_value(apply_fn, params, obs_stats, obs), 0.0),
        lambda: jnp.zeros(mask.shape, jnp.float32),
    )
