"""PPO's demonstration loss (algorithm.cfg.demo_coef, algorithm.demo_path).

What could break and is checked here: the loss is the squared error of the policy's mean against
the expert's action (a NumPy reference) and PPO's loss adds exactly demo_coef times it; the update
draws demo minibatches that fit the policy to the demonstrations; chunk labels follow the episode
and stop at its end; a demo file for another env (missing key, other shapes, other vocabulary) is
refused with the key named; the Trainer, the AsyncTrainer and a frozen-vision VLA all feed the
demonstrations to the loss (the VLA through its precomputed image features, in slices that must
equal one pass); bad settings are config errors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_vla import Trainer
from jaxrl_vla.algo import ppo
from jaxrl_vla.build import build_trainer
from jaxrl_vla.config import ConfigError, resolve
from jaxrl_vla.envs import make_env
from jaxrl_vla.envs.vl_reach import VLReach
from jaxrl_vla.models.actor_critic import ActorCritic
from jaxrl_vla.models.distributions import DiagGaussian
from jaxrl_vla.tasks.demos import as_demonstrations, chunk_labels, collect_demos, save_demos
from jaxrl_vla.types import Batch, Demonstrations


def gaussian_policy(params, obs):
    """mean = obs @ W (2 action dims), value = obs @ v: the loss is easy to compute by hand."""
    return DiagGaussian(obs @ params["w"], params["log_std"]), obs @ params["v"]


def gaussian_params(seed: int = 0):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "v": jnp.zeros((3,)),
            "log_std": jnp.full((2,), -0.5)}


def expert(obs: np.ndarray) -> np.ndarray:
    """The demonstrations' labels: a fixed linear map the Gaussian policy can represent exactly."""
    return obs @ np.array([[0.5, -1.0], [1.0, 0.2], [-0.3, 0.7]], np.float32)


def demos_for(obs: np.ndarray) -> Demonstrations:
    return Demonstrations(obs=jnp.asarray(obs), action=jnp.asarray(expert(obs)))


def batch_of(obs: np.ndarray, params) -> Batch:
    """A rollout batch whose advantages are zero: PPO's own terms then pull nowhere."""
    n = len(obs)
    dist, value = gaussian_policy(params, jnp.asarray(obs))
    action = dist.mode()
    return Batch(obs=jnp.asarray(obs), action=action, log_prob=dist.log_prob(action), value=value,
                 advantage=jnp.zeros((n,)), returns=value, chunk_index=jnp.zeros((n,), jnp.int32))


def test_demo_loss_is_the_squared_error_of_the_mean():
    params = gaussian_params()
    obs = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    demos = demos_for(obs)
    mean = obs @ np.asarray(params["w"])
    reference = np.mean(np.sum((mean - expert(obs)) ** 2, axis=-1))
    assert float(ppo.demo_loss(params, gaussian_policy, demos)) == pytest.approx(reference, rel=1e-5)


def test_ppo_loss_adds_demo_coef_times_the_demo_loss():
    params = gaussian_params()
    rng = np.random.default_rng(2)
    batch = batch_of(rng.normal(size=(6, 3)).astype(np.float32), params)
    batch = batch.replace(advantage=jnp.asarray(rng.normal(size=6), jnp.float32))
    demos = demos_for(rng.normal(size=(4, 3)).astype(np.float32))
    cfg = ppo.PPOConfig(demo_coef=0.7)
    plain, plain_metrics = ppo.ppo_loss(params, gaussian_policy, batch, cfg)
    with_demos, metrics = ppo.ppo_loss(params, gaussian_policy, batch, cfg, demos=demos)
    expected = float(ppo.demo_loss(params, gaussian_policy, demos))
    assert float(metrics["loss/demo"]) == pytest.approx(expected, rel=1e-6)
    assert float(with_demos) == pytest.approx(float(plain) + 0.7 * expected, rel=1e-6)
    assert "loss/demo" not in plain_metrics
    assert float(metrics["loss/policy"]) == pytest.approx(float(plain_metrics["loss/policy"]), rel=1e-6)


