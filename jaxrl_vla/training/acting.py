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


def act_chunk(
    apply_fn: ApplyFn,
    params: Any,
    obs_stats: RunningStats | None,
    obs: Any,
    key: jax.Array,
    deterministic: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(actions [N, H, ...], log_probs [N, H], values [N, H]) from raw observations."""
    dist, value = apply_fn(params, normalize(obs_stats, obs))
    action = dist.mode() if deterministic else dist.sample(key)
    log_prob = dist.log_prob(action)
    if value.ndim == 1:  # no chunks: add H = 1
        return action[:, None], log_prob[:, None], value[:, None]
    return action, log_prob, value


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
