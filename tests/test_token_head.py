"""Action-token head against an independent NumPy computation: quantisation, restricted log-prob/entropy,
autoregressive conditioning (same Gumbel noise, step-by-step NumPy sampler), PPO ratio 1 on re-scoring."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_vla.config import ConfigError
from jaxrl_vla.models.vla.heads.tokens import (
    TokenHeadConfig,
    bin_centers,
    bins_to_token_ids,
    quantize,
    sample,
    sample_from_noise,
    score,
    token_ids_to_bins,
)

V, NB, B = 40, 8, 5


def toy_model(seed: int = 0, depth: int = 6):
    """logits[b, d] = base[d] + (sum_{j<d} emb[tok[b, j]]) @ W: strictly causal over the action positions."""
    r = np.random.default_rng(seed)
    base = r.normal(size=(depth, V)).astype(np.float32)
    emb = r.normal(size=(V, 4)).astype(np.float32)
    w = r.normal(size=(4, V)).astype(np.float32)

    def jax_fn(ids):
        e = jnp.asarray(emb)[ids]  # [B, D, 4]
        prefix = jnp.cumsum(e, axis=1) - e  # exclusive: tokens < d
        return jnp.asarray(base)[None] + prefix @ jnp.asarray(w)

    def np_logits(prefix_ids, d):
        h = emb[prefix_ids[:, :d]].sum(axis=1) if d else np.zeros((prefix_ids.shape[0], 4), np.float32)
        return base[d][None] + h @ w  # [B, V]

    return jax_fn, np_logits


def np_restricted_logp(logits):
    z = logits[:, V - NB :][:, ::-1].astype(np.float64)  # column k = id V-1-k
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_quantise_round_trip_and_edges():
    low, high = np.array([-1.0, 0.0, 2.0]), np.array([1.0, 5.0, 3.0])
    x = np.random.default_rng(1).uniform(low, high, size=(200, 3)).astype(np.float32)
    bins = np.asarray(quantize(jnp.asarray(x), low, high, 256))
    assert bins.min() >= 0 and bins.max() <= 255
    centres = np.asarray(bin_centers(jnp.asarray(bins), low, high, 256))
    half = (high - low) / 256 / 2
    assert np.all(np.abs(centres - x) <= half + 1e-6)
    # edges: low -> bin 0, high -> last bin, out of range clipped; centres of bins map back to the bins.
    edge = np.asarray(quantize(jnp.asarray(np.stack([low, high, low - 7, high + 7])), low, high, 256))
    np.testing.assert_array_equal(edge, [[0] * 3, [255] * 3, [0] * 3, [255] * 3])
    every = jnp.arange(256)[:, None] * jnp.ones((1, 3), jnp.int32)
    np.testing.assert_array_equal(quantize(bin_centers(every, low, high, 256), low, high, 256), every)


def test_openvla_vocab_mapping():
    ids = bins_to_token_ids(jnp.arange(NB), V)
    np.testing.assert_array_equal(ids, V - 1 - np.arange(NB))  # lowest bin -> last id
    np.testing.assert_array_equal(token_ids_to_bins(ids, V), np.arange(NB))


def test_score_log_prob_entropy_restricted_to_bins():
    cfg = TokenHeadConfig(vocab_size=V, n_bins=NB)
    fn, np_logits = toy_model(depth=6)
    bins = np.random.default_rng(2).integers(0, NB, size=(B, 6))
    dist = score(fn, jnp.asarray(bins), cfg)
    ids = V - 1 - bins
    want_lp, want_ent = np.zeros(B), np.zeros(B)
    for d in range(6):
        lp = np_restricted_logp(np_logits(ids, d))
        want_lp += lp[np.arange(B), bins[:, d]]
        want_ent += -(np.exp(lp) * lp).sum(axis=1)
    np.testing.assert_allclose(dist.log_prob(jnp.asarray(bins)), want_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dist.entropy(), want_ent, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("action_shape", [(6,), (2, 3)])
def test_autoregressive_sampling_matches_numpy_and_ratio_is_one(action_shape):
    cfg = TokenHeadConfig(vocab_size=V, n_bins=NB)
    fn, np_logits = toy_model(seed=3, depth=6)
    gumbel = np.asarray(jax.random.gumbel(jax.random.PRNGKey(4), (B, 6, NB)))
    bins, logp, ent = jax.jit(lambda g: sample_from_noise(fn, g, cfg, action_shape))(jnp.asarray(gumbel))
    assert bins.shape == (B,) + action_shape
    ids = np.full((B, 6), -1)
    want_lp, want_ent = np.zeros(B), np.zeros(B)
    for d in range(6):  # NumPy step-by-step: dimension d conditioned on the tokens sampled before it
        lp = np_restricted_logp(np_logits(np.maximum(ids, 0), d))
        k = np.argmax(lp + gumbel[:, d], axis=1)
        ids[:, d] = V - 1 - k
        want_lp += lp[np.arange(B), k]
        want_ent += -(np.exp(lp) * lp).sum(axis=1)
    np.testing.assert_array_equal(np.asarray(bins).reshape(B, 6), V - 1 - ids)
    np.testing.assert_allclose(logp, want_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, want_ent, rtol=1e-5, atol=1e-5)
    # PPO: one teacher-forced call re-scores exactly the sampled tokens -> ratio 1.
    dist = score(fn, bins, cfg)
    rescored = dist.log_prob(bins)
    if len(action_shape) == 2:
        assert rescored.shape == (B, action_shape[0])  # per chunk step, like DiagGaussian
        rescored = rescored.sum(axis=-1)
    np.testing.assert_allclose(np.exp(np.asarray(rescored) - np.asarray(logp)), 1.0, atol=1e-6)


def test_conditioning_changes_later_dimensions_statistically():
    """Sampled with random keys, dimension 1's marginal given dimension 0 follows the model's conditional."""
    cfg = TokenHeadConfig(vocab_size=V, n_bins=NB)
    fn, np_logits = toy_model(seed=5, depth=2)
    n = 4000
    bins, _, _ = jax.jit(lambda k: sample(k, lambda ids: fn(ids), cfg, n, (2,)))(jax.random.PRNGKey(0))
    bins = np.asarray(bins)
    k0 = np.bincount(bins[:, 0], minlength=NB).argmax()  # the most frequent first token
    sel = bins[bins[:, 0] == k0, 1]
    prefix = np.full((1, 2), V - 1 - k0)
    want = np.exp(np_restricted_logp(np_logits(prefix, 1)))[0]
    got = np.bincount(sel, minlength=NB) / len(sel)
    assert np.abs(got - want).max() < 4.0 * np.sqrt(0.25 / len(sel)) + 0.01


def test_config_errors():
    with pytest.raises(ConfigError, match="n_bins"):
        TokenHeadConfig(vocab_size=10, n_bins=11)
    with pytest.raises(ConfigError, match="n_bins"):
        TokenHeadConfig(vocab_size=10, n_bins=1)