def test_update_fits_the_policy_to_the_demonstrations():
    params = gaussian_params()
    rng = np.random.default_rng(3)
    demo_obs = rng.normal(size=(512, 3)).astype(np.float32)
    demos = demos_for(demo_obs)
    batch = batch_of(rng.normal(size=(256, 3)).astype(np.float32), params)
    cfg = ppo.PPOConfig(learning_rate=3e-2, n_epochs=8, batch_size=64, vf_coef=0.0, demo_coef=1.0,
                        max_grad_norm=10.0)
    optimizer = ppo.make_optimizer(cfg, 32)
    before = float(ppo.demo_loss(params, gaussian_policy, demos))
    update = jax.jit(lambda p, s, b, k, d: ppo.update(p, s, b, k, apply_fn=gaussian_policy, optimizer=optimizer,
                                                      cfg=cfg, demos=d))
    new_params, _, metrics = update(params, optimizer.init(params), batch, jax.random.PRNGKey(0), demos)
    after = float(ppo.demo_loss(new_params, gaussian_policy, demos))
    assert after < 0.2 * before, (before, after)
    assert "loss/demo" in metrics
    # the log-std is PPO's to move: the demonstration loss reads only the mean
    np.testing.assert_array_equal(np.asarray(new_params["log_std"]), np.asarray(params["log_std"]))
    # without demonstrations (and zero advantages, no value loss) the update moves nothing
    plain_cfg = cfg.replace(demo_coef=0.0)
    plain_params, _, _ = ppo.update(params, optimizer.init(params), batch, jax.random.PRNGKey(0),
                                    apply_fn=gaussian_policy, optimizer=optimizer, cfg=plain_cfg)
    np.testing.assert_allclose(np.asarray(plain_params["w"]), np.asarray(params["w"]), atol=1e-6)


def test_update_fits_the_augmented_demonstrations():
    """With `demos.augment` the loss reads every draw through it, with the draw's own row of
    `demos.augment_labels`: an augmentation that takes its label from there (another linear map, with a
    key-dependent sign flip of observation and label) pulls the policy onto that map."""
    params = gaussian_params()
    rng = np.random.default_rng(4)
    other = np.array([[-0.8, 0.3], [0.2, 0.9], [0.6, -0.4]], np.float32)

    def relabel(key, obs, action, labels):
        sign = jnp.where(jax.random.bernoulli(key), -1.0, 1.0)  # a label-consistent change per draw
        return sign * obs, sign * labels["other"]

    obs = rng.normal(size=(512, 3)).astype(np.float32)
    demos = demos_for(obs).replace(augment=relabel, augment_labels={"other": jnp.asarray(obs @ other)})
    batch = batch_of(rng.normal(size=(256, 3)).astype(np.float32), params)
    cfg = ppo.PPOConfig(learning_rate=3e-2, n_epochs=8, batch_size=64, vf_coef=0.0, demo_coef=1.0, max_grad_norm=10.0)
    optimizer = ppo.make_optimizer(cfg, 32)
    new_params, _, _ = jax.jit(lambda p, s, k, d: ppo.update(p, s, batch, k, apply_fn=gaussian_policy,
                                                             optimizer=optimizer, cfg=cfg, demos=d))(
        params, optimizer.init(params), jax.random.PRNGKey(0), demos)
    relabelled = demos_for(np.asarray(demos.obs)).replace(action=demos.obs @ jnp.asarray(other))

    def error(p):
        return float(ppo.demo_loss(p, gaussian_policy, relabelled))

    assert error(new_params) < 0.2 * error(params)
    # without the augmentation the same update fits the file's own labels instead
    plain, _, _ = ppo.update(params, optimizer.init(params), batch, jax.random.PRNGKey(0), apply_fn=gaussian_policy,
                             optimizer=optimizer, cfg=cfg, demos=demos.replace(augment=None))
    assert error(plain) > 0.5 * error(params)


def test_chunk_labels_follow_the_episode_and_stop_at_its_end():
    rng = np.random.default_rng(4)
    episode_id = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2], np.int32)
    action = rng.normal(size=(9, 2)).astype(np.float32)
    labels = chunk_labels(action, episode_id, 3)
    assert labels.shape == (9, 3, 2)
    for i in range(9):
        last = max(j for j in range(9) if episode_id[j] == episode_id[i])
        for k in range(3):
            np.testing.assert_array_equal(labels[i, k], action[min(i + k, last)])


IMAGE = 32


def test_weighted_draws_follow_the_weights():
    weight = np.array([0.0, 1.0, 3.0, 0.0, 2.0, 0.5], np.float32)
    demos = Demonstrations(obs=jnp.zeros((6, 1)), action=jnp.zeros((6, 1)), weight=jnp.asarray(weight))
    rows = np.asarray(ppo.draw_demo_rows(jax.random.PRNGKey(0), demos, 60_000))
    frequency = np.bincount(rows, minlength=6) / len(rows)
    np.testing.assert_allclose(frequency, weight / weight.sum(), atol=0.01)
    assert frequency[0] == 0 and frequency[3] == 0  # a zero weight is never drawn
    uniform = np.asarray(ppo.draw_demo_rows(jax.random.PRNGKey(1), demos.replace(weight=None), 60_000))
    np.testing.assert_allclose(np.bincount(uniform, minlength=6) / len(uniform), 1 / 6, atol=0.01)


