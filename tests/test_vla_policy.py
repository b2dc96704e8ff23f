"""VLAPolicy: the Policy contract, freezing, chunks, bf16, loading from torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxrl_vla.algo import ppo
from jaxrl_vla.config import ConfigError
from jaxrl_vla.envs.base import Box
from jaxrl_vla.models.actor_critic import ActorCritic
from jaxrl_vla.models.vla import IMAGE_FEATURES_KEY
from jaxrl_vla.models.vla_policy import build_vla_policy, frozen_vision_encoder, unwrap_variables
from jaxrl_vla.training.rollout import make_rollout_fn
from jaxrl_vla.types import Batch

TINY = {
    "vision_encoder": "tiny", "language_model": "tiny", "vocab_size": 32, "max_instruction_length": 6,
    "action_dim": 2, "proprio_dim": 4, "image_size": 32, "value_hidden_dim": 16,
}

# the example configs' demonstration loss reads checkpoints/vl_reach_demos.npz, which tests do not make
NO_DEMOS = ("algorithm.cfg.demo_coef=0", "algorithm.demo_path=null", "algorithm.demo_augment=false")


class FakeEnv:
    action_space = Box(-1.0, 1.0, (2,))


def policy_cfg(**kw):
    cfg = {"name": "vla", "action_chunk": 1, "action_dim": None, "dtype": "float32", "freeze": [],
           "vla_config": {"model_path": None, "model_class": "bridge.vla_models.GPTVLAModel",
                          "model_config": dict(TINY), "make_checkpoint": None}}
    cfg.update(kw)
    return cfg


def obs(batch=4, key=0):
    k = jax.random.split(jax.random.PRNGKey(key), 3)
    return {
        "rgb": jax.random.randint(k[0], (batch, 32, 32, 3), 0, 255).astype(jnp.uint8),
        "proprio": jax.random.normal(k[1], (batch, 4)),
        "language": jax.random.randint(k[2], (batch, 6), 2, 32),
        "language_mask": jnp.ones((batch, 6), bool).at[:, 4:].set(False),
    }


def random_batch(policy, params, n=8):
    o = obs(n)
    dist, value = policy.apply(params, o)
    action = dist.sample(jax.random.PRNGKey(1))
    return Batch(o, action, dist.log_prob(action), value, jax.random.normal(jax.random.PRNGKey(2), (n,)),
                 value + 1.0, jnp.zeros((n,), jnp.int32))


def test_policy_contract_value_shape_and_action_dim():
    policy, params, mask = build_vla_policy(policy_cfg(), FakeEnv())
    dist, value = policy.apply(params, obs())
    assert dist.mean.shape == (4, 2) and value.shape == (4,)
    assert set(params) == {"params", "batch_stats"}


def test_chunks_give_one_value_per_chunk_step():
    cfg = policy_cfg(action_chunk=3)
    policy, params, _ = build_vla_policy(cfg, FakeEnv())
    dist, value = policy.apply(params, obs())
    assert dist.mean.shape == (4, 3, 2) and value.shape == (4, 3)
    assert policy.action_chunk == 3


def test_frozen_vision_and_batch_stats_stay_bit_identical_after_updates():
    cfg = policy_cfg(freeze=["language/h_0"])
    cfg["vla_config"]["model_config"]["freeze_vision_encoder"] = True
    policy, params, mask = build_vla_policy(cfg, FakeEnv())
    batch = random_batch(policy, params)
    algo = ppo.PPOConfig(n_epochs=2, batch_size=4, learning_rate=1e-2)
    opt = ppo.make_optimizer(algo, 10, mask)
    new, _, _ = jax.jit(lambda p, s: ppo.update(p, s, batch, jax.random.PRNGKey(0), apply_fn=policy.apply,
                                                 optimizer=opt, cfg=algo))(params, opt.init(params))
    before, after = traverse_util.flatten_dict(params, sep="/"), traverse_util.flatten_dict(new, sep="/")
    changed = {k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}
    assert not any(k.startswith("params/model/vision/") for k in changed)
    assert not any(k.startswith("params/model/language/h_0/") for k in changed)
    assert not any(k.startswith("batch_stats/") for k in changed)
    assert any(k.startswith("params/model/action_mean/") for k in changed)
    assert any(k.startswith("params/model/language/h_1/") for k in changed)


def test_frozen_leaves_get_no_gradient_and_grad_norm_counts_only_trainable_ones():
    """With the mask, update differentiates only trainable leaves (no backward pass through a frozen encoder)."""
    cfg = policy_cfg()
    cfg["vla_config"]["model_config"]["freeze_vision_encoder"] = True
    policy, params, mask = build_vla_policy(cfg, FakeEnv())
    batch = random_batch(policy, params)
    algo = ppo.PPOConfig(n_epochs=1, batch_size=batch.advantage.shape[0], learning_rate=1e-2)
    opt = ppo.make_optimizer(algo, 10, mask)
    run = lambda m: ppo.update(params, opt.init(params), batch, jax.random.PRNGKey(0), apply_fn=policy.apply,  # noqa: E731
                               optimizer=opt, cfg=algo, trainable_mask=m)[2]["grad_norm"]
    grads = jax.grad(lambda p: ppo.ppo_loss(p, policy.apply, batch, algo)[0])(params)
    trainable = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda g, t: g if t else None, grads, mask))
    want = float(np.sqrt(sum(float(jnp.sum(g ** 2)) for g in trainable)))
    np.testing.assert_allclose(float(run(mask)), want, rtol=1e-5)
    everything = float(np.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree_util.tree_leaves(grads))))
    assert everything > want  # the frozen encoder has non-zero gradients ...
    np.testing.assert_allclose(float(run(None)), everything, rtol=1e-5)  # ... which count only without the mask
    jaxpr = str(jax.make_jaxpr(lambda p: ppo.update(p, opt.init(p), batch, jax.random.PRNGKey(0),
                                                      apply_fn=policy.apply, optimizer=opt, cfg=algo,
                                                      trainable_mask=mask))(params))
    full = str(jax.make_jaxpr(lambda p: ppo.update(p, opt.init(p), batch, jax.random.PRNGKey(0),
                                                     apply_fn=policy.apply, optimizer=opt, cfg=algo))(params))
    assert jaxpr.count("dot_general") < full.count("dot_general")  # the encoder's backward pass is gone


def test_bfloat16_trunks_give_finite_float32_outputs():
    policy, params, _ = build_vla_policy(policy_cfg(dtype="bfloat16"), FakeEnv())
    dist, value = policy.apply(params, obs())
    assert value.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(dist.mean)))


@pytest.mark.parametrize("change,message", [
    ({"freeze": ["visoin"]}, "policy.freeze: 'visoin' matches no parameter"),
    ({"action_dim": 7}, "policy.action_dim (7) != the env's action dimension (2)"),
])
def test_bad_policy_config_names_the_field(change, message):
    with pytest.raises(ConfigError) as err:
        build_vla_policy(policy_cfg(**change), FakeEnv())
    assert message in str(err.value)


def test_missing_checkpoint_names_the_command_that_makes_it(tmp_path):
    cfg = policy_cfg()
    cfg["vla_config"].update(model_path=str(tmp_path / "vla.pt"), make_checkpoint="python -m bridge.pretrain_bc")
    with pytest.raises(ConfigError, match="vla.pt does not exist; create it with: python -m bridge.pretrain_bc"):
        build_vla_policy(cfg, FakeEnv())


def test_loading_a_torch_checkpoint_gives_owned_copies_of_its_weights(tmp_path):
    torch = pytest.importorskip("torch")
    from bridge.vla_models import GPTVLAModel as TorchVLA

    torch.manual_seed(0)
    model = TorchVLA(dict(TINY))  # training mode: BatchNorm must still use running stats
    path = tmp_path / "vla.pt"
    torch.save(model.state_dict(), path)
    cfg = policy_cfg()
    cfg["vla_config"]["model_path"] = str(path)
    policy, params, _ = build_vla_policy(cfg, FakeEnv())
    inner = unwrap_variables(params)
    log_std = inner["params"]["log_std"]
    np.testing.assert_array_equal(np.asarray(log_std), model.log_std.detach().numpy())
    kernel = inner["params"]["action_mean"]["kernel"]
    np.testing.assert_array_equal(np.asarray(kernel), model.action_mean.weight.detach().numpy().T)
    # the policy's torch twin gives the same action means
    o = obs(2)
    with torch.no_grad():
        torch_mean = model.forward({k: torch.from_numpy(np.array(v)) for k, v in o.items()}).numpy()
    np.testing.assert_allclose(np.asarray(policy.apply(params, o)[0].mean), torch_mean, atol=1e-4)


def test_frozen_vision_encoder_is_offered_only_when_the_whole_encoder_is_frozen():
    _, params, _ = build_vla_policy(policy_cfg(), FakeEnv())
    first_stage = next(k for k in params["params"]["model"]["vision"])
    offered = {}
    for freeze in ([], ["vision"], [f"vision/{first_stage}"], ["language"]):
        policy, _, mask = build_vla_policy(policy_cfg(freeze=freeze), FakeEnv())
        offered[tuple(freeze)] = frozen_vision_encoder(policy, mask) is not None
    assert offered == {(): False, ("vision",): True, (f"vision/{first_stage}",): False, ("language",): False}
    assert frozen_vision_encoder(ActorCritic(FakeEnv.action_space, (8,)), None) is None


@pytest.mark.parametrize("image_tokens", ["spatial", "pooled"])
def test_cached_image_features_give_the_policy_outputs_of_the_pixels(image_tokens):
    cfg = policy_cfg(freeze=["vision"])
    cfg["vla_config"]["model_config"]["image_tokens"] = image_tokens
    policy, params, mask = build_vla_policy(cfg, FakeEnv())
    o = obs(6)
    cached = frozen_vision_encoder(policy, mask)(params, o)
    assert IMAGE_FEATURES_KEY in cached and "rgb" not in cached
    assert cached[IMAGE_FEATURES_KEY].shape[:2] == (6, policy.model.config.num_image_tokens)
    (dist, value), (dist_c, value_c) = policy.apply(params, o), policy.apply(params, cached)
    np.testing.assert_allclose(np.asarray(dist_c.mean), np.asarray(dist.mean), atol=1e-6)
    np.testing.assert_allclose(np.asarray(value_c), np.asarray(value), atol=1e-6)


def test_trainer_with_frozen_vision_learns_the_same_from_cached_features(tmp_path, monkeypatch):
    """The Trainer stores the frozen ResNet's features in the rollout; PPO's result is that of the pixels."""
    from jaxrl_vla.build import build_trainer
    from jaxrl_vla.config import load_config
    from jaxrl_vla.training import trainer as trainer_module

    overrides = [
        "trainer.num_envs=4", "trainer.buffer_size=4", "trainer.iterations=2", "trainer.eval_freq=0",
        "trainer.save_freq=0", "algorithm.cfg.batch_size=8", "algorithm.cfg.n_epochs=2", 'policy.freeze=["vision"]',
        "policy.vla_config.model_config.vision_embedding_size=8", "policy.vla_config.model_config.vision_hidden_sizes=[8, 8]",
        "policy.vla_config.model_config.n_layer=1", f"trainer.output_dir={tmp_path}", *NO_DEMOS,
    ]
    cfg = load_config("configs/vla_example/scratch_config.json", overrides)
    encoders = []
    real = trainer_module.frozen_vision_encoder

    def recording(policy, mask):
        encoders.append(real(policy, mask))
        return encoders[-1]

    monkeypatch.setattr(trainer_module, "frozen_vision_encoder", recording)
    cached = build_trainer(cfg)
    initial = jax.tree_util.tree_map(np.asarray, cached.init_params)
    cached.train()
    monkeypatch.setattr(trainer_module, "frozen_vision_encoder", lambda policy, mask: None)
    pixels = build_trainer(cfg)
    pixels.train()
    assert len(encoders) == 1 and encoders[0] is not None
    got, want = traverse_util.flatten_dict(cached.state.params, sep="/"), traverse_util.flatten_dict(pixels.state.params, sep="/")
    start = traverse_util.flatten_dict(initial, sep="/")
    moved = [k for k in want if not np.array_equal(np.asarray(want[k]), start[k])]
    assert any(k.startswith("params/model/language/") for k in moved)
    assert not any(k.startswith("params/model/vision/") for k in moved)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), atol=1e-5, err_msg=k)
    # what the rollout stores with that encoder: the features, not the pixels
    rollout = make_rollout_fn(cached.policy.apply, cached.vec_env, 2, 1, encoders[0])
    s = cached.state
    transitions = jax.jit(rollout)(s.params, None, s.env_state, s.obs, jax.random.PRNGKey(0), s.iteration)[2]
    assert IMAGE_FEATURES_KEY in transitions.obs and "rgb" not in transitions.obs
    assert transitions.obs[IMAGE_FEATURES_KEY].shape[:2] == (2, 4)


def test_lr_scale_takes_the_longest_matching_prefix_and_leaves_the_rest_at_one():
    from jaxrl_vla.models.vla_policy import learning_rate_scales

    _, params, _ = build_vla_policy(policy_cfg(), FakeEnv())
    scales = traverse_util.flatten_dict(
        learning_rate_scales(params, {"language": 0.1, "language/h_0/attn": 0.5, "action_mean/": 2.0}), sep="/")
    for path, scale in scales.items():
        inner = path.split("/", 2)[2]  # past "params/model/" (or "batch_stats/model/")
        want = (0.5 if inner.startswith("language/h_0/attn/") else 0.1 if inner.startswith("language/")
                else 2.0 if inner.startswith("action_mean/") else 1.0)
        assert scale == want, path
    assert {v for k, v in scales.items() if k.startswith("params/model/language/")} == {0.1, 0.5}
    with pytest.raises(ConfigError, match="policy.lr_scale: 'langauge' matches no parameter"):
        learning_rate_scales(params, {"langauge": 0.1})
    with pytest.raises(ConfigError, match="policy.lr_scale: 'language/h_0/at' matches no parameter"):
        learning_rate_scales(params, {"language/h_0/at": 0.1})  # whole path components only


def test_lr_scales_multiply_each_leafs_adam_step_and_keep_frozen_leaves_still():
    from jaxrl_vla.models.vla_policy import learning_rate_scales

    policy, params, mask = build_vla_policy(policy_cfg(freeze=["vision"]), FakeEnv())
    scales = learning_rate_scales(params, {"language": 0.25, "action_mean": 3.0})
    algo = ppo.PPOConfig(learning_rate=1e-2, max_grad_norm=1.0)
    plain, scaled = ppo.make_optimizer(algo, 10, mask), ppo.make_optimizer(algo, 10, mask, scales)
    grads = [jax.tree_util.tree_map(lambda p, i=i: jax.random.normal(jax.random.PRNGKey(i), p.shape), params)
             for i in range(3)]
    plain_state, scaled_state = plain.init(params), scaled.init(params)
    for g in grads:  # three steps: the Adam moments do not depend on the scales
        want, plain_state = plain.update(g, plain_state, params)
        got, scaled_state = scaled.update(g, scaled_state, params)
        flat_want, flat_got = traverse_util.flatten_dict(want, sep="/"), traverse_util.flatten_dict(got, sep="/")
        flat_scale = traverse_util.flatten_dict(scales, sep="/")
        for path in flat_want:
            np.testing.assert_allclose(np.asarray(flat_got[path]), flat_scale[path] * np.asarray(flat_want[path]),
                                       rtol=1e-6, err_msg=path)
            if path.startswith(("params/model/vision/", "batch_stats/")):
                assert not np.any(np.asarray(flat_got[path])), path
        assert np.any(np.asarray(flat_got["params/model/action_mean/kernel"]))


def test_trainer_applies_policy_lr_scale(tmp_path):
    """From the config to the update: one Adam step moves the scaled modules by the scale x the plain step."""
    from jaxrl_vla.build import build_trainer
    from jaxrl_vla.config import load_config

    overrides = [
        "trainer.num_envs=4", "trainer.buffer_size=4", "trainer.iterations=1", "trainer.eval_freq=0",
        "trainer.save_freq=0", "algorithm.cfg.batch_size=16", "algorithm.cfg.n_epochs=1", 'policy.freeze=["vision"]',
        "algorithm.cfg.lr_schedule=constant",
        "policy.vla_config.model_config.vision_embedding_size=8", "policy.vla_config.model_config.vision_hidden_sizes=[8, 8]",
        "policy.vla_config.model_config.n_layer=1", *NO_DEMOS,
    ]
    moves = {}
    for name, extra in (("plain", []), ("scaled", ['policy.lr_scale={"language": 0.25, "value_fc": 4}'])):
        trainer = build_trainer(load_config("configs/vla_example/scratch_config.json",
                                            overrides + [f"trainer.output_dir={tmp_path / name}"] + extra))
        start = traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, trainer.init_params), sep="/")
        trainer.train()
        end = traverse_util.flatten_dict(trainer.state.params, sep="/")
        moves[name] = {k: np.asarray(end[k], np.float64) - start[k] for k in start if k.startswith("params/")}
    for path, plain in moves["plain"].items():
        inner = path.removeprefix("params/model/")
        scale = 0.25 if inner.startswith("language/") else 4.0 if inner.startswith("value_fc/") else 1.0
        rounding = 4 * np.finfo(np.float32).eps * np.max(np.abs(start[path]))  # of the float32 weights themselves
        np.testing.assert_allclose(moves["scaled"][path], scale * plain, rtol=1e-4, atol=rounding, err_msg=path)
    assert np.max(np.abs(moves["plain"]["params/model/language/h_0/attn/c_attn/kernel"])) > 1e-5


@pytest.mark.parametrize("override,message", [
    ('policy.lr_scale={"language": 0}', "policy.lr_scale"),
    ('policy.lr_scale={"language": "fast"}', "policy.lr_scale"),
])
def test_bad_lr_scale_values_are_config_errors(override, message):
    from jaxrl_vla.config import load_config

    with pytest.raises(ConfigError, match=message):
        load_config("configs/vla_example/scratch_config.json", [override])


def test_lr_scale_on_an_mlp_policy_is_a_config_error():
    from jaxrl_vla.build import build_lr_scales

    with pytest.raises(ConfigError, match="policy.lr_scale: only policy.name 'vla'"):
        build_lr_scales({"name": "actor_critic", "lr_scale": {"pi": 0.5}}, None)
    assert build_lr_scales({"name": "vla", "lr_scale": {}}, None) is None
