"""The PPO loss against values computed by hand, and the update's masking rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_vla.algo import ppo
from jaxrl_vla.models.distributions import Categorical, DiagGaussian
from jaxrl_vla.types import Batch


def linear_policy(params, obs):
    """A policy whose log-probs are easy to compute by hand: logits = obs @ W."""
    return Categorical(obs @ params["w"]), obs @ params["v"]


def make_batch(n=4):
    obs = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, -0.5]])[:n]
    return Batch(
        obs=obs,
        action=jnp.array([0, 1, 1, 0])[:n],
        log_prob=jnp.log(jnp.array([0.5, 0.4, 0.6, 0.5]))[:n],
        value=jnp.array([0.0, 1.0, 0.5, -1.0])[:n],
        advantage=jnp.array([1.0, -2.0, 0.5, 3.0])[:n],
        returns=jnp.array([1.0, 0.0, 2.0, 0.0])[:n],
        chunk_index=jnp.zeros((n,), jnp.int32),
    )


def test_loss_matches_hand_computation():
    params = {"w": jnp.array([[0.3, -0.2], [0.1, 0.4]]), "v": jnp.array([0.5, -0.5])}
    batch = make_batch()
    cfg = ppo.PPOConfig(clip_coef=0.2, vf_coef=0.5, ent_coef=0.01, vf_clip_coef=0.1, normalize_advantage=False)
    loss, m = ppo.ppo_loss(params, linear_policy, batch, cfg)

    obs, w, v = np.asarray(batch.obs), np.asarray(params["w"]), np.asarray(params["v"])
    logits = obs @ w
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    new_logp = np.log(probs[np.arange(4), np.asarray(batch.action)])
    ratio = np.exp(new_logp - np.asarray(batch.log_prob))
    adv = np.asarray(batch.advantage)
    pg = -np.mean(np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv))
    value = obs @ v
    old_v, ret = np.asarray(batch.value), np.asarray(batch.returns)
    v_clipped = old_v + np.clip(value - old_v, -0.1, 0.1)
    vl = 0.5 * np.mean(np.maximum((value - ret) ** 2, (v_clipped - ret) ** 2))
    ent = np.mean(-(probs * np.log(probs)).sum(1))
    assert float(m["loss/policy"]) == pytest.approx(pg, rel=1e-5)
    assert float(m["loss/value"]) == pytest.approx(vl, rel=1e-5)
    assert float(m["loss/entropy"]) == pytest.approx(ent, rel=1e-5)
    assert float(loss) == pytest.approx(pg + 0.5 * vl - 0.01 * ent, rel=1e-5)
    log_ratio = new_logp - np.asarray(batch.log_prob)
    assert float(m["approx_kl"]) == pytest.approx(np.mean(np.exp(log_ratio) - 1 - log_ratio), rel=1e-5)
    assert float(m["clip_fraction"]) == pytest.approx(np.mean(np.abs(ratio - 1) > 0.2))


def test_advantage_normalisation_and_unclipped_value_loss():
    params = {"w": jnp.zeros((2, 2)), "v": jnp.array([1.0, 1.0])}
    batch = make_batch()
    cfg = ppo.PPOConfig(normalize_advantage=True, vf_clip_coef=None)
    _, m = ppo.ppo_loss(params, linear_policy, batch, cfg)
    adv = np.asarray(batch.advantage)
    norm = (adv - adv.mean()) / (adv.std() + 1e-8)
    ratio = np.exp(np.log(0.5) - np.asarray(batch.log_prob))
    expected = -np.mean(np.minimum(ratio * norm, np.clip(ratio, 0.8, 1.2) * norm))
    assert float(m["loss/policy"]) == pytest.approx(expected, rel=1e-5)
    value = np.asarray(batch.obs) @ np.array([1.0, 1.0])
    assert float(m["loss/value"]) == pytest.approx(0.5 * np.mean((value - np.asarray(batch.returns)) ** 2), rel=1e-6)


def test_gaussian_log_prob_and_entropy_match_scipy_formula():
    mean = jnp.array([[0.5, -1.0]])
    log_std = jnp.array([0.2, -0.3])
    a = jnp.array([[0.1, 0.4]])
    d = DiagGaussian(mean, log_std)
    std = np.exp(np.asarray(log_std))
    ref = np.sum(-0.5 * ((np.asarray(a) - np.asarray(mean)) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi))
    assert float(d.log_prob(a)[0]) == pytest.approx(ref, rel=1e-6)
    assert float(d.entropy()[0]) == pytest.approx(np.sum(0.5 + 0.5 * np.log(2 * np.pi) + np.log(std)), rel=1e-6)


def _update(cfg, params, batch, mask=None):
    opt = ppo.make_optimizer(cfg, 100, mask)
    fn = jax.jit(lambda p, s, b, k: ppo.update(p, s, b, k, apply_fn=linear_policy, optimizer=opt, cfg=cfg))
    return fn(params, opt.init(params), batch, jax.random.PRNGKey(0))


def test_target_kl_masks_every_update_after_the_threshold():
    params = {"w": jnp.zeros((2, 2)), "v": jnp.zeros(2)}
    batch = make_batch()
    # old log-probs far from the current policy: approx_kl is large from the first minibatch
    batch = batch.replace(log_prob=jnp.log(jnp.array([0.05, 0.9, 0.02, 0.95])))
    cfg = ppo.PPOConfig(n_epochs=3, batch_size=2, target_kl=1e-3, learning_rate=0.1)
    new_params, _, m = _update(cfg, params, batch)
    assert float(m["updates_applied"]) == 0.0
    assert float(m["early_stopped"]) == 1.0
    jax.tree_util.tree_map(np.testing.assert_array_equal, new_params, params)

    cfg_free = cfg.replace(target_kl=None)
    new_params, _, m = _update(cfg_free, params, batch)
    assert float(m["updates_applied"]) == 6.0  # 3 epochs x 2 minibatches
    assert not np.allclose(np.asarray(new_params["w"]), 0.0)


def test_target_kl_stops_midway_when_kl_grows():
    """A huge learning rate drives KL up after a few updates: later ones are masked."""
    params = {"w": jnp.zeros((2, 2)), "v": jnp.zeros(2)}
    batch = make_batch().replace(log_prob=jnp.log(jnp.full((4,), 0.5)))
    cfg = ppo.PPOConfig(n_epochs=10, batch_size=2, target_kl=0.01, learning_rate=0.5, max_grad_norm=10.0)
    _, _, m = _update(cfg, params, batch)
    assert 1.0 <= float(m["updates_applied"]) < 20.0
    assert float(m["early_stopped"]) == 1.0


def test_frozen_parameters_stay_bit_identical():
    params = {"w": jnp.ones((2, 2)) * 0.3, "v": jnp.array([0.1, 0.2])}
    batch = make_batch()
    cfg = ppo.PPOConfig(n_epochs=2, batch_size=2, learning_rate=0.1)
    new_params, _, _ = _update(cfg, params, batch, mask={"w": False, "v": True})
    np.testing.assert_array_equal(np.asarray(new_params["w"]), np.asarray(params["w"]))
    assert not np.array_equal(np.asarray(new_params["v"]), np.asarray(params["v"]))


@pytest.mark.parametrize("schedule,end", [("constant", 1e-3), ("linear", 0.0), ("cosine", 0.0)])
def test_learning_rate_schedules(schedule, end):
    fn = ppo.learning_rate_schedule(ppo.PPOConfig(learning_rate=1e-3, lr_schedule=schedule), 100)
    assert float(fn(0)) == pytest.approx(1e-3)
    assert float(fn(100)) == pytest.approx(end, abs=1e-9)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_learning_rate_warmup_then_schedule(schedule):
    """lr_warmup_steps: 0 -> lr linearly over the warm-up, then the schedule over the remaining steps, against
    the formulas written out here."""
    cfg = ppo.PPOConfig(learning_rate=1e-3, lr_schedule=schedule, lr_warmup_steps=20)
    fn = ppo.learning_rate_schedule(cfg, 100)
    decay = {"constant": lambda t: 1e-3, "linear": lambda t: 1e-3 * (1 - t / 80),
             "cosine": lambda t: 1e-3 * 0.5 * (1 + np.cos(np.pi * t / 80))}[schedule]
    for step in (0, 5, 10, 19):
        assert float(fn(step)) == pytest.approx(1e-3 * step / 20, abs=1e-9), step
    for step in (20, 40, 79, 100):
        assert float(fn(step)) == pytest.approx(decay(min(step, 100) - 20), abs=1e-9), step


def test_chunked_policy_scores_the_executed_step():
    """A chunk policy returns [B, H] values/dist; the loss picks chunk_index."""
    mean = jnp.array([[[0.0], [1.0], [2.0]]])  # B=1, H=3, A=1

    def chunk_policy(params, obs):
        return DiagGaussian(mean, jnp.zeros(1)), jnp.array([[10.0, 20.0, 30.0]])

    logp, ent, value = ppo.score_actions(chunk_policy, None, None, jnp.array([[1.0]]), jnp.array([1]))
    assert float(value[0]) == 20.0
    assert float(logp[0]) == pytest.approx(-0.5 * np.log(2 * np.pi))  # action == mean of step 1
