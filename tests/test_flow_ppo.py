"""A flow-matching VLA fine-tuned by PPO: the rollout stores each chunk's denoising chain, PPO re-scores it
(ratio exactly 1 before any step, finite gradients), Flow-Noise and Flow-SDE both train through the one
Trainer, and PPO raises the return of a task the random policy does not solve."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from jaxrl_vla import Trainer
from jaxrl_vla.algo import ppo
from jaxrl_vla.algo.ppo import PPOConfig
from jaxrl_vla.envs.base import Box, TimeStep
from jaxrl_vla.envs.wrappers import VecEnv
from jaxrl_vla.models.vla.flow_expert import FlowExpertConfig
from jaxrl_vla.models.vla.flow_vla import FlowVLA
from jaxrl_vla.models.vla.heads.flow import FlowConfig, FlowSample
from jaxrl_vla.models.vla.llama import DecoderConfig
from jaxrl_vla.models.vla_policy import VLAPolicy
from jaxrl_vla.training.rollout import make_rollout_fn

TARGETS = (-0.6, -0.2, 0.2, 0.6)
CHUNK, ACTION_DIM, PROMPT = 2, 1, 3


@struct.dataclass
class TokenTargetState:
    target: jax.Array  # int32 index into TARGETS
    time: jax.Array


class TokenTarget:
    """An instruction names one of four targets ([BOS, target token, EOS]); every step pays -|a - target|.

    The policy must read the token to act well: the best constant action earns ~-0.4 per
    step, a policy that reads it 0."""

    max_episode_steps = 8

    @property
    def observation_space(self):
        return {"input_ids": Box(0, 16, (PROMPT,), jnp.int32), "attention_mask": Box(0, 1, (PROMPT,), jnp.int32)}

    @property
    def action_space(self):
        return Box(-1.0, 1.0, (ACTION_DIM,))

    def _obs(self, state):
        ids = jnp.array([1, 0, 2], jnp.int32).at[1].set(4 + state.target)
        return {"input_ids": ids, "attention_mask": jnp.ones((PROMPT,), jnp.int32)}

    def reset(self, key):
        state = TokenTargetState(jax.random.randint(key, (), 0, len(TARGETS)), jnp.int32(0))
        return state, self._obs(state)

    def step(self, state, action):
        reward = -jnp.abs(jnp.clip(action[0], -1.0, 1.0) - jnp.asarray(TARGETS)[state.target])
        state = state.replace(time=state.time + 1)
        truncated = state.time >= self.max_episode_steps
        return state, TimeStep(self._obs(state), reward.astype(jnp.float32), jnp.zeros((), bool), truncated, {})


def flow_policy(method="flow_noise", steps=3, noise_level=0.5, noise_min=0.08, noise_max=0.16):
    decoder = DecoderConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    expert = FlowExpertConfig(chunk=CHUNK, action_dim=ACTION_DIM, hidden_size=24, intermediate_size=48, num_layers=2,
                              num_heads=2, num_kv_heads=2, head_dim=8, prefix_num_kv_heads=2, prefix_head_dim=8)
    return VLAPolicy(FlowVLA(decoder, expert, FlowConfig(steps=steps, method=method, noise_level=noise_level,
                                                           noise_min=noise_min, noise_max=noise_max)))


def init(policy, env, batch=1):
    obs = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (batch,) + x.shape), env.reset(jax.random.PRNGKey(0))[1])
    return policy.init(jax.random.PRNGKey(1), obs)


@pytest.mark.parametrize("method", ["flow_noise", "flow_sde"])
def test_rollout_stores_the_chain_and_ppo_rescores_it_to_ratio_one(method):
    env, policy = TokenTarget(), flow_policy(method)
    params = init(policy, env)
    vec = VecEnv(env, 4)
    rollout = jax.jit(make_rollout_fn(policy.apply, vec, 8, CHUNK))
    env_state, obs = vec.reset(jax.random.PRNGKey(2))
    _, _, transitions, last_value, _ = rollout(params, None, env_state, obs, jax.random.PRNGKey(3), 0)
    info = transitions.sample_info
    assert isinstance(info, FlowSample) and info.chain.shape == (8, 4, 3 + 1, CHUNK, ACTION_DIM)
    # both steps of a chunk carry the same chain, and the executed actions are its last state
    np.testing.assert_array_equal(np.asarray(info.chain[0]), np.asarray(info.chain[1]))
    np.testing.assert_allclose(np.asarray(transitions.action[0]), np.asarray(info.chain[0, :, -1, 0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(transitions.action[1]), np.asarray(info.chain[1, :, -1, 1]), atol=1e-6)
    advantages, returns = ppo.gae_from_transitions(transitions, last_value, 0.99, 0.95)
    batch = ppo.make_batch(transitions, advantages, returns)
    log_prob, entropy, value = ppo.score_actions(policy.apply, params, batch.obs, batch.action, batch.chunk_index,
                                                 batch.sample_info)
    np.testing.assert_allclose(np.asarray(jnp.exp(log_prob - batch.log_prob)), 1.0, atol=1e-4)  # ratio 1
    assert log_prob.shape == (32,) and np.all(np.isfinite(np.asarray(entropy)))
    cfg = PPOConfig(batch_size=16, n_epochs=1)
    grads = jax.grad(lambda p: ppo.ppo_loss(p, policy.apply, batch, cfg)[0])(params)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))
    expert_grad = grads["params"]["model"]["head"]["expert"]
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree_util.tree_leaves(expert_grad))


def test_policy_log_prob_matches_an_independent_numpy_chain():
    """flow_noise: the stored log-prob is the joint Gaussian density of x_0..x_K, recomputed here in NumPy
    from the head's own velocity and std at each stored chain state."""
    env, policy = TokenTarget(), flow_policy("flow_noise", steps=3)
    params = init(policy, env, batch=2)
    obs = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (2,) + x.shape), env.reset(jax.random.PRNGKey(5))[1])
    dist, _ = policy.apply(params, obs)
    _, log_prob, info = dist.sample(jax.random.PRNGKey(6))
    chain = np.asarray(info.chain, np.float64)
    total = -0.5 * np.sum(chain[:, 0] ** 2, axis=(1, 2)) - 0.5 * np.log(2 * np.pi) * chain[0, 0].size
    for k in range(3):
        t, t_next = 1 - k / 3, 1 - (k + 1) / 3
        v, std = dist.field(jnp.asarray(chain[:, k], jnp.float32), jnp.full((2,), t, jnp.float32))
        mean = chain[:, k] + (t_next - t) * np.asarray(v, np.float64)
        std = np.asarray(std, np.float64)
        z = (chain[:, k + 1] - mean) / std
        total += np.sum(-0.5 * z**2 - np.log(std) - 0.5 * np.log(2 * np.pi), axis=(1, 2))
    np.testing.assert_allclose(np.asarray(log_prob), total, rtol=1e-4, atol=1e-3)


