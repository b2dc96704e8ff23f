"""Discrete action-token head (RT-2 / OpenVLA): actions as bin tokens at the end of the LM vocabulary.

Quantisation: each action dimension's range [low, high] is cut into `n_bins`
uniform bins (n_bins + 1 edges); bin k's action is its centre
low + (k + 0.5) (high - low) / n_bins, so a value's bin centre is within half a
bin of it (values outside [low, high] are clipped first).

Vocabulary mapping, OpenVLA's convention (prismatic/vla/action_tokenizer.py:
`token = vocab_size - digitize(action, bins)`): the bins occupy the last n_bins
ids, in reverse order, bin k (lowest action first) -> id vocab_size - 1 - k.
(OpenVLA builds 256 edges, so its 256 ids hold 255 centres; here n_bins edges+1
give n_bins real bins, the issue's "n_bins uniform bins".)

Policy: the D action tokens (D = A, or H * A for an action chunk, in row-major
order: step h, dimension a) are generated autoregressively, dimension d
conditioned on the sampled tokens < d. The probability of a token is the softmax
of the LM's logits restricted to the n_bins bin ids (other ids can never be
sampled); log-prob = sum over dimensions, entropy = sum of the restricted
per-dimension entropies given the sampled prefix.

The model is any `logits_fn(token_ids [B, D]) -> logits [B, D, V]` that is causal
over the D action positions (position d sees the prompt and the tokens < d, as
an LM fed prefix + action tokens does with teacher forcing). Sampling runs D
calls under lax.scan (no kv cache: generic, and D is small); re-scoring stored
tokens is one call (`score`), which gives all D log-probs at once.

What the rollout stores: the bin indices (int32 [B, D] or [B, H, A]), not the
continuous actions. They are exact (re-scoring needs the very tokens sampled;
bin centres -> bins is invertible only up to float error), and `bin_centers`
turns them into the env action. PPO's `dist.log_prob(stored_bins)` then uses the
`ActionTokenDist` that `score` built from the same stored bins.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from jaxrl_vla.config import ConfigError

LogitsFn = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class TokenHeadConfig:
    """`n_bins` per dimension over [low, high] (per-dimension arrays or scalars); `vocab_size` of the LM."""

    vocab_size: int
    n_bins: int = 256

    def __post_init__(self) -> None:
        if self.n_bins < 2:
            raise ConfigError(f"policy.action_head.n_bins must be >= 2, got {self.n_bins}")
        if self.n_bins > self.vocab_size:
            raise ConfigError(
                f"policy.action_head.n_bins ({self.n_bins}) exceeds the LM vocabulary size ({self.vocab_size})"
            )


def quantize(x: jax.Array, low: jax.Array, high: jax.Array, n_bins: int) -> jax.Array:
    """Bin index in [0, n_bins) of each value (clipped to [low, high]; `high` itself falls in the last bin)."""
    low = jnp.asarray(low, jnp.float32)
    high = jnp.asarray(high, jnp.float32)
    u = (jnp.clip(x, low, high) - low) / (high - low)
    return jnp.clip(jnp.floor(u * n_bins), 0, n_bins - 1).astype(jnp.int32)


def bin_centers(bins: jax.Array, low: jax.Array, high: jax.Array, n_bins: int) -> jax.Array:
    """The action of each bin index: its bin's centre."""
    low = jnp.asarray(low, jnp.float32)
    high = jnp.asarray(high, jnp.float32)
    return low + (bins.astype(jnp.float32) + 0.5) * (high - low) / n_bins


def bins_to_token_ids(bins: jax.Array, vocab_size: int) -> jax.Array:
    """OpenVLA's mapping: bin k -> vocabulary id vocab_size - 1 - k."""
    return (vocab_size - 1 - bins).astype(jnp.int32)


def token_ids_to_bins(ids: jax.Array, vocab_size: int) -> jax.Array:
    """Inverse of `bins_to_token_ids`."""
    return (vocab_size - 1 - ids).astype(jnp.int32)


def restrict_logits(logits: jax.Array, n_bins: int) -> jax.Array:
    """[..., V] -> [..., n_bins] in bin order (column k is id V - 1 - k), float32."""
    return jnp.flip(logits[..., logits.shape[-1] - n_bins :], axis=-1).astype(jnp.float32)


