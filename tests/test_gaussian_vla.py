"""The Gaussian action-chunk head on a decoder / vision-language prefix (policy.action_head type 'gaussian'):
log-prob and entropy equal a NumPy Gaussian on the readout; the readout is transformers' own SmolVLM hidden
state at the last position (and, with the proprio token, the torch twin's that behaviour cloning trains);
the head file beside a directory loads; PPO from a config changes only the trainable parameters; bad
settings name the field."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxrl_vla.config import ConfigError, resolve
from jaxrl_vla.models.vla.gaussian_vla import GaussianVLA
from jaxrl_vla.models.vla_policy import VLAPolicy, build_vla_policy

from test_lm_policy import SMOLVLM, policy_cfg, vl_reach


def features(policy, variables, obs):
    return policy.apply(variables, obs, method=lambda m, o: m.model.features(o))


def reset_obs(env, batch, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), batch)
    return jax.vmap(lambda k: env.reset(k)[1])(keys)


def test_log_prob_and_entropy_equal_a_numpy_gaussian_on_the_readout():
    env = vl_reach()  # a Llama text decoder's prefix here; the SmolVLM prefix's readout is checked below
    cfg = policy_cfg({"type": "gaussian", "init_log_std": -0.7}, chunk=2)
    policy, variables, _ = build_vla_policy(cfg, env)
    assert isinstance(policy.model, GaussianVLA) and policy.model.proprio_dim == env.observation_space["proprio"].shape[0]
    obs = reset_obs(env, 3)
    dist, value = policy.apply(variables, obs)
    actions = dist.sample(jax.random.PRNGKey(4))
    assert dist.mean.shape == (3, 2, 2) and value.shape == (3, 2)
    h = np.asarray(features(policy, variables, obs), np.float64)
    p = variables["params"]["model"]
    mean = (h @ np.asarray(p["action_mean"]["kernel"], np.float64) + np.asarray(p["action_mean"]["bias"])).reshape(3, 2, 2)
    log_std = np.asarray(p["log_std"], np.float64)
    np.testing.assert_allclose(log_std, -0.7)
    a = np.asarray(actions, np.float64)
    want = np.sum(-0.5 * ((a - mean) / np.exp(log_std)) ** 2 - log_std - 0.5 * np.log(2 * np.pi), axis=-1)
    np.testing.assert_allclose(np.asarray(dist.log_prob(actions)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dist.entropy()), np.broadcast_to(np.sum(log_std + 0.5 * np.log(2 * np.pi * np.e)),
                                                                           (3, 2)), rtol=1e-6)
    want_value = h @ np.asarray(p["value_head"]["kernel"], np.float64)[:, 0] + float(p["value_head"]["bias"][0])
    np.testing.assert_allclose(np.asarray(value[:, 0]), want_value, rtol=1e-5, atol=1e-6)
    # the proprio token reaches the readout: a different effector position, a different readout
    moved = {**obs, "proprio": obs["proprio"] + 0.5}
    assert not np.allclose(np.asarray(features(policy, variables, moved)), h, atol=1e-4)


@pytest.mark.torch
def test_readout_is_transformers_smolvlm_hidden_state_at_the_last_position():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from bridge.smolvlm_gaussian import SmolVLMGaussianVLA
    from jaxrl_vla.models.vla.gaussian_vla import head_params, head_state_dict
    from test_vlm_token_head import PROMPT, SIZE, torch_vlm

    model, twin, vlm = torch_vlm("smolvlm")
    rng = np.random.default_rng(0)
    mask = np.ones((2, PROMPT), np.int32)
    mask[1, 3:] = 0  # right padding
    obs = {"language": jnp.asarray(rng.integers(4, 40, (2, PROMPT)), jnp.int32), "language_mask": jnp.asarray(mask),
           "rgb": jnp.asarray(rng.integers(0, 256, (2, SIZE, SIZE, 3)), jnp.uint8),
           "proprio": jnp.asarray(rng.uniform(-1, 1, (2, 2)), jnp.float32)}
    n_img = vlm.image_seq_len
    pixels = ((torch.from_numpy(np.asarray(obs["rgb"], np.float32)) / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2)[:, None]
    ids = np.concatenate([np.full((2, n_img), vlm.image_token_id), np.asarray(obs["language"])], axis=1)
    full_mask = np.concatenate([np.ones((2, n_img), np.int32), mask], axis=1)
    with torch.no_grad():  # without proprio: transformers' SmolVLMModel itself, at each row's last real token
        hidden = model.model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(full_mask).long(),
                             pixel_values=pixels).last_hidden_state.double().numpy()
    want = hidden[np.arange(2), [n_img + PROMPT - 1, n_img + 2]]
    for proprio_dim in (0, 2):
        policy = VLAPolicy(GaussianVLA(vlm.text, (1, 2), proprio_dim, -1.0, input_key="language",
                                       mask_key="language_mask", vlm=vlm))
        variables = policy.init(jax.random.PRNGKey(0), obs)
        variables = {"params": {**variables["params"], "model": {**variables["params"]["model"], "lm": twin["params"]}}}
        readout = np.asarray(features(policy, variables, obs))
        if proprio_dim == 0:
            np.testing.assert_allclose(readout, want, rtol=1e-4, atol=1e-4)
            continue
        # with the proprio token: the torch twin behaviour cloning trains, with this head's weights
        torch_policy = SmolVLMGaussianVLA(model, 2, 2, 1, 0.0).eval()
        head = {k: v for k, v in variables["params"]["model"].items() if k != "lm"}
        torch_policy.load_state_dict({**{f"vlm.{k}": v for k, v in model.state_dict().items()},
                                      **{k: torch.from_numpy(v.copy()) for k, v in head_state_dict(head).items()}})
        with torch.no_grad():
            t_obs = {k: torch.from_numpy(np.array(v)) for k, v in obs.items()}
            t_readout = torch_policy.features(t_obs).double().numpy()
            t_mean, t_value = (x.double().numpy() for x in torch_policy(t_obs))
        np.testing.assert_allclose(readout, t_readout, rtol=1e-4, atol=1e-4)
        dist, value = policy.apply(variables, obs)
        np.testing.assert_allclose(np.asarray(dist.mean), t_mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(value), t_value, rtol=1e-4, atol=1e-5)
        back = head_params({k: v.numpy() for k, v in torch_policy.head_state_dict().items()}, head, "test")
        for path, leaf in traverse_util.flatten_dict(head).items():
            np.testing.assert_array_equal(np.asarray(traverse_util.flatten_dict(back)[path]), np.asarray(leaf))


def test_ppo_from_a_config_changes_only_the_trainable_parameters(tmp_path):
    from jaxrl_vla.build import build_trainer

    cfg = resolve({
        "trainer": {"num_envs": 4, "buffer_size": 4, "iterations": 2, "eval_freq": 0, "progress": False,
                    "output_dir": str(tmp_path), "exp_name": "gaussian"},
        "algorithm": {"name": "ppo", "cfg": {"n_epochs": 1, "batch_size": 8, "learning_rate": 1e-3}},
        "policy": {"name": "vla", "action_chunk": 2, "action_head": {"type": "gaussian", "init_log_std": -0.5},
                   "freeze": ["lm/model/vision_model"], "vla_config": {"model_config": SMOLVLM}},
        "env": {"name": "VLReach-v0", "image_size": 16},
    })
    trainer = build_trainer(cfg)
    assert trainer.init_params is not None  # the config's policy weights, what training starts from
    before = traverse_util.flatten_dict(jax.device_get(trainer.init_params), sep="/")
    trainer.train()
    after = traverse_util.flatten_dict(jax.device_get(trainer.state.params), sep="/")
    records = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(r["loss/total"]) for r in records)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and not any("vision_model" in k for k in changed)
    assert any("action_mean" in k for k in changed) and any("text_model" in k for k in changed)
    assert any(k.endswith("log_std") for k in changed) and any("proprio_proj" in k for k in changed)


def test_grpo_from_a_config_trains_the_head_on_a_vlm_prefix_and_leaves_the_value_head(tmp_path):
    """GRPO (critic-free) takes the Gaussian head on a SmolVLM prefix like any policy: groups of one scene,
    finite losses, the action head and LM trained, the value head untouched."""
    from jaxrl_vla.build import build_trainer

    cfg = resolve({
        "trainer": {"num_envs": 4, "buffer_size": 8, "iterations": 2, "eval_freq": 0, "progress": False,
                    "output_dir": str(tmp_path), "exp_name": "gaussian_grpo"},
        "algorithm": {"name": "grpo", "cfg": {"group_size": 2, "reward": "return", "n_epochs": 1, "batch_size": 8,
                                              "learning_rate": 1e-3}},
        "policy": {"name": "vla", "action_chunk": 2, "action_head": {"type": "gaussian", "init_log_std": -0.5},
                   "vla_config": {"model_config": SMOLVLM}},
        "env": {"name": "VLReach-v0", "image_size": 16},
    })
    trainer = build_trainer(cfg)
    before = traverse_util.flatten_dict(jax.device_get(trainer.init_params), sep="/")
    trainer.train()
    after = traverse_util.flatten_dict(jax.device_get(trainer.state.params), sep="/")
    records = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(r["loss/total"]) for r in records)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert any("action_mean" in k for k in changed) and any("text_model" in k for k in changed)
    value_keys = [k for k in before if "/value_head/" in f"/{k}"]
    assert value_keys and not (changed & set(value_keys)), sorted(changed & set(value_keys))


@pytest.mark.parametrize("head,message", [
    ({"type": "gausian"}, "policy.action_head.type must be one of ['tokens', 'flow', 'gaussian'], got 'gausian'"),
    ({"type": "gaussian", "n_bins": 16}, "policy.action_head.n_bins: unknown key for type 'gaussian'"),
    ({"type": "gaussian", "init_log_std": "low"}, "policy.action_head.init_log_std must be a number"),
    ({"type": "gaussian", "proprio": 1}, "policy.action_head.proprio must be true or false"),
])
def test_bad_gaussian_head_settings_name_the_field(head, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")):
        build_vla_policy(policy_cfg(head), vl_reach())


def test_a_head_file_that_does_not_fit_names_the_key_and_both_shapes(tmp_path):
    from safetensors.numpy import save_file

    from jaxrl_vla.models.lm_policy import _with_head_file
    from jaxrl_vla.models.vla.gaussian_vla import HEAD_FILE, head_state_dict

    policy, variables, _ = build_vla_policy(policy_cfg({"type": "gaussian"}), vl_reach())
    model_vars = {"params": variables["params"]["model"]}
    head = head_state_dict({k: v for k, v in model_vars["params"].items() if k != "lm"})
    head = {k: v + 1.0 for k, v in head.items()}
    save_file(head, str(tmp_path / HEAD_FILE))
    loaded = _with_head_file(model_vars, str(tmp_path))["params"]
    np.testing.assert_array_equal(np.asarray(loaded["action_mean"]["kernel"]), head["action_mean.weight"].T)
    np.testing.assert_array_equal(np.asarray(loaded["log_std"]), head["log_std"])
    save_file({**head, "log_std": np.zeros(3, np.float32)}, str(tmp_path / HEAD_FILE))
    with pytest.raises(ConfigError, match=r"action_head\.safetensors: log_std has shape \(3,\), the head \(2,\)"):
        _with_head_file(model_vars, str(tmp_path))