EPISODES = 12
DETOUR_WEIGHT = 3.0


@pytest.fixture(scope="module")
def reach_demos():
    """Expert episodes of a 32x32 VLReach with detour weights, as a loaded demo file holds them."""
    env = VLReach(image_size=IMAGE)
    data = collect_demos(env, EPISODES, seed=0, noise_std=0.1, detour_weight=DETOUR_WEIGHT)
    data["vocab"] = list(env.tokenizer().vocab)
    data["episode_id"] = np.asarray(data["episode_id"])
    return env, data


def test_detour_weights_mark_the_episodes_whose_route_bends_at_reset(reach_demos):
    from jaxrl_vla.tasks.demos import episode_keys

    env, data = reach_demos
    # the reset of episode e, rebuilt from its key (run_episodes splits it into reset and acting keys)
    keys = episode_keys(0, 0, EPISODES)
    states, _ = jax.vmap(env.reset)(jax.vmap(lambda k: jax.random.split(k, 2)[0])(keys))
    bends = np.array([bool(env.route_detours(jax.tree_util.tree_map(lambda x: x[e], states))) for e in range(EPISODES)])
    assert 0 < bends.sum() < EPISODES  # the seed gives both kinds of scene
    expected = np.where(bends[data["episode_id"]], DETOUR_WEIGHT, 1.0)
    np.testing.assert_array_equal(data["weight"], expected)
    assert as_demonstrations(data, env).weight is not None
    with pytest.raises(ValueError, match="detour_weight: CartPole has no route_detours"):
        collect_demos(make_env("CartPole-v1"), 2, detour_weight=2.0)


def test_as_demonstrations_takes_the_envs_observations(reach_demos):
    env, data = reach_demos
    privileged = VLReach(image_size=IMAGE, privileged_target=True)
    demos = as_demonstrations(data, privileged)  # the training-only label need not be in the demos
    assert set(demos.obs) == {"rgb", "proprio", "language", "language_mask"}
    assert demos.size == len(data["action"]) and demos.action.shape == (demos.size, 2)
    chunked = as_demonstrations(data, env, chunk=4)
    assert chunked.action.shape == (demos.size, 4, 2)



def test_labels_outside_the_action_box_are_clipped_to_it(reach_demos):
    """What the env executes is the clipped action (Meta-World's experts emit up to +-12 in [-1, 1])."""
    from jaxrl_vla.envs.base import Box
    from jaxrl_vla.tasks.demos import clip_to_action_box

    env, data = reach_demos
    low, high = np.broadcast_to(np.asarray(env.action_space.low, np.float32), (2,)), np.broadcast_to(
        np.asarray(env.action_space.high, np.float32), (2,))
    wide = dict(data, action=np.asarray(data["action"], np.float32) * 10.0)
    labels = as_demonstrations(wide, env).action
    np.testing.assert_array_equal(labels, np.minimum(np.maximum(wide["action"], low), high))
    assert (np.abs(wide["action"]) > high).any()  # the case occurs
    inside = as_demonstrations(data, env).action  # labels inside the box are untouched
    np.testing.assert_array_equal(inside, np.asarray(data["action"], np.float32))
    per_dim = clip_to_action_box(np.array([[3.0, -3.0]], np.float32), Box((-1.0, -2.0), (1.0, 2.0), (2,)))
    np.testing.assert_array_equal(per_dim, [[1.0, -2.0]])
    discrete = object()  # a space without bounds (Discrete) leaves the labels as they are
    np.testing.assert_array_equal(clip_to_action_box(np.array([[7.0]], np.float32), discrete), [[7.0]])

@pytest.mark.parametrize("change,message", [
    (lambda d: d.pop("proprio"), "observation key 'proprio' of the env is missing"),
    (lambda d: d.update(rgb=d["rgb"][:, :16]), "observation 'rgb': demonstrations have uint8[16, 32, 3]"),
    (lambda d: d.update(action=d["action"][:, :1]), "action: demonstrations have [1] per step, the env [2]"),
    (lambda d: d.update(vocab=list(reversed(d["vocab"]))), "vocab: the demonstrations' token ids"),
    (lambda d: d.update(weight=-d["weight"]), "weight: expected"),
])
def test_as_demonstrations_refuses_a_file_for_another_env(reach_demos, change, message):
    env, data = reach_demos
    broken = dict(data)
    change(broken)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        as_demonstrations(broken, env)


