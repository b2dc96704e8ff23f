"""Hardening of the model side: master-weight dtypes, the model config checked against the env, GAE's
bootstrap on terminated-and-truncated steps, the ResNet's activations against transformers, and the
non-overwriting VLABuffer under threads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_vla.config import ConfigError
from jaxrl_vla.envs.base import Box
from jaxrl_vla.models.vla_policy import build_vla_policy

CLASS = "bridge.vla_models.GPTVLAModel"
TINY = {
    "vision_encoder": "tiny", "language_model": "tiny", "vocab_size": 32, "max_instruction_length": 6,
    "action_dim": 2, "proprio_dim": 4, "image_size": 32, "value_hidden_dim": 16,
}


class ActionOnlyEnv:
    """An env that describes only its actions (no observation_space): the input checks have nothing to read."""

    action_space = Box(-1.0, 1.0, (2,))


def policy_cfg(model_path=None, dtype="float32", **model_overrides):
    return {"name": "vla", "action_chunk": 1, "action_dim": None, "dtype": dtype, "freeze": [],
            "vla_config": {"model_path": model_path, "model_class": CLASS,
                           "model_config": {**TINY, **model_overrides}, "make_checkpoint": None}}


# ----------------------------------------------------------------------------- 3. master weights


@pytest.mark.torch
@pytest.mark.parametrize("ckpt_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("policy_dtype", ["float32", "bfloat16"])
def test_half_precision_checkpoint_gets_float32_master_weights_and_adam_state(tmp_path, ckpt_dtype, policy_dtype):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from bridge.vla_models import GPTVLAModel as TorchGPTVLA
    from jaxrl_vla.algo import ppo

    torch.manual_seed(0)
    half = getattr(torch, ckpt_dtype)
    state = {k: v.to(half) if v.is_floating_point() else v for k, v in TorchGPTVLA(TINY).state_dict().items()}
    torch.save(state, tmp_path / "half.pt")
    policy, variables, mask = build_vla_policy(policy_cfg(str(tmp_path / "half.pt"), policy_dtype), ActionOnlyEnv())
    floating = [leaf for leaf in jax.tree_util.tree_leaves(variables) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert floating and all(leaf.dtype == jnp.float32 for leaf in floating)
    # the values are the checkpoint's, exactly (a half value is representable in float32)
    log_std = state["log_std"].float().numpy()
    assert np.array_equal(np.asarray(variables["params"]["model"]["log_std"]), log_std)
    optimizer = ppo.make_optimizer(ppo.PPOConfig(), 10, mask)
    adam = [leaf for leaf in jax.tree_util.tree_leaves(optimizer.init(variables)) if getattr(leaf, "ndim", 0) > 0]
    assert adam and all(leaf.dtype == jnp.float32 for leaf in adam)
    obs = {"rgb": jnp.zeros((2, 32, 32, 3), jnp.uint8), "proprio": jnp.zeros((2, 4)),
           "language": jnp.full((2, 6), 3, jnp.int32), "language_mask": jnp.ones((2, 6), bool)}
    dist, value = policy.apply(variables, obs)
    assert dist.mean.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(value)))


# ----------------------------------------------------------------------------- 4. model inputs vs the env


def _reach(**kw):
    from jaxrl_vla.envs.vl_reach import VLReach

    return VLReach(**{"image_size": 32, "instruction_length": 6, **kw})


def test_vocab_size_below_the_env_token_ids_is_a_config_error():
    from jaxrl_vla.envs.vl_reach import tokenizer

    env = _reach()
    top = tokenizer(6).vocab_size - 1  # VLReach's largest token id
    assert int(env.observation_space["language"].high) == top
    with pytest.raises(ConfigError) as err:
        build_vla_policy(policy_cfg(vocab_size=top), env)
    assert str(err.value) == (f"policy.vla_config.model_config.vocab_size ({top}) is too small for observation "
                              f"'language': the env's token ids go up to {top} (needs vocab_size >= {top + 1})")
    # exactly enough ids, and the model runs on the env's own observations
    policy, variables, _ = build_vla_policy(policy_cfg(vocab_size=top + 1), env)
    _, obs = env.reset(jax.random.PRNGKey(0))
    dist, value = policy.apply(variables, jax.tree_util.tree_map(lambda x: x[None], obs))
    assert dist.mean.shape == (1, 2) and bool(jnp.isfinite(value).all())


@pytest.mark.parametrize(
    "env_kw, override, needle",
    [
        ({"image_size": 48}, {}, "image_size (32) != observation 'rgb''s size 48 (its shape is (48, 48, 3))"),
        ({}, {"proprio_dim": 2}, "proprio_dim (2) != observation 'proprio''s size 4 (its shape is (4,))"),
        ({"proprio_velocity": False}, {}, "proprio_dim (4) != observation 'proprio''s size 2"),
        ({"instruction_length": 9}, {"n_positions": 16}, "max_instruction_length (6) is below observation "
                                                          "'language''s size 9"),
        ({}, {"use_depth": True}, "the model reads observation 'depth' (image_size=32), which the env does not offer"),
        ({"use_depth": True, "image_size": 40}, {"use_depth": True, "image_size": 40, "vocab_size": 5},
         "vocab_size (5) is too small"),
    ],
    ids=["image_size", "proprio_dim", "proprio_position_only", "instruction_length", "depth_missing", "vocab"],
)
def test_model_config_against_the_observation_space_names_field_key_and_sizes(env_kw, override, needle):
    with pytest.raises(ConfigError) as err:
        build_vla_policy(policy_cfg(**override), _reach(**env_kw))
    message = str(err.value)
    assert message.startswith("policy.vla_config.model_config") and needle in message and "\n" not in message


def test_inputs_are_checked_before_the_checkpoint_is_read(tmp_path):
    """A mismatch is reported from the config alone: the (here unreadable) checkpoint is never opened."""
    (tmp_path / "noise.pt").write_bytes(b"not read")
    with pytest.raises(ConfigError, match="image_size"):
        build_vla_policy(policy_cfg(str(tmp_path / "noise.pt")), _reach(image_size=40))


def test_other_model_families_register_their_own_input_checks(monkeypatch):
    from jaxrl_vla.models import vla_policy

    class Env:
        action_space = Box(-1.0, 1.0, (2,))
        observation_space = {"state": Box(-1.0, 1.0, (5,))}

    monkeypatch.setitem(vla_policy.INPUT_SPECS, "MyVLA", lambda cfg: {
        "state": (vla_policy.InputRequirement("state_dim", cfg["state_dim"], 0),)})
    vla_policy.check_model_inputs("pkg.MyVLA", {"state_dim": 5}, Env())
    with pytest.raises(ConfigError, match=r"model_config\.state_dim \(3\) != observation 'state''s size 5"):
        vla_policy.check_model_inputs("pkg.MyVLA", {"state_dim": 3}, Env())
    vla_policy.check_model_inputs("pkg.Unregistered", {"anything": 1}, Env())  # unknown families: no check


# ----------------------------------------------------------------------------- 6. GAE bootstrap selection


def _numpy_gae(rewards, values, next_values, terminated, dones, gamma, lam):
    """Textbook GAE, one step at a time, with Python branches (no masks to multiply)."""
    adv = np.zeros_like(values, dtype=np.float64)
    for n in range(values.shape[1]):
        running = 0.0
        for t in reversed(range(values.shape[0])):
            delta = rewards[t, n] + (0.0 if terminated[t, n] else gamma * next_values[t, n]) - values[t, n]
            running = delta if dones[t, n] else delta + gamma * lam * running
            adv[t, n] = running
    return adv, adv + values


def _transitions(rng, T, N, bad):
    from jaxrl_vla.types import Transition

    terminated = rng.random((T, N)) < 0.15
    truncated = rng.random((T, N)) < 0.15
    terminated[3, 0] = truncated[3, 0] = True  # at least one step ends both ways
    both = terminated & truncated
    final_value = np.where(truncated, rng.normal(size=(T, N)), 0.0).astype(np.float32)
    final_value = np.where(both, np.float32(bad), final_value)  # V(final obs) of a terminated step: garbage
    zeros = np.zeros((T, N), np.int32)
    return Transition(obs=np.zeros((T, N, 1), np.float32), action=zeros, log_prob=np.zeros((T, N), np.float32),
                      value=rng.normal(size=(T, N)).astype(np.float32), reward=rng.normal(size=(T, N)).astype(np.float32),
                      terminated=terminated, truncated=truncated, final_value=final_value, chunk_index=zeros,
                      policy_version=zeros)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e30])
def test_gae_ignores_the_final_value_of_a_terminated_and_truncated_step(bad):
    from jaxrl_vla.algo import ppo

    rng = np.random.default_rng(0)
    T, N, gamma, lam = 12, 3, 0.97, 0.9
    rollout = _transitions(rng, T, N, bad)
    last_value = rng.normal(size=N).astype(np.float32)
    adv, ret = jax.jit(ppo.gae_from_transitions)(jax.tree_util.tree_map(jnp.asarray, rollout),
                                                   jnp.asarray(last_value), gamma, lam)
    assert bool(jnp.all(jnp.isfinite(adv))) and bool(jnp.all(jnp.isfinite(ret)))
    next_values = np.concatenate([rollout.value[1:], last_value[None]])
    next_values = np.where(rollout.truncated, rollout.final_value, next_values)
    dones = rollout.terminated | rollout.truncated
    ref_adv, ref_ret = _numpy_gae(rollout.reward, rollout.value, next_values, rollout.terminated, dones, gamma, lam)
    np.testing.assert_allclose(np.asarray(adv), ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), ref_ret, rtol=1e-5, atol=1e-5)
    # the same rollout with an honest 0 there gives bit-identical advantages
    clean = rollout.replace(final_value=np.where(rollout.terminated, 0.0, rollout.final_value).astype(np.float32))
    clean_adv, _ = jax.jit(ppo.gae_from_transitions)(jax.tree_util.tree_map(jnp.asarray, clean),
                                                     jnp.asarray(last_value), gamma, lam)
    np.testing.assert_array_equal(np.asarray(adv), np.asarray(clean_adv))


def test_ring_buffer_gae_ignores_a_nan_final_value_of_a_terminated_step():
    """The async mode's GAE (over the VLABuffer's ring) shares the selection."""
    from jaxrl_vla.algo import ppo
    from jaxrl_vla.buffer import circular

    rng = np.random.default_rng(1)
    T, N = 8, 3
    rollout = _transitions(rng, T, N, np.nan)
    state = circular.init(jax.tree_util.tree_map(lambda x: x[0], rollout), T)
    state = circular.add_batch(state, rollout)
    last_value = jnp.asarray(rng.normal(size=N).astype(np.float32))
    adv, ret = circular.gae(state, last_value, 0.99, 0.95)
    ref_adv, _ = ppo.gae_from_transitions(jax.tree_util.tree_map(jnp.asarray, rollout), last_value, 0.99, 0.95)
    assert bool(jnp.all(jnp.isfinite(adv))) and bool(jnp.all(jnp.isfinite(ret)))
    np.testing.assert_allclose(np.asarray(adv), np.asarray(ref_adv), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- 7. ResNet activations


@pytest.mark.torch
@pytest.mark.parametrize("hidden_act", ["gelu", "silu", "relu"])
@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_resnet_hidden_act_matches_transformers(hidden_act, layer_type):
    """hidden_act acts in the stem and after each residual sum; inside a residual layer transformers uses ReLU."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from bridge.vla_loading import torch_to_flax
    from jaxrl_vla.models.vla import ResNetModel, resnet_config

    sizes = {"basic": dict(hidden_sizes=(8, 16), depths=(2, 1)), "bottleneck": dict(hidden_sizes=(16, 32), depths=(1, 2))}
    cfg = resnet_config("tiny", layer_type=layer_type, hidden_act=hidden_act, **sizes[layer_type])
    torch.manual_seed(0)
    ref = transformers.ResNetModel(transformers.ResNetConfig(**cfg.to_hf_kwargs()))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # BN statistics and affine terms away from identity, so every activation sees negatives
        for mod in ref.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0.0, 0.2, generator=gen)
                mod.running_var.uniform_(0.5, 1.5, generator=gen)
                mod.bias.normal_(0.0, 0.3, generator=gen)
    ref.eval()
    pixels = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    with torch.no_grad():
        out = ref(pixel_values=pixels)
    with jax.default_matmul_precision("highest"):
        pooled, hidden = ResNetModel(cfg).apply(torch_to_flax(ref, ref.state_dict()),
                                                jnp.asarray(pixels.permute(0, 2, 3, 1).numpy()))
    want = out.last_hidden_state.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(hidden), want, rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.flatten(1).numpy(), rtol=0, atol=2e-5)
