"""The standard from-scratch actor-critic (separate MLP trunks, as in SB3/CleanRL), with an
optional CNN torso for image observations (`encoder`, as SB3's CnnPolicy)."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from jaxrl_vla.envs.base import Box, Discrete, policy_inputs
from jaxrl_vla.models.distributions import Categorical, DiagGaussian
from jaxrl_vla.models.encoders import ENCODERS, image_inputs, is_image, make_encoder

ACTIVATIONS = {"tanh": nn.tanh, "relu": nn.relu, "gelu": nn.gelu, "elu": nn.elu, "silu": nn.silu}


def flatten_obs(obs: Any) -> jax.Array:
    """Concatenate every leaf of an observation pytree into [B, features] float32 (privileged keys left out)."""
    leaves = jax.tree_util.tree_leaves(policy_inputs(obs))
    return _concat_flat(leaves)


def _concat_flat(leaves: Sequence[jax.Array]) -> jax.Array:
    return jnp.concatenate([x.reshape(x.shape[0], -1).astype(jnp.float32) for x in leaves], axis=-1)


def split_images(obs: Any) -> tuple[list[jax.Array], list[jax.Array]]:
    """(image leaves [B, H, W, C], every other leaf) of a batched observation, privileged keys left out."""
    leaves = jax.tree_util.tree_leaves(policy_inputs(obs))
    return [x for x in leaves if is_image(x)], [x for x in leaves if not is_image(x)]


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

    `encoder` "nature_cnn" or "impala" (`jaxrl_vla.models.encoders`): the image
    leaves ([H, W, C] per sample; uint8 scaled to [0, 1], channels of several
    images stacked) go through that CNN, shared by actor and critic as in SB3's
    CnnPolicy (one torso, so pixels cost one pass); its features, concatenated
    with every other leaf flattened (proprio, instruction ids), feed the two MLP
    trunks. "mlp" (default) flattens every leaf, images included.
    """

    action_space: Discrete | Box
    hidden_sizes: Sequence[int] = (64, 64)
    activation: str = "tanh"
    log_std_init: float = 0.0
    encoder: str = "mlp"

    def __post_init__(self) -> None:
        if type(self.action_space).__module__.startswith("gymnasium"):  # a gymnasium space works too
            from jaxrl_vla.envs.host import convert_space

            object.__setattr__(self, "action_space", convert_space(self.action_space))
        super().__post_init__()

    @nn.compact
    def __call__(self, obs: Any):
        if self.encoder not in ENCODERS:
            raise ValueError(f"policy.encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.encoder == "mlp":
            x = flatten_obs(obs)
        else:
            images, others = split_images(obs)
            if not images:
                raise ValueError(f"policy.encoder {self.encoder!r}: the observation has no image leaf "
                                 "([H, W, C] with C <= 4); use 'mlp'")
            features = make_encoder(self.encoder, name="image_encoder")(image_inputs(images))
            x = _concat_flat([features, *others])
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
