"""Auxiliary losses on privileged simulator state: VLReach's label, the policy's head, PPO's loss, the CLI.

What could break and is checked here: the label is the instructed object (not another one, not in
pixel units); no policy input ever contains it (ActorCritic flattens every leaf; the VLA reads named
keys); the head starts silent (zero, so it cannot disturb a pretrained policy) and is left out of
the torch export; PPO's loss adds exactly `aux_coef` x the head's error and its gradient reaches the
trunk; bad settings are config errors naming the field; a run trains the head and resumes with it.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxrl_vla.algo import ppo
from jaxrl_vla.config import ConfigError, resolve
from jaxrl_vla.envs.vl_reach import PRIVILEGED_TARGET_KEY, PRIVILEGED_WAYPOINT_KEY, VLReach
from jaxrl_vla.models.actor_critic import ActorCritic
from jaxrl_vla.models.vla_policy import AUXILIARY_HEAD, auxiliary_loss, build_vla_policy, unwrap_variables
from jaxrl_vla.types import Batch

IMAGE = 32
TINY = {
    "vision_encoder": "tiny", "language_model": "tiny", "vocab_size": 18, "max_instruction_length": 8,
    "action_dim": 2, "proprio_dim": 4, "image_size": IMAGE, "value_hidden_dim": 16,
}


def env(privileged: bool = True, waypoint: bool = False) -> VLReach:
    return VLReach(image_size=IMAGE, privileged_target=privileged, privileged_waypoint=waypoint)


def policy_cfg(**kw) -> dict:
    cfg = {"name": "vla", "action_chunk": 1, "action_dim": None, "dtype": "float32", "freeze": [],
           "auxiliary_target": PRIVILEGED_TARGET_KEY,
           "vla_config": {"model_path": None, "model_class": "bridge.vla_models.GPTVLAModel",
                          "model_config": dict(TINY), "make_checkpoint": None}}
    cfg.update(kw)
    return cfg


def reset_batch(e: VLReach, n: int, seed: int = 0):
    return jax.vmap(e.reset)(jax.random.split(jax.random.PRNGKey(seed), n))


def test_vl_reach_privileged_target_is_the_instructed_objects_centre():
    states, obs = reset_batch(env(), 16)
    centre = np.asarray(states.object_pos)[np.arange(16), np.asarray(states.target)]  # [16, 2] in [0, 1]
    np.testing.assert_allclose(np.asarray(obs[PRIVILEGED_TARGET_KEY]), 2.0 * centre - 1.0, atol=1e-6)
    # the instructed object is a different one from scene to scene, so the label is not a scene constant
    assert len(np.unique(np.asarray(states.target))) > 1
    assert env().observation_space[PRIVILEGED_TARGET_KEY].shape == (2,)
    # off by default, and everything else is the same observation
    plain_states, plain = reset_batch(env(privileged=False), 16)
    assert PRIVILEGED_TARGET_KEY not in plain and PRIVILEGED_TARGET_KEY not in env(False).observation_space
    for key in plain:
        np.testing.assert_array_equal(np.asarray(plain[key]), np.asarray(obs[key]))
    # and after a step (the label follows the state, whose objects do not move)
    _, ts = jax.vmap(env().step)(states, jnp.ones((16, 2)) * 0.3)
    np.testing.assert_allclose(np.asarray(ts.obs[PRIVILEGED_TARGET_KEY])[~np.asarray(ts.terminated)],
                               (2.0 * centre - 1.0)[~np.asarray(ts.terminated)], atol=1e-6)


def segment_clearance(a: np.ndarray, b: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Plain-NumPy distance from each centre [k, 2] to the segment a-b (an independent check of the route)."""
    ab = b - a
    t = np.clip(((centres - a) @ ab) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
    return np.linalg.norm(centres - (a + t[:, None] * ab), axis=-1)


def test_vl_reach_privileged_waypoint_is_the_next_point_of_a_clear_route():
    e = env(privileged=False, waypoint=True)
    assert e.observation_space[PRIVILEGED_WAYPOINT_KEY].shape == (2,) and PRIVILEGED_WAYPOINT_KEY not in env().observation_space
    # nothing in the way: the waypoint is the target's centre
    objects = [[0.8, 0.5], [0.2, 0.2], [0.2, 0.8], [0.8, 0.15]]
    open_state = e.state_from_layout(objects, [0, 1, 2, 3], [0, 1, 2, 0], target=0, effector=[0.2, 0.5])
    np.testing.assert_allclose(np.asarray(e.observe(open_state)[PRIVILEGED_WAYPOINT_KEY]), [0.6, 0.0], atol=1e-6)
    # object 1 stands on the straight line: the waypoint leaves it, is not the target, and is reached clear of
    # every other object (checked in NumPy); the expert heads straight for it
    blocked = e.state_from_layout([[0.8, 0.5], [0.5, 0.5], [0.2, 0.8], [0.8, 0.15]], [0, 1, 2, 3], [0, 1, 2, 0],
                                  target=0, effector=[0.2, 0.5])
    waypoint = (np.asarray(e.observe(blocked)[PRIVILEGED_WAYPOINT_KEY]) + 1.0) / 2.0
    assert np.linalg.norm(waypoint - [0.8, 0.5]) > 0.1
    others = np.asarray(blocked.object_pos)[1:]
    assert segment_clearance(np.array([0.2, 0.5]), waypoint, others).min() >= e.touch_radius
    heading = np.asarray(e.expert_action(blocked))
    direction = waypoint - [0.2, 0.5]
    assert heading @ direction / (np.linalg.norm(heading) * np.linalg.norm(direction)) > 0.999
    # over random scenes (a fifth of them with the route bent at reset) the expert heads for it
    states, obs = reset_batch(e, 64)
    labels = (np.asarray(obs[PRIVILEGED_WAYPOINT_KEY]) + 1.0) / 2.0
    centres = np.asarray(states.object_pos)[np.arange(64), np.asarray(states.target)]
    assert np.any(np.linalg.norm(labels - centres, axis=-1) > 0.05)
    direction = labels - np.asarray(states.effector)
    heading = np.asarray(jax.vmap(e.expert_action)(states))
    cosine = np.sum(direction * heading, -1) / (np.linalg.norm(direction, axis=-1) * np.linalg.norm(heading, axis=-1))
    assert cosine.min() > 0.999


def test_several_targets_share_one_head_and_their_errors_add():
    e = env(waypoint=True)
    _, obs = reset_batch(e, 8)
    both = (PRIVILEGED_TARGET_KEY, PRIVILEGED_WAYPOINT_KEY)
    policy, variables, _ = build_vla_policy(policy_cfg(auxiliary_target=list(both)), e)
    assert policy.auxiliary_targets == both and variables["params"][AUXILIARY_HEAD]["kernel"].shape == (64, 4)
    rng = np.random.default_rng(1)
    head = {"kernel": jnp.asarray(rng.normal(size=(64, 4)), jnp.float32), "bias": jnp.zeros((4,))}
    variables = {**variables, "params": {**variables["params"], AUXILIARY_HEAD: head}}
    features = np.asarray(policy.apply(variables, obs, method=lambda m, o: m.model.features(o)))
    prediction = features @ np.asarray(head["kernel"])
    expected = np.mean(np.sum((prediction[:, :2] - np.asarray(obs[PRIVILEGED_TARGET_KEY])) ** 2, -1)
                       + np.sum((prediction[:, 2:] - np.asarray(obs[PRIVILEGED_WAYPOINT_KEY])) ** 2, -1))
    np.testing.assert_allclose(float(auxiliary_loss(policy)(variables, obs, obs)), expected, rtol=1e-5)
    with pytest.raises(ConfigError, match="names a key twice"):
        build_vla_policy(policy_cfg(auxiliary_target=[PRIVILEGED_TARGET_KEY] * 2), e)
    with pytest.raises(ConfigError, match="no observation 'privileged_waypoint_xy'.*offers privileged_target_xy"):
        build_vla_policy(policy_cfg(auxiliary_target=list(both)), env())


def test_actor_critic_never_reads_privileged_keys():
    e = env()
    _, obs = reset_batch(e, 4)
    obs = {k: v for k, v in obs.items() if k != "rgb"}  # a small MLP input
    policy = ActorCritic(e.action_space, (8,))
    without = {k: v for k, v in obs.items() if k != PRIVILEGED_TARGET_KEY}
    params = policy.init(jax.random.PRNGKey(0), without)
    shifted = {**obs, PRIVILEGED_TARGET_KEY: obs[PRIVILEGED_TARGET_KEY] + 100.0}
    for o in (obs, shifted):
        np.testing.assert_array_equal(np.asarray(policy.apply(params, o)[0].mean),
                                      np.asarray(policy.apply(params, without)[0].mean))


def test_auxiliary_head_starts_silent_and_is_left_out_of_the_export():
    e = env()
    _, obs = reset_batch(e, 4)
    policy, variables, mask = build_vla_policy(policy_cfg(), e)
    plain_policy, plain_variables, _ = build_vla_policy(policy_cfg(auxiliary_target=None), e)
    head = variables["params"][AUXILIARY_HEAD]
    assert head["kernel"].shape == (64, 2) and not np.any(np.asarray(head["kernel"]))  # GPT-2 tiny: 64 wide
    assert mask["params"][AUXILIARY_HEAD]["kernel"] is True
    assert traverse_util.flatten_dict(unwrap_variables(variables)).keys() == \
        traverse_util.flatten_dict(unwrap_variables(plain_variables)).keys()
    # the head changes nothing the policy does, and the label changes nothing it sees
    np.testing.assert_array_equal(np.asarray(policy.apply(variables, obs)[0].mean),
                                  np.asarray(plain_policy.apply(plain_variables, obs)[0].mean))
    moved = {**obs, PRIVILEGED_TARGET_KEY: -obs[PRIVILEGED_TARGET_KEY]}
    np.testing.assert_array_equal(np.asarray(policy.apply(variables, moved)[0].mean),
                                  np.asarray(policy.apply(variables, obs)[0].mean))
    # a zero head predicts 0: its loss is the labels' mean square
    label = np.asarray(obs[PRIVILEGED_TARGET_KEY])
    loss = auxiliary_loss(policy)(variables, obs, obs)
    np.testing.assert_allclose(float(loss), np.mean(np.sum(label ** 2, axis=-1)), rtol=1e-6)
    assert auxiliary_loss(plain_policy) is None


def scored_batch(policy, variables, obs) -> Batch:
    dist, value = policy.apply(variables, obs)
    action = dist.sample(jax.random.PRNGKey(1))
    n = value.shape[0]
    return Batch(obs, action, dist.log_prob(action), value, jax.random.normal(jax.random.PRNGKey(2), (n,)),
                 value + 0.5, jnp.zeros((n,), jnp.int32))


def test_ppo_loss_adds_aux_coef_times_the_head_error_and_it_reaches_the_trunk():
    e = env()
    _, obs = reset_batch(e, 8)
    policy, variables, _ = build_vla_policy(policy_cfg(), e)
    rng = np.random.default_rng(0)  # a head that predicts something, so its error has a gradient everywhere
    head = {"kernel": jnp.asarray(rng.normal(size=(64, 2)), jnp.float32), "bias": jnp.asarray([0.1, -0.2])}
    variables = {**variables, "params": {**variables["params"], AUXILIARY_HEAD: head}}
    batch = scored_batch(policy, variables, obs)
    aux = auxiliary_loss(policy)
    aux_fn = lambda p, o: aux(p, o, o)  # noqa: E731
    cfg = ppo.PPOConfig(aux_coef=0.7)
    base, base_metrics = ppo.ppo_loss(variables, policy.apply, batch, cfg)
    total, metrics = ppo.ppo_loss(variables, policy.apply, batch, cfg, aux_fn)
    # the head's error computed here from the readout features, independently of auxiliary_loss
    features = np.asarray(policy.apply(variables, obs, method=lambda m, o: m.model.features(o)))
    prediction = features @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    expected = np.mean(np.sum((prediction - np.asarray(obs[PRIVILEGED_TARGET_KEY])) ** 2, axis=-1))
    np.testing.assert_allclose(float(metrics["loss/aux"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(total), float(base) + 0.7 * expected, rtol=1e-5)
    assert "loss/aux" not in base_metrics
    # its gradient flows into the shared trunk (GPT-2) but not into the action or value heads
    grad_aux = jax.grad(lambda p: aux_fn(p, obs))(variables)["params"]["model"]
    assert np.abs(np.asarray(grad_aux["language"]["h_0"]["attn"]["c_attn"]["kernel"])).max() > 0
    assert not np.any(np.asarray(grad_aux["action_mean"]["kernel"]))
    assert not np.any(np.asarray(grad_aux["value_out"]["kernel"]))


def config(**policy) -> dict:
    return {"env": {"name": "VLReach-v0"}, "policy": {"name": "vla", **policy}, "algorithm": {"cfg": {}}}


@pytest.mark.parametrize("raw, field", [
    (config(auxiliary_target=PRIVILEGED_TARGET_KEY), "algorithm.cfg.aux_coef"),  # a head that would never train
    ({**config(), "algorithm": {"cfg": {"aux_coef": 1.0}}}, "policy.auxiliary_target"),  # a weight with no label
    ({"env": {"name": "CartPole-v1"}, "policy": {"auxiliary_target": "privileged_x"},
      "algorithm": {"cfg": {"aux_coef": 1.0}}}, "only a vla policy"),
    ({**config(auxiliary_target=[]), "algorithm": {"cfg": {"aux_coef": 1.0}}}, "policy.auxiliary_target.*non-empty list"),
    ({**config(auxiliary_target=["privileged_target_xy", 3]), "algorithm": {"cfg": {"aux_coef": 1.0}}},
     "policy.auxiliary_target.*list of keys"),
])
def test_config_cross_checks(raw, field):
    with pytest.raises(ConfigError, match=field):
        resolve(raw)


def test_target_must_be_a_privileged_key_the_env_offers():
    with pytest.raises(ConfigError, match="'proprio' is not a privileged observation key"):
        build_vla_policy(policy_cfg(auxiliary_target="proprio"), env())
    with pytest.raises(ConfigError, match="env.privileged_target: true"):
        build_vla_policy(policy_cfg(), env(privileged=False))


@pytest.mark.parametrize("aux_coef", [0.0, 1.0])
def test_ppo_update_fits_the_head_only_when_weighted(aux_coef):
    """On a fixed batch, PPO's update with the auxiliary loss drives its error down (the gradient is applied with
    the right sign, through the optimiser and the freeze mask); with weight 0 the head is never touched."""
    e = env()
    _, obs = reset_batch(e, 64, seed=3)
    policy, variables, mask = build_vla_policy(policy_cfg(freeze=["vision"]), e)
    batch = scored_batch(policy, variables, obs)
    aux = auxiliary_loss(policy)
    aux_fn = lambda p, o: aux(p, o, o)  # noqa: E731
    cfg = ppo.PPOConfig(aux_coef=aux_coef, n_epochs=40, batch_size=64, learning_rate=3e-3, max_grad_norm=10.0)
    optimizer = ppo.make_optimizer(cfg, 40, mask)
    update = jax.jit(lambda v, s: ppo.update(v, s, batch, jax.random.PRNGKey(0), apply_fn=policy.apply,
                                             optimizer=optimizer, cfg=cfg, trainable_mask=mask, aux_loss_fn=aux_fn))
    new, _, _ = update(variables, optimizer.init(variables))
    before, after = float(aux_fn(variables, obs)), float(aux_fn(new, obs))
    if aux_coef:
        assert after < 0.5 * before
    else:
        assert after == pytest.approx(before) and not np.any(np.asarray(new["params"][AUXILIARY_HEAD]["kernel"]))
    stem = lambda v: np.asarray(v["params"]["model"]["vision"]["embedder"]["embedder"]["convolution"]["kernel"])  # noqa: E731
    np.testing.assert_array_equal(stem(new), stem(variables))  # frozen stays frozen


ITERATIONS = 4


@pytest.mark.parametrize("buffer_type", ["standard", "vla"])
def test_a_run_trains_the_head_and_resumes_with_it(tmp_path, buffer_type):
    """Through the CLI: the auxiliary loss is logged, the checkpoint holds the trained head, and the run resumes."""
    from jaxrl_vla import train
    from jaxrl_vla.eval import load_run

    cfg = {
        "trainer": {"buffer_type": buffer_type, "num_envs": 8, "buffer_size": 8 if buffer_type == "standard" else 64,
                    "iterations": ITERATIONS, "eval_freq": 0, "save_freq": 0,
                    "progress": False, "output_dir": str(tmp_path / "runs"), "exp_name": "aux", "cpu_devices": 1},
        "algorithm": {"cfg": {"learning_rate": 3e-3, "n_epochs": 2, "batch_size": 32, "gamma": 0.5,
                              "aux_coef": 1.0}},
        "policy": {"name": "vla", "auxiliary_target": PRIVILEGED_TARGET_KEY, "freeze": ["vision"],
                   "vla_config": {"model_path": None, "model_config": TINY}},
        "env": {"name": "VLReach-v0", "image_size": IMAGE, "privileged_target": True},
    }
    path = tmp_path / "aux.json"
    path.write_text(json.dumps(cfg))
    assert train.main(["--config", str(path)]) == 0
    run_dir = next((tmp_path / "runs").iterdir())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss/aux"] for r in records]
    assert len(losses) == ITERATIONS and all(np.isfinite(losses))
    run = load_run(run_dir)
    assert np.abs(np.asarray(run.params["params"][AUXILIARY_HEAD]["kernel"])).max() > 0  # trained and saved
    assert train.main(["--resume", str(run_dir), "--set", f"trainer.iterations={ITERATIONS + 1}"]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records][-2:] == [ITERATIONS, ITERATIONS + 1] and "loss/aux" in records[-1]