@struct.dataclass
class ActionTokenDist:
    """Per-dimension categoricals over bins, given the (teacher-forced) prefix; reduces over the last axis.

    `bin_logits` [..., A, n_bins]: for chunks [B, H, A, n_bins], so `log_prob`
    and `entropy` are [B, H] like DiagGaussian's (the per-step factors of the
    joint autoregressive density, which multiply to it). Only valid for the
    bins the logits were conditioned on (see `score`).
    """

    bin_logits: jax.Array

    def _log_probs(self) -> jax.Array:
        return jax.nn.log_softmax(self.bin_logits, axis=-1)

    def log_prob(self, bins: jax.Array) -> jax.Array:
        lp = jnp.take_along_axis(self._log_probs(), bins.astype(jnp.int32)[..., None], axis=-1)[..., 0]
        return jnp.sum(lp, axis=-1)

    def entropy(self) -> jax.Array:
        lp = self._log_probs()
        return jnp.sum(-jnp.sum(jnp.exp(lp) * lp, axis=-1), axis=-1)

    def mode(self) -> jax.Array:
        """Per-dimension argmax given the conditioned prefix (greedy decoding is `sample(..., greedy=True)`)."""
        return jnp.argmax(self.bin_logits, axis=-1).astype(jnp.int32)


def _flat(bins: jax.Array, batch_ndim: int = 1) -> jax.Array:
    return bins.reshape(bins.shape[:batch_ndim] + (-1,))


def score(logits_fn: LogitsFn, bins: jax.Array, cfg: TokenHeadConfig) -> ActionTokenDist:
    """Teacher-forced re-scoring: one `logits_fn` call over the stored bins [B, *action_shape]."""
    ids = bins_to_token_ids(_flat(bins), cfg.vocab_size)
    bin_logits = restrict_logits(logits_fn(ids), cfg.n_bins)
    return ActionTokenDist(bin_logits.reshape(bins.shape + (cfg.n_bins,)))


def sample_from_noise(
    logits_fn: LogitsFn, gumbel: jax.Array, cfg: TokenHeadConfig, action_shape: tuple[int, ...]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Autoregressive Gumbel-max sampling with the given noise [B, D, n_bins] (zeros: greedy).

    Step d calls `logits_fn` on the tokens so far (positions >= d hold a
    placeholder that a causal model never reads for position d) and picks
    argmax(restricted logits[:, d] + gumbel[:, d]). Returns (bins [B,
    *action_shape], log_prob [B], entropy [B]), both summed over all D.
    """
    batch, depth = gumbel.shape[0], gumbel.shape[1]
    placeholder = jnp.full((batch, depth), cfg.vocab_size - 1, jnp.int32)

    def step(carry, d):
        ids, logp, ent = carry
        row = jax.lax.dynamic_index_in_dim(logits_fn(ids), d, axis=1, keepdims=False)
        lp = jax.nn.log_softmax(restrict_logits(row, cfg.n_bins), axis=-1)
        noise = jax.lax.dynamic_index_in_dim(gumbel, d, axis=1, keepdims=False)
        k = jnp.argmax(lp + noise, axis=-1).astype(jnp.int32)
        ids = jax.lax.dynamic_update_index_in_dim(ids, bins_to_token_ids(k, cfg.vocab_size), d, axis=1)
        logp = logp + jnp.take_along_axis(lp, k[:, None], axis=-1)[:, 0]
        ent = ent - jnp.sum(jnp.exp(lp) * lp, axis=-1)
        return (ids, logp, ent), None

    zeros = jnp.zeros((batch,), jnp.float32)
    (ids, logp, ent), _ = jax.lax.scan(step, (placeholder, zeros, zeros), jnp.arange(depth))
    return token_ids_to_bins(ids, cfg.vocab_size).reshape((batch,) + tuple(action_shape)), logp, ent


def sample(
    key: jax.Array,
    logits_fn: LogitsFn,
    cfg: TokenHeadConfig,
    batch: int,
    action_shape: tuple[int, ...],
    greedy: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sample bins [B, *action_shape] (A or (H, A)) autoregressively; see `sample_from_noise`."""
    depth = 1
    for n in action_shape:
        depth *= n
    shape = (batch, depth, cfg.n_bins)
    gumbel = jnp.zeros(shape, jnp.float32) if greedy else jax.random.gumbel(key, shape, jnp.float32)
    return sample_from_noise(logits_fn, gumbel, cfg, action_shape)
