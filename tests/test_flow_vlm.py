"""The flow-matching head on a vision-language prefix (policy.action_head type 'flow' with a SmolVLM model):
the expert reads the keys/values of [image tokens, instruction, proprio token] exactly as the VLM twin (and
transformers' SmolVLM, without the proprio token) computes them; a rollout's stored chains re-score to ratio 1
on the first PPO minibatch; a stored Flow-Noise chain's log-prob equals an independent NumPy computation; the
config trains on VLReach pixels."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_vla.algo import ppo
from jaxrl_vla.algo.ppo import PPOConfig
from jaxrl_vla.config import resolve
from jaxrl_vla.envs.wrappers import VecEnv
from jaxrl_vla.models.vla.flow_vla import FlowVLA
from jaxrl_vla.models.vla.heads.flow import FlowSample
from jaxrl_vla.models.vla.smolvlm import SmolVLMConfig
from jaxrl_vla.models.vla.token_vla import vlm_class, with_image_tokens
from jaxrl_vla.models.vla_policy import build_vla_policy
from jaxrl_vla.training.rollout import make_rollout_fn

from test_flow_head import np_logpdf
from test_lm_policy import SMOLVLM, policy_cfg, vl_reach

EXPERT = {"hidden_size": 16, "intermediate_size": 32, "num_heads": 2}


def flow_head(method="flow_noise", steps=3, **extra):
    return {"type": "flow", "steps": steps, "method": method, "expert": dict(EXPERT), **extra}


def reset_obs(env, batch, seed=0):
    return jax.vmap(lambda k: env.reset(k)[1])(jax.random.split(jax.random.PRNGKey(seed), batch))


def _prefix(policy, variables, obs):
    return policy.apply(variables, obs, method=lambda m, x: m.model.prefix(x))


prefix_of = jax.jit(_prefix, static_argnums=0)  # one compile per policy


def test_prefix_kv_is_the_vlm_twins_over_image_instruction_and_proprio():
    env = vl_reach()
    policy, variables, _ = build_vla_policy(policy_cfg(flow_head(), chunk=2, model_config=SMOLVLM), env)
    model = policy.model
    assert isinstance(model, FlowVLA) and isinstance(model.vlm, SmolVLMConfig)
    assert model.proprio_dim == env.observation_space["proprio"].shape[0]
    obs = reset_obs(env, 3)
    obs["language_mask"] = obs["language_mask"].at[1, 2:].set(False)  # a shorter instruction: right padding
    _, kv, mask = prefix_of(policy, variables, obs)
    params = variables["params"]["model"]
    # the twin itself, called directly: image tokens first, the proprio token (computed here by hand) last
    ids, img_mask, pixels, _ = with_image_tokens(model.vlm, obs["language"], obs["language_mask"].astype(bool),
                                                 obs["rgb"])
    proprio = (np.asarray(obs["proprio"]) @ np.asarray(params["proprio_proj"]["kernel"])
               + np.asarray(params["proprio_proj"]["bias"]))[:, None]
    full_mask = jnp.concatenate([img_mask, jnp.ones((3, 1), bool)], axis=1)
    twin = vlm_class(model.vlm)(model.vlm)
    _, want = jax.jit(lambda p, *a: twin.apply(p, *a[:3], return_kv=True, extra_embeds=a[3], method="hidden"))(
        {"params": params["lm"]}, ids, full_mask, pixels, jnp.asarray(proprio, jnp.float32))
    assert len(kv) == model.expert.num_layers == len(want)
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(full_mask))
    for (k, v), (wk, wv) in zip(kv, want):
        np.testing.assert_allclose(np.asarray(k), np.asarray(wk), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(v), np.asarray(wv), rtol=1e-6, atol=1e-6)
    # the proprio token reaches the expert's keys, the image too
    moved = {**obs, "proprio": obs["proprio"] + 0.5}
    assert not np.allclose(np.asarray(prefix_of(policy, variables, moved)[1][0][0][:, -1]), np.asarray(kv[0][0][:, -1]))
    dark = {**obs, "rgb": jnp.zeros_like(obs["rgb"])}
    assert not np.allclose(np.asarray(prefix_of(policy, variables, dark)[1][0][0]), np.asarray(kv[0][0]))


@pytest.mark.torch
def test_prefix_kv_is_transformers_smolvlm_cache():
    """Without the proprio token, the keys/values the expert reads are transformers' own SmolVLM cache
    (keys after rotary), over [image tokens, instruction] with right padding."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_vlm_token_head import IMG, PROMPT, SIZE, torch_vlm

    model, twin, vlm = torch_vlm("smolvlm")
    from jaxrl_vla.models.vla.flow_expert import FlowExpertConfig
    from jaxrl_vla.models.vla.heads.flow import FlowConfig
    from jaxrl_vla.models.vla_policy import VLAPolicy

    text = vlm.text
    expert = FlowExpertConfig(chunk=2, action_dim=2, num_layers=text.num_hidden_layers, num_kv_heads=text.num_key_value_heads,
                              head_dim=text.head_dim, prefix_num_kv_heads=text.num_key_value_heads,
                              prefix_head_dim=text.head_dim, **EXPERT)
    policy = VLAPolicy(FlowVLA(text, expert, FlowConfig(steps=2), vlm=vlm))
    rng = np.random.default_rng(0)
    mask = np.ones((2, PROMPT), np.int32)
    mask[1, 3:] = 0
    obs = {"input_ids": jnp.asarray(rng.integers(4, 40, (2, PROMPT)), jnp.int32), "attention_mask": jnp.asarray(mask),
           "rgb": jnp.asarray(rng.integers(0, 256, (2, SIZE, SIZE, 3)), jnp.uint8)}
    variables = policy.init(jax.random.PRNGKey(0), obs)
    variables = {"params": {**variables["params"], "model": {**variables["params"]["model"], "lm": twin["params"]}}}
    _, kv, _ = prefix_of(policy, variables, obs)
    n_img = vlm.image_seq_len
    ids = np.concatenate([np.full((2, n_img), IMG), np.asarray(obs["input_ids"])], axis=1)
    full_mask = np.concatenate([np.ones((2, n_img), np.int32), mask], axis=1)
    pixels = ((torch.from_numpy(np.asarray(obs["rgb"], np.float32)) / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2)[:, None]
    with torch.no_grad():
        cache = model.model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(full_mask).long(),
                            pixel_values=pixels, use_cache=True).past_key_values
    real = full_mask.astype(bool)  # padded positions' keys are never attended; compare the real ones
    for layer, (k, v) in enumerate(kv):
        tk, tv = (x.permute(0, 2, 1, 3).double().numpy() for x in (cache.layers[layer].keys, cache.layers[layer].values))
        np.testing.assert_allclose(np.asarray(k)[real], tk[real], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(v)[real], tv[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["flow_noise", "flow_sde"])
def test_rollout_on_pixels_rescores_to_ratio_one_on_the_first_minibatch(method):
    env = vl_reach()
    policy, params, _ = build_vla_policy(policy_cfg(flow_head(method), chunk=2, model_config=SMOLVLM), env)
    vec = VecEnv(env, 4)
    rollout = jax.jit(make_rollout_fn(policy.apply, vec, 4, 2))
    env_state, obs = vec.reset(jax.random.PRNGKey(2))
    _, _, transitions, last_value, _ = rollout(params, None, env_state, obs, jax.random.PRNGKey(3), 0)
    assert isinstance(transitions.sample_info, FlowSample)
    advantages, returns = ppo.gae_from_transitions(transitions, last_value, 0.9, 0.9)
    batch = ppo.make_batch(transitions, advantages, returns)
    first = jax.tree_util.tree_map(lambda x: x[jax.random.permutation(jax.random.PRNGKey(4), 16)[:8]], batch)

    def loss_and_log_prob(p, b):
        loss, metrics = ppo.ppo_loss(p, policy.apply, b, PPOConfig(batch_size=8))
        log_prob = ppo.score_actions(policy.apply, p, b.obs, b.action, b.chunk_index, b.sample_info)[0]
        return loss, (metrics, log_prob)

    (_, (metrics, log_prob)), grads = jax.jit(jax.value_and_grad(loss_and_log_prob, has_aux=True))(params, first)
    np.testing.assert_allclose(np.asarray(jnp.exp(log_prob - first.log_prob)), 1.0, atol=1e-5)
    assert abs(float(metrics["approx_kl"])) < 1e-8 and float(metrics["clip_fraction"]) == 0.0
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))
    model_grads = grads["params"]["model"]
    assert np.any(np.asarray(model_grads["head"]["expert"]["action_in_proj"]["kernel"]) != 0)
    vision = jax.tree_util.tree_leaves(model_grads["lm"]["model"]["vision_model"])
    assert any(np.any(np.asarray(g) != 0) for g in vision)  # the policy gradient reaches the vision tower


