"""An action-token VLA (OpenVLA-style bins at the end of a Llama vocabulary) fine-tuned by PPO: the rollout
stores the sampled bins, PPO re-scores them teacher-forced; the log-prob equals an independent full-sequence
forward of the LM over prompt + action tokens, the first ratio is 1, and the Trainer improves the return."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_vla import Trainer
from jaxrl_vla.algo import ppo
from jaxrl_vla.algo.ppo import PPOConfig
from jaxrl_vla.envs.wrappers import VecEnv
from jaxrl_vla.models.vla.heads.tokens import TokenHeadConfig, bin_centers, bins_to_token_ids
from jaxrl_vla.models.vla.llama import DecoderConfig, DecoderForCausalLM
from jaxrl_vla.models.vla.token_vla import TokenVLA
from jaxrl_vla.models.vla_policy import VLAPolicy
from jaxrl_vla.training.rollout import make_rollout_fn

from test_flow_ppo import ACTION_DIM, CHUNK, TokenTarget

VOCAB, BINS = 48, 16


def token_policy(chunk=CHUNK):
    decoder = DecoderConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    return VLAPolicy(TokenVLA(decoder, TokenHeadConfig(vocab_size=VOCAB, n_bins=BINS), (chunk, ACTION_DIM)))


def prompts(batch, padded_rows=()):
    ids = jax.random.randint(jax.random.PRNGKey(3), (batch, 5), 3, 20)
    mask = np.ones((batch, 5), np.int32)
    for row in padded_rows:
        mask[row, 3:] = 0  # right padding: 3 real tokens
    return {"input_ids": ids, "attention_mask": jnp.asarray(mask)}


def test_log_prob_equals_a_full_sequence_forward_over_prompt_and_action_tokens():
    policy = token_policy()
    obs = prompts(3, padded_rows=(1,))
    params = policy.init(jax.random.PRNGKey(1), obs)
    dist, value = policy.apply(params, obs)
    actions, log_prob, bins = dist.sample(jax.random.PRNGKey(7))
    assert actions.shape == (3, CHUNK, ACTION_DIM) and bins.shape == (3, CHUNK, ACTION_DIM) and value.shape == (3, CHUNK)
    np.testing.assert_allclose(np.asarray(actions), np.asarray(bin_centers(bins, -1.0, 1.0, BINS)))
    lm = DecoderForCausalLM(policy.model.decoder)
    lm_params = {"params": params["params"]["model"]["lm"]}
    reference = []
    for b in range(3):  # each row alone: its real prompt, then its action tokens, one causal forward pass
        real = int(obs["attention_mask"][b].sum())
        action_ids = np.asarray(bins_to_token_ids(bins[b].reshape(-1), VOCAB))
        seq = jnp.concatenate([obs["input_ids"][b, :real], jnp.asarray(action_ids)])[None]
        logits = np.asarray(lm.apply(lm_params, seq, jnp.ones_like(seq)), np.float64)[0]
        total = 0.0
        for d, token in enumerate(action_ids):
            row = logits[real - 1 + d, VOCAB - BINS:]  # the bin ids only
            row = row - row.max()
            total += row[token - (VOCAB - BINS)] - np.log(np.exp(row).sum())
        reference.append(total)
    np.testing.assert_allclose(np.asarray(log_prob), reference, rtol=1e-4, atol=1e-4)
    rescored, entropy = dist.log_prob_and_entropy(bins)
    np.testing.assert_allclose(np.asarray(rescored), reference, rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(entropy) > 0)


def test_rollout_stores_bins_and_the_first_ratio_is_one():
    env, policy = TokenTarget(), token_policy()
    obs0 = jax.tree_util.tree_map(lambda x: x[None], env.reset(jax.random.PRNGKey(0))[1])
    params = policy.init(jax.random.PRNGKey(1), obs0)
    vec = VecEnv(env, 4)
    rollout = jax.jit(make_rollout_fn(policy.apply, vec, 8, CHUNK))
    env_state, obs = vec.reset(jax.random.PRNGKey(2))
    _, _, transitions, last_value, _ = rollout(params, None, env_state, obs, jax.random.PRNGKey(3), 0)
    assert transitions.sample_info.shape == (8, 4, CHUNK, ACTION_DIM) and transitions.sample_info.dtype == jnp.int32
    np.testing.assert_allclose(np.asarray(transitions.action[0]),
                               np.asarray(bin_centers(transitions.sample_info[0, :, 0], -1.0, 1.0, BINS)), atol=1e-6)
    advantages, returns = ppo.gae_from_transitions(transitions, last_value, 0.99, 0.95)
    batch = ppo.make_batch(transitions, advantages, returns)
    log_prob, _, _ = ppo.score_actions(policy.apply, params, batch.obs, batch.action, batch.chunk_index,
                                       batch.sample_info)
    np.testing.assert_allclose(np.asarray(jnp.exp(log_prob - batch.log_prob)), 1.0, atol=1e-4)
    grads = jax.grad(lambda p: ppo.ppo_loss(p, policy.apply, batch, PPOConfig(batch_size=16))[0])(params)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.slow
def test_ppo_improves_a_token_policy_through_the_trainer(tmp_path):
    trainer = Trainer(token_policy(), TokenTarget(),
                      PPOConfig(learning_rate=1e-3, batch_size=64, n_epochs=4, ent_coef=0.0, lr_schedule="constant"),
                      buffer_size=16, num_envs=16, iterations=25, eval_freq=0, save_freq=0, output_dir=tmp_path,
                      progress=False, seed=0)
    trainer.train()
    records = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    returns = [r["episode_return_mean"] for r in records]
    assert all(np.isfinite(r["loss/policy"]) for r in records)
    early, late = np.mean(returns[:5]), np.mean(returns[-5:])
    assert late > early + 1.0 and late > -3.2, (early, late)  # reads the instruction: beats any constant action
