"""Correlated exploration noise (algorithm.cfg.noise_correlation): an AR(1) process per env
and action entry whose every draw is standard normal, so the actions stay samples of the
policy's Gaussian while consecutive steps share a direction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_vla import Trainer
from jaxrl_vla.algo import PPOConfig
from jaxrl_vla.envs import make_env
from jaxrl_vla.envs.wrappers import VecEnv
from jaxrl_vla.models.actor_critic import ActorCritic
from jaxrl_vla.models.policy import zeros_like_obs
from jaxrl_vla.training.acting import correlated_noise
from jaxrl_vla.training.rollout import make_rollout_fn


def lag_one_correlation(x: np.ndarray) -> float:
    """Correlation of x[t] with x[t + 1] over the leading (time) axis, pooled over the rest."""
    return float(np.corrcoef(x[:-1].ravel(), x[1:].ravel())[0, 1])


def test_correlated_noise_is_the_ar1_recursion_with_standard_normal_draws():
    rho, steps = 0.8, 40
    keys = jax.random.split(jax.random.PRNGKey(0), steps + 1)
    start = jax.random.normal(keys[0], (20000, 2))
    draws = [start]
    for key in keys[1:]:
        draws.append(correlated_noise(draws[-1], key, rho))
    got = np.stack([np.asarray(d) for d in draws])
    # independent reference: the recursion in NumPy on the same fresh normals
    want = [np.asarray(start)]
    for key in keys[1:]:
        fresh = np.asarray(jax.random.normal(key, (20000, 2)))
        want.append(rho * want[-1] + np.sqrt(1 - rho**2) * fresh)
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-5, atol=1e-5)
    # stationary: every step's marginal stays N(0, 1), neighbours correlate by rho, lag k by rho^k
    np.testing.assert_allclose(got.var(axis=(1, 2)), 1.0, atol=0.05)
    np.testing.assert_allclose(np.abs(got.mean(axis=(1, 2))), 0.0, atol=0.03)
    assert lag_one_correlation(got) == pytest.approx(rho, abs=0.01)
    assert float(np.corrcoef(got[:-3].ravel(), got[3:].ravel())[0, 1]) == pytest.approx(rho**3, abs=0.01)


def standardised_rollout_noise(noise_correlation: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z [T, N, A], stored log-probs, the policy's log-probs of the stored actions) of one rollout."""
    env = make_env("Pendulum-v1")
    policy = ActorCritic(env.action_space, (16, 16), log_std_init=-0.5)
    vec_env = VecEnv(env, 64)
    params = policy.init(jax.random.PRNGKey(1), zeros_like_obs(env.observation_space, 1))
    env_state, obs = vec_env.reset(jax.random.PRNGKey(2))
    rollout = make_rollout_fn(policy.apply, vec_env, 48, noise_correlation=noise_correlation)
    transitions = jax.jit(rollout)(params, None, env_state, obs, jax.random.PRNGKey(3), 0)[2]
    flat = jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:]), transitions)
    dist, _ = policy.apply(params, flat.obs)
    z = (flat.action - dist.mean) / jnp.exp(dist.log_std)
    return (np.asarray(z).reshape(transitions.action.shape), np.asarray(flat.log_prob),
            np.asarray(dist.log_prob(flat.action)))


def test_rollout_noise_persists_across_steps_and_log_probs_stay_the_policys():
    z, stored, recomputed = standardised_rollout_noise(0.8)
    assert lag_one_correlation(z) == pytest.approx(0.8, abs=0.05)
    assert float(z.var()) == pytest.approx(1.0, abs=0.1)
    np.testing.assert_allclose(stored, recomputed, rtol=1e-5, atol=1e-5)


def test_zero_correlation_keeps_independent_noise():
    z, stored, recomputed = standardised_rollout_noise(0.0)
    assert abs(lag_one_correlation(z)) < 0.05
    assert float(z.var()) == pytest.approx(1.0, abs=0.1)
    np.testing.assert_allclose(stored, recomputed, rtol=1e-5, atol=1e-5)


def test_discrete_actions_and_vla_mode_reject_it(tmp_path):
    from jaxrl_vla.training.async_trainer import AsyncTrainer

    cfg = PPOConfig(batch_size=64, noise_correlation=0.5)
    cartpole = make_env("CartPole-v1")
    with pytest.raises(ValueError, match=r"algorithm.cfg.noise_correlation \(0.5\) needs continuous"):
        Trainer(ActorCritic(cartpole.action_space, (8,)), cartpole, cfg, buffer_size=16, num_envs=4,
                output_dir=tmp_path, progress=False)
    pendulum = make_env("Pendulum-v1")
    with pytest.raises(ValueError, match="noise_correlation > 0 needs trainer.buffer_type 'standard'"):
        AsyncTrainer(ActorCritic(pendulum.action_space, (8,)), pendulum, cfg, buffer_size=64, num_envs=4,
                     output_dir=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


def test_the_trainer_collects_with_the_configured_correlation(tmp_path, monkeypatch):
    """build_trainer -> Trainer -> make_rollout_fn: the config's rho reaches the rollout it jits."""
    import jaxrl_vla.training.trainer as trainer_module
    from jaxrl_vla.build import build_trainer
    from jaxrl_vla.config import load_config

    seen = []
    real = trainer_module.make_rollout_fn

    def spy(*args, **kwargs):
        seen.append(args[5] if len(args) > 5 else kwargs.get("noise_correlation", 0.0))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "make_rollout_fn", spy)
    cfg = load_config(None, ["env.name=Pendulum-v1", "trainer.num_envs=4", "trainer.buffer_size=16",
                             "trainer.iterations=1", "trainer.progress=false", "trainer.eval_freq=0",
                             f"trainer.output_dir={tmp_path}", "algorithm.cfg.batch_size=32",
                             "algorithm.cfg.noise_correlation=0.6"])
    trainer = build_trainer(cfg)
    trainer.train()
    assert seen == [0.6]
    assert int(trainer.state.iteration) == 1
