"""Action distributions as small pytree dataclasses.

Both are pure and jittable; `log_prob` and `entropy` reduce over the event
dimensions so that for a batch of shape [B] they return [B], and for action
chunks (mean [B, H, A]) they return [B, H]: the caller picks the executed step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

_LOG_2PI = math.log(2.0 * math.pi)


@struct.dataclass
class Categorical:
    """Categorical over the last axis of `logits`."""

    logits: jax.Array

    def _log_probs(self) -> jax.Array:
        return jax.nn.log_softmax(self.logits, axis=-1)

    def sample(self, key: jax.Array) -> jax.Array:
        return jax.random.categorical(key, self.logits, axis=-1).astype(jnp.int32)

    def mode(self) -> jax.Array:
        return jnp.argmax(self.logits, axis=-1).astype(jnp.int32)

    def log_prob(self, action: jax.Array) -> jax.Array:
        logp = self._log_probs()
        return jnp.take_along_axis(logp, action.astype(jnp.int32)[..., None], axis=-1)[..., 0]

    def entropy(self) -> jax.Array:
        logp = self._log_probs()
        return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


@struct.dataclass
class DiagGaussian:
    """Diagonal Gaussian over the last axis (the action dimension)."""

    mean: jax.Array
    log_std: jax.Array  # broadcastable to mean

    def sample(self, key: jax.Array) -> jax.Array:
        return self.sample_from_noise(jax.random.normal(key, self.mean.shape, self.mean.dtype))

    def sample_from_noise(self, noise: jax.Array) -> jax.Array:
        """The action for standard-normal `noise` of the mean's shape (correlated exploration supplies its own)."""
        return self.mean + jnp.exp(self.log_std) * noise

    def mode(self) -> jax.Array:
        return self.mean

    def log_prob(self, action: jax.Array) -> jax.Array:
        log_std = jnp.broadcast_to(self.log_std, self.mean.shape)
        z = (action - self.mean) * jnp.exp(-log_std)
        return jnp.sum(-0.5 * z * z - log_std - 0.5 * _LOG_2PI, axis=-1)

    def entropy(self) -> jax.Array:
        log_std = jnp.broadcast_to(self.log_std, self.mean.shape)
        return jnp.sum(log_std + 0.5 * (1.0 + _LOG_2PI), axis=-1)


Distribution = Categorical | DiagGaussian
