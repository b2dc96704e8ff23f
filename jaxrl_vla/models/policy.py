"""The Policy interface shared by ActorCritic and VLAPolicy.

A policy is a `flax.linen.Module` whose `__call__(obs)` maps a batch of
observations (a pytree whose leaves lead with the batch axis B) to

    (dist, value)   dist: Categorical | DiagGaussian with batch shape [B]
                          (or [B, H] for action chunks of H steps),
                    value: [B] float32 state values.

One forward pass serves acting (sample + log_prob), evaluation (mode) and the
PPO loss (log_prob, entropy, value), so the Trainer, both buffers and both modes
treat every policy the same. The seed's method names are provided as pure
helpers below for users who think in them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn


Params = Any


def act(policy: nn.Module, params: Params, obs: Any, key: jax.Array, deterministic: bool = False):
    """Sample (or take the mode of) an action; returns (action, log_prob, value)."""
    dist, value = policy.apply(params, obs)
    action = dist.mode() if deterministic else dist.sample(key)
    return action, dist.log_prob(action), value


def get_value(policy: nn.Module, params: Params, obs: Any) -> jax.Array:
    """The seed's `get_value`: value estimates of shape [B]."""
    return policy.apply(params, obs)[1]


def evaluate_actions(policy: nn.Module, params: Params, obs: Any, actions: jax.Array):
    """The seed's `evaluate_actions`: (log_prob [B], entropy [B], value [B])."""
    dist, value = policy.apply(params, obs)
    return dist.log_prob(actions), dist.entropy(), value


def action_chunk_size(policy: nn.Module) -> int:
    """Number of actions a policy emits per inference (1 unless it chunks)."""
    return int(getattr(policy, "action_chunk", 1))


def zeros_like_obs(space: Any, batch: int = 1) -> Any:
    """A batch of zero observations matching an observation space (for `init`)."""
    if isinstance(space, dict):
        return {k: zeros_like_obs(v, batch) for k, v in space.items()}
    return jnp.zeros((batch,) + tuple(space.shape), space.dtype)