def pendulum_demos(n: int = 256, seed: int = 5) -> Demonstrations:
    """Pendulum observations (cos, sin, angular velocity) labelled by `expert`, clipped to the action box."""
    rng = np.random.default_rng(seed)
    theta = rng.uniform(-np.pi, np.pi, n)
    obs = np.stack([np.cos(theta), np.sin(theta), rng.uniform(-8, 8, n)], -1).astype(np.float32)
    return Demonstrations(obs=obs, action=np.clip(expert(obs / [1, 1, 8])[:, :1] * 2, -2, 2).astype(np.float32))


def demo_loss_of(records) -> list[float]:
    return [r["loss/demo"] for r in records]


@pytest.mark.parametrize("buffer_type", ["standard", "vla"])
def test_trainers_feed_the_demonstrations_to_the_loss(tmp_path, buffer_type):
    from jaxrl_vla.training.async_trainer import AsyncTrainer

    env = make_env("Pendulum-v1")
    policy = ActorCritic(env.action_space, (32, 32))
    cfg = ppo.PPOConfig(learning_rate=3e-3, n_epochs=4, batch_size=128, demo_coef=5.0)
    kwargs = dict(buffer_size=32, num_envs=8, iterations=6, output_dir=tmp_path, exp_name="d", eval_freq=0,
                  progress=False, demos=pendulum_demos())
    records = []
    trainer_class = Trainer if buffer_type == "standard" else AsyncTrainer
    if buffer_type == "vla":
        kwargs.update(buffer_size=256, buffer_type="vla")
    trainer = trainer_class(policy, env, cfg, log_fn=records.append, **kwargs)
    trainer.train()
    losses = demo_loss_of(records)
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0], losses
    with pytest.raises(ValueError, match="algorithm.cfg.demo_coef > 0 needs demonstrations"):
        Trainer(policy, env, cfg, **dict(kwargs, demos=None, buffer_type="standard", buffer_size=32))
    with pytest.raises(ValueError, match="demo_coef is 0"):
        Trainer(policy, env, cfg.replace(demo_coef=0.0), **dict(kwargs, buffer_type="standard", buffer_size=32))


def tiny_vla_config(tmp_path, demo_file, freeze: list[str], demo_augment: bool = False) -> dict:
    """A resolved config: a tiny VLA on the 32x32 VLReach, 2 short iterations, PPO plus demo_file's demonstrations."""
    tiny = {"vision_encoder": "tiny", "language_model": "tiny", "vocab_size": 18, "max_instruction_length": 8,
            "action_dim": 2, "proprio_dim": 4, "image_size": IMAGE, "value_hidden_dim": 16}
    return resolve({
        "trainer": {"num_envs": 4, "buffer_size": 8, "iterations": 2, "eval_freq": 0, "progress": False,
                    "output_dir": str(tmp_path), "exp_name": "vla"},
        "algorithm": {"cfg": {"n_epochs": 1, "batch_size": 16, "demo_coef": 1.0}, "demo_path": str(demo_file),
                      "demo_augment": demo_augment},
        "policy": {"name": "vla", "freeze": freeze, "vla_config": {"model_path": None, "model_config": tiny}},
        "env": {"name": "VLReach-v0", "image_size": IMAGE},
    })


def test_frozen_vision_reads_the_demonstrations_as_image_features(tmp_path, reach_demos):
    from jaxrl_vla.models.vla.gpt_vla import IMAGE_FEATURES_KEY

    env, data = reach_demos
    save_demos(tmp_path / "d.npz", {k: v for k, v in data.items() if k != "vocab"}, "VLReach-v0", env.config(),
               data["vocab"], 0, 0.1)
    trainer = build_trainer(tiny_vla_config(tmp_path, tmp_path / "d.npz", freeze=["vision"]))
    assert trainer.demos.augment is None and trainer.demos.augment_labels is None  # no mirror labels carried unread
    records = []
    trainer.log_fn = records.append
    trainer.train()
    assert "loss/demo" in records[-1]
    # the learner reads features, never pixels, and slicing the encoder's work changes nothing
    encoded = trainer._device_demos
    assert IMAGE_FEATURES_KEY in encoded.obs and "rgb" not in encoded.obs
    in_slices = trainer._prepare_demos(trainer.state.params, rows_per_call=7)
    at_once = trainer._encode_demos(trainer.state.params, jax.tree_util.tree_map(jnp.asarray, trainer.demos))
    np.testing.assert_allclose(np.asarray(in_slices.obs[IMAGE_FEATURES_KEY]),
                               np.asarray(at_once.obs[IMAGE_FEATURES_KEY]), rtol=1e-5, atol=1e-5)
    assert in_slices.size == len(data["action"])