def test_stored_flow_noise_chain_log_prob_matches_numpy():
    env = vl_reach()
    policy, params, _ = build_vla_policy(policy_cfg(flow_head("flow_noise", steps=3), chunk=2, model_config=SMOLVLM),
                                         env)
    obs = reset_obs(env, 2, seed=5)
    dist, _ = policy.apply(params, obs)
    _, log_prob, info = dist.sample(jax.random.PRNGKey(6))
    chain = np.asarray(info.chain, np.float64)
    want = np.zeros(2)
    for b in range(2):
        want[b] = np_logpdf(chain[b, 0], 0.0, 1.0)
        for k in range(3):
            t, t_next = 1 - k / 3, 1 - (k + 1) / 3
            v, std = dist.field(jnp.asarray(chain[:, k], jnp.float32), jnp.full((2,), t, jnp.float32))
            mean = chain[b, k] + (t_next - t) * np.asarray(v, np.float64)[b]
            want[b] += np_logpdf(chain[b, k + 1], mean, np.asarray(std, np.float64)[b])
    np.testing.assert_allclose(np.asarray(log_prob), want, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(dist.log_prob(info)), want, rtol=1e-4, atol=1e-3)  # PPO's re-score


@pytest.mark.slow  # ~25 s on 2 loaded cores: the Trainer's compile
def test_flow_head_config_with_a_smolvlm_model_trains_on_vl_reach_pixels(tmp_path):
    from jaxrl_vla.build import build_trainer

    cfg = resolve({
        "trainer": {"num_envs": 4, "buffer_size": 4, "iterations": 1, "eval_freq": 0, "progress": False,
                    "output_dir": str(tmp_path), "exp_name": "flow_vlm"},
        "algorithm": {"name": "ppo", "cfg": {"n_epochs": 1, "batch_size": 8, "learning_rate": 1e-3}},
        "policy": {"name": "vla", "action_chunk": 2, "action_head": flow_head("flow_sde", steps=2),
                   "vla_config": {"model_config": SMOLVLM}},
        "env": {"name": "VLReach-v0", "image_size": 16},
    })
    trainer = build_trainer(cfg)
    assert trainer.policy.model.vlm is not None and trainer.policy.model.proprio_dim > 0
    trainer.train()
    records = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and all(np.isfinite(r["loss/total"]) and np.isfinite(r["approx_kl"]) for r in records)