def _train(tmp_path, method, iterations, **noise):
    trainer = Trainer(flow_policy(method, **noise), TokenTarget(),
                      PPOConfig(learning_rate=1e-3, batch_size=64, n_epochs=4, ent_coef=0.0, lr_schedule="constant"),
                      buffer_size=16, num_envs=16, iterations=iterations, eval_freq=0, save_freq=0, output_dir=tmp_path,
                      progress=False, seed=0)
    state = trainer.train()
    records = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert int(state.iteration) == iterations and trainer.trace_count == 1
    assert all(np.isfinite(r["loss/policy"]) and np.isfinite(r["approx_kl"]) for r in records)
    return trainer, [r["episode_return_mean"] for r in records]


@pytest.mark.slow
def test_ppo_with_flow_noise_learns_to_read_the_instruction(tmp_path):
    """Measured: returns per 5 iterations -5.9, -5.5, -4.9, -4.3, -3.8, -3.2, -2.4, -2.1 (the best constant
    action earns about -3.2; with pi-RL's std bounds 0.08-0.16 the same run stays near -5.5 for 40 iterations:
    from scratch the chain's small step noise carries too little of the return's variance, which is why
    pi-RL starts PPO from a behaviour-cloned expert)."""
    _, returns = _train(tmp_path, "flow_noise", 40, noise_min=0.3, noise_max=0.6)
    early, late = np.mean(returns[:5]), np.mean(returns[-5:])
    assert late > early + 2.0, (early, late)
    assert late > -3.2  # better than any policy that ignores the instruction


def test_flow_sde_trains_through_the_trainer(tmp_path):
    trainer, returns = _train(tmp_path, "flow_sde", 3)
    assert len(returns) == 3
