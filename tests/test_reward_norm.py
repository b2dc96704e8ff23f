"""trainer.normalize_rewards: VecNormalize's return-std reward scaling, inside the jitted iteration."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_vla import Trainer
from jaxrl_vla.algo import PPOConfig
from jaxrl_vla.envs import make_env
from jaxrl_vla.models.actor_critic import ActorCritic
from jaxrl_vla.training.normalizer import init_reward_stats, scale_rewards


class NumpyVecNormalizeRewards:
    """The reward half of stable_baselines3's VecNormalize (RunningMeanStd(epsilon=1e-4, shape=()),
    epsilon 1e-8, clip_reward 10), written out in float64 NumPy as an independent reference."""

    def __init__(self, num_envs: int, gamma: float):
        self.gamma, self.returns = gamma, np.zeros(num_envs)
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def _update(self, x: np.ndarray) -> None:
        batch_mean, batch_var, batch_count = x.mean(), x.var(), x.shape[0]
        delta = batch_mean - self.mean
        tot = self.count + batch_count
        new_mean = self.mean + delta * batch_count / tot
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / tot
        self.mean, self.var, self.count = new_mean, m2 / tot, tot

    def step(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        self.returns = self.returns * self.gamma + rewards
        self._update(self.returns)
        out = np.clip(rewards / np.sqrt(self.var + 1e-8), -10.0, 10.0)
        self.returns[dones] = 0
        return out


def test_scale_rewards_matches_vecnormalize() -> None:
    rng = np.random.default_rng(0)
    num_envs, gamma = 6, 0.9
    ref = NumpyVecNormalizeRewards(num_envs, gamma)
    stats = init_reward_stats(num_envs)
    scale = jax.jit(scale_rewards, static_argnums=3)
    for rollout in range(3):  # the state carries over from one rollout to the next
        rewards = rng.normal(-1.0, 0.5, (16, num_envs)).astype(np.float32)
        if rollout == 2:
            rewards[8, 0] = 400.0  # a rare large reward after many small ones: scaled past the +-10 clip
        dones = rng.random((16, num_envs)) < 0.1
        expected = np.stack([ref.step(r.astype(np.float64), d) for r, d in zip(rewards, dones)])
        stats, scaled = scale(stats, jnp.asarray(rewards), jnp.asarray(dones), gamma)
        np.testing.assert_allclose(np.asarray(scaled), expected, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(stats.returns), ref.returns, rtol=2e-5, atol=1e-4)
        np.testing.assert_allclose([float(stats.mean), float(stats.var), float(stats.count)],
                                   [ref.mean, ref.var, ref.count], rtol=2e-5)
    assert np.abs(expected).max() == 10.0


CFG = PPOConfig(learning_rate=1e-3, n_epochs=2, batch_size=128, gamma=0.9, ent_coef=0.0)


def pendulum_trainer(tmp_path, **kw):
    env = make_env("Pendulum-v1")
    defaults = dict(buffer_size=32, num_envs=4, iterations=6, output_dir=tmp_path, exp_name="t", eval_freq=0,
                    progress=False, normalize_rewards=True, normalize_observations=True, iterations_per_call=1)
    defaults.update(kw)
    return Trainer(ActorCritic(env.action_space, (32, 32)), env, CFG, **defaults)


def test_training_scales_rewards_and_resumes_exactly(tmp_path) -> None:
    uninterrupted = pendulum_trainer(tmp_path / "a")
    uninterrupted.train()
    stats = uninterrupted.state.reward_stats
    assert float(stats.count) == pytest.approx(1e-4 + 6 * 32 * 4)  # one merge of the 4 envs per step
    assert float(stats.var) > 100  # Pendulum's returns at gamma 0.9: rewards of -1 to -16 per step
    records = [json.loads(line) for line in (uninterrupted.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert uninterrupted.state.iteration == 6 and records[-1]["value_mean"] > -30  # values learnt on scaled rewards

    stopper = pendulum_trainer(tmp_path / "b", log_fn=lambda r: r["iteration"] == 3 and stopper.request_stop())
    stopper.train()
    assert stopper.interrupted and int(stopper.state.iteration) in (3, 4)
    resumed = pendulum_trainer(tmp_path / "b")
    resumed.train(resume=stopper.run_dir)
    assert int(resumed.state.iteration) == 6
    for name in ("params", "reward_stats", "obs_stats"):
        same = jax.tree_util.tree_map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                                      getattr(uninterrupted.state, name), getattr(resumed.state, name))
        assert all(jax.tree_util.tree_leaves(same)), name


def test_off_by_default_and_refused_where_unsupported(tmp_path) -> None:
    from jaxrl_vla.algo.grpo import GRPOConfig

    env = make_env("CartPole-v1")
    trainer = Trainer(ActorCritic(env.action_space, (8,)), env, CFG.replace(batch_size=16), buffer_size=8,
                      num_envs=2, iterations=1, eval_freq=0, output_dir=tmp_path, progress=False)
    assert trainer.train().reward_stats is None
    with pytest.raises(ValueError, match="normalize_rewards"):
        Trainer(ActorCritic(env.action_space, (8,)), env, GRPOConfig(group_size=2, batch_size=8, reward="return"), buffer_size=8,
                num_envs=2, iterations=1, output_dir=tmp_path, progress=False, normalize_rewards=True)


def test_rlzoo_pendulum_config_resolves() -> None:
    from jaxrl_vla.build import trainer_kwargs
    from jaxrl_vla.config import read_config_file, resolve

    cfg = resolve(read_config_file("configs/pendulum_rlzoo.json"))
    kwargs = trainer_kwargs(cfg)
    assert kwargs["normalize_rewards"] and kwargs["normalize_observations"]
    assert cfg["algorithm"]["cfg"]["gamma"] == 0.9
