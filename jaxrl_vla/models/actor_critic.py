"""The standard from-scratch actor-critic (separate MLP trunks, as in SB3/CleanRL)."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from jaxrl_vla.envs.base import Box, Discrete, policy_inputs
from jaxrl_vla.models.distributions import Categorical, DiagGaussian

ACTIVATIONS = {"tanh": nn.tanh, "relu": nn.relu, "gelu": nn.gelu, "elu": nn.elu, "silu": nn.silu}


def flatten_obs(obs: Any) -> jax.Array:
    """Concatenate every leaf of an observation pytree into [B, features] float32 (privileged keys left out)."""
    leaves = jax.tree_util.tree_leaves(policy_inputs(obs))
    return jnp.concatenate([x.reshape(x.shape[0], -1).astype(jnp.float32) for x in leaves], axis=-1)


class MLP(nn.Module):
    hidden_sizes: Sequence[int]
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        for width in self.hidden_sizes:
            x = act(nn.Dense(width, kernel_init=nn.initializers.orthogonal(np.sqrt(2.0)))(x))
        return x


class ActorCritic(nn.Module):
    """MLP policy and value networks over flattened observations.

    Discrete action spaces get a categorical head; Box spaces a diagonal
    Gaussian whose log-std is a learned, state-independent parameter.
    """

    action_space: Discrete | Box
    hidden_sizes: Sequence[int] = (64, 64)
    activation: str = "tanh"
    log_std_init: float = 0.0

    @nn.compact
    def __call__(self, obs: Any):
        x = flatten_obs(obs)
        actor = MLP(self.hidden_sizes, self.activation, name="actor_trunk")(x)
        critic = MLP(self.hidden_sizes, self.activation, name="critic_trunk")(x)
        value = nn.Dense(1, kernel_init=nn.initializers.orthogonal(1.0), name="value_head")(critic)[..., 0]
        small = nn.initializers.orthogonal(0.01)
        if isinstance(self.action_space, Discrete):
            logits = nn.Dense(self.action_space.n, kernel_init=small, name="policy_head")(actor)
            return Categorical(logits), value
        (action_dim,) = self.action_space.shape
        mean = nn.Dense(action_dim, kernel_init=small, name="policy_head")(actor)
        log_std = self.param("log_std", nn.initializers.constant(self.log_std_init), (action_dim,))
        return DiagGaussian(mean, log_std), value
