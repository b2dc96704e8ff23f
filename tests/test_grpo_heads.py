"""GRPO with the token and flow heads: the stored sample (bins, denoising chain) is what GRPO re-scores;
an action-token head's tokens are GRPO's tokens (K = H x A), a flow chain is one; the first ratio is 1,
the KL term is 0 against itself, and GRPO raises the return of the token-instruction task."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_vla.algo import grpo
from jaxrl_vla.envs.wrappers import VecEnv
from jaxrl_vla.training.grpo_trainer import GRPOTrainer
from jaxrl_vla.training.rollout import make_rollout_fn

from test_flow_ppo import CHUNK, ACTION_DIM, TokenTarget, flow_policy
from test_token_ppo import token_policy


def rollout_of(policy, steps=8, envs=4):
    env = TokenTarget()
    obs0 = jax.tree_util.tree_map(lambda x: x[None], env.reset(jax.random.PRNGKey(0))[1])
    params = policy.init(jax.random.PRNGKey(1), obs0)
    vec = VecEnv(env, envs)
    env_state, obs = vec.reset(jax.random.PRNGKey(2))
    out = jax.jit(make_rollout_fn(policy.apply, vec, steps, CHUNK))(params, None, env_state, obs, jax.random.PRNGKey(3), 0)
    return params, out[2]


@pytest.mark.parametrize("make,tokens", [(token_policy, CHUNK * ACTION_DIM), (flow_policy, 1)])
def test_grpo_rescores_the_stored_sample_ratio_one(make, tokens):
    policy = make()
    params, rollout = rollout_of(policy)
    cfg = grpo.GRPOConfig(group_size=2, reward="return", kl_coef=0.1, batch_size=16, n_epochs=1)
    batch, _ = grpo.make_grpo_batch(policy.apply, params, params, rollout, cfg)
    assert batch.token_log_prob.shape == (32, tokens)
    # the per-token log-probs sum to what the rollout stored for the chunk
    np.testing.assert_allclose(np.asarray(batch.token_log_prob.sum(-1)), np.asarray(rollout.log_prob.reshape(-1)),
                               rtol=1e-4, atol=1e-4)
    loss, metrics = grpo.grpo_loss(params, policy.apply, batch, cfg)
    assert abs(float(metrics["approx_kl"])) < 1e-6 and abs(float(metrics["loss/kl"])) < 1e-6
    grads = jax.grad(lambda p: grpo.grpo_loss(p, policy.apply, batch, cfg)[0])(params)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.slow
def test_grpo_improves_a_token_policy(tmp_path):
    trainer = GRPOTrainer(token_policy(), TokenTarget(),
                          grpo.GRPOConfig(group_size=4, reward="return", learning_rate=1e-3, batch_size=64, n_epochs=2,
                                          lr_schedule="constant"),
                          buffer_size=8, num_envs=32, iterations=25, eval_freq=0, save_freq=0, output_dir=tmp_path,
                          progress=False, seed=0)
    trainer.train()
    records = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    outcome = [r["grpo/outcome_mean"] for r in records]
    assert all(np.isfinite(r["loss/total"]) for r in records)
    early, late = np.mean(outcome[:5]), np.mean(outcome[-5:])
    assert late > early + 0.5, (early, late)