def test_demo_augment_trains_and_refuses_what_it_cannot_augment(tmp_path, reach_demos):
    """algorithm.demo_augment: a VLA learner reads the recoloured/mirrored draws (loss/demo logged); a demo file
    without the mirror labels, or a frozen vision encoder (features, not pixels), is a config error."""
    env, data = reach_demos

    def config(demo_file, freeze):
        return tiny_vla_config(tmp_path, demo_file, freeze, demo_augment=True)

    arrays = {k: v for k, v in data.items() if k != "vocab"}
    assert arrays["mirror_action"].shape == arrays["action"].shape
    full, old = tmp_path / "full.npz", tmp_path / "old.npz"
    save_demos(full, arrays, "VLReach-v0", env.config(), data["vocab"], 0, 0.1)
    save_demos(old, {k: v for k, v in arrays.items() if k != "mirror_action"}, "VLReach-v0", env.config(),
               data["vocab"], 0, 0.1)
    with pytest.raises(ConfigError, match="algorithm.demo_augment: .*old.npz has no mirror_action column"):
        build_trainer(config(old, []))
    with pytest.raises(ConfigError, match="algorithm.demo_augment: .*vision encoder frozen"):
        build_trainer(config(full, ["vision"]))
    trainer = build_trainer(config(full, []))
    assert trainer.demos.augment.__func__ is VLReach.augment_demonstration
    records = []
    trainer.log_fn = records.append
    trainer.train()
    assert np.isfinite(records[-1]["loss/demo"])


def test_demo_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="demo_coef > 0 needs algorithm.demo_path"):
        resolve({"algorithm": {"cfg": {"demo_coef": 0.5}}, "env": {"name": "Pendulum-v1"}})
    with pytest.raises(ConfigError, match="demo_coef is 0"):
        resolve({"algorithm": {"demo_path": "d.npz"}, "env": {"name": "Pendulum-v1"}})
    cfg = resolve({"algorithm": {"demo_path": str(tmp_path / "none.npz"), "cfg": {"demo_coef": 1.0}},
                   "env": {"name": "Pendulum-v1"}})
    with pytest.raises(ConfigError, match="algorithm.demo_path: no file .*none.npz; make it with: "
                                          "python -m jaxrl_vla.tasks.demos --out"):
        build_trainer(cfg)
    with pytest.raises(ConfigError, match="demo_augment needs algorithm.demo_path"):
        resolve({"algorithm": {"demo_augment": True}, "env": {"name": "Pendulum-v1"}})
    pendulum = tmp_path / "pendulum.npz"
    pendulum.write_bytes(b"")  # never read: the env is checked first
    cfg = resolve({"algorithm": {"demo_path": str(pendulum), "demo_augment": True, "cfg": {"demo_coef": 1.0}},
                   "env": {"name": "Pendulum-v1"}})
    with pytest.raises(ConfigError, match="algorithm.demo_augment: Pendulum.* has no augment_demonstration"):
        build_trainer(cfg)


def test_resume_with_demonstrations_ends_with_the_same_parameters(tmp_path):
    """The demonstrations are an argument of every call, not state: a stopped run resumed with the same
    demonstrations draws the same demo minibatches (their keys come from the checkpointed state)."""
    env = make_env("Pendulum-v1")
    policy = ActorCritic(env.action_space, (16, 16))
    cfg = ppo.PPOConfig(learning_rate=3e-3, n_epochs=2, batch_size=64, demo_coef=1.0)

    def trainer(directory, **kw):
        return Trainer(policy, env, cfg, buffer_size=16, num_envs=8, iterations=4, output_dir=directory,
                       exp_name="r", eval_freq=0, progress=False, iterations_per_call=1, demos=pendulum_demos(), **kw)

    uninterrupted = trainer(tmp_path / "a")
    uninterrupted.train()
    stopper = trainer(tmp_path / "b", log_fn=lambda r: r["iteration"] == 2 and stopper.request_stop())
    stopper.train()
    assert stopper.interrupted and int(stopper.state.iteration) < 4
    resumed = trainer(tmp_path / "b")
    resumed.train(resume=stopper.run_dir)
    same = jax.tree_util.tree_map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                                  uninterrupted.state.params, resumed.state.params)
    assert all(jax.tree_util.tree_leaves(same))
