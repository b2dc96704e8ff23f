"""policy.encoder: Nature-CNN and IMPALA torsos (against a NumPy reference) and ActorCritic on image observations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_vla.envs import make_env
from jaxrl_vla.envs.base import Box
from jaxrl_vla.models.actor_critic import ActorCritic
from jaxrl_vla.models.encoders import ImpalaCNN, NatureCNN


def np_conv(x: np.ndarray, p: dict, stride: int, same: bool) -> np.ndarray:
    """NHWC x HWIO convolution by explicit windows (TensorFlow/flax SAME padding for odd kernels)."""
    k = p["kernel"].shape[0]
    if same:
        x = np.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))[:, ::stride, ::stride]
    return np.einsum("bijchw,hwco->bijo", windows, p["kernel"]) + p["bias"]


def np_max_pool_same(x: np.ndarray) -> np.ndarray:
    """3x3 max-pool, stride 2, SAME: out = ceil(H / 2), padding split low/high with -inf."""
    h = x.shape[1]
    out = -(-h // 2)
    total = max((out - 1) * 2 + 3 - h, 0)
    x = np.pad(x, ((0, 0), (total // 2, total - total // 2), (total // 2, total - total // 2), (0, 0)),
               constant_values=-np.inf)
    return np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))[:, ::2, ::2].max(axis=(-1, -2))


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def np_nature(params: dict, x: np.ndarray) -> np.ndarray:
    for i, stride in enumerate((4, 2, 1)):
        x = relu(np_conv(x, params[f"Conv_{i}"], stride, same=False))
    x = x.reshape(x.shape[0], -1)
    return relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])


def np_impala(params: dict, x: np.ndarray) -> np.ndarray:
    for stage in range(3):
        x = np_max_pool_same(np_conv(x, params[f"Conv_{stage}"], 1, same=True))
        for block in (2 * stage, 2 * stage + 1):
            p = params[f"ResidualBlock_{block}"]
            y = np_conv(relu(x), p["Conv_0"], 1, same=True)
            x = x + np_conv(relu(y), p["Conv_1"], 1, same=True)
    x = relu(x).reshape(x.shape[0], -1)
    return relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])


@pytest.mark.parametrize("module, reference, size, features", [(NatureCNN(), np_nature, 40, 512),
                                                                (ImpalaCNN(), np_impala, 21, 256)],
                         ids=["nature_cnn", "impala"])
def test_torso_matches_numpy(module, reference, size, features) -> None:
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, size, size, 3))
    params = jax.jit(module.init)(jax.random.PRNGKey(1), x)
    out = jax.jit(module.apply)(params, x)
    assert out.shape == (2, features)
    np_params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params["params"])
    np.testing.assert_allclose(np.asarray(out), reference(np_params, np.asarray(x, np.float64)), rtol=1e-4, atol=1e-5)


def vl_obs(env, key):
    _, obs = jax.jit(env.reset)(key)
    return jax.tree_util.tree_map(lambda x: x[None], obs)


def test_actor_critic_reads_pixels_and_proprio(encoder: str = "nature_cnn") -> None:
    env = make_env("VLReach-v0", num_objects=2, image_size=36, privileged_target=True)
    policy = ActorCritic(env.action_space, (16,), encoder=encoder)
    obs = vl_obs(env, jax.random.PRNGKey(0))
    params = jax.jit(policy.init)(jax.random.PRNGKey(1), obs)
    assert "image_encoder" in params["params"]
    apply = jax.jit(policy.apply)

    def outputs(o):
        dist, value = apply(params, o)
        return np.asarray(dist.mean), np.asarray(value)

    base = outputs(obs)
    # uint8 pixels are scaled to [0, 1]: the same image as float32 / 255 ... is a float map, read as is
    as_float = dict(obs, rgb=obs["rgb"].astype(jnp.float32) / 255.0)
    np.testing.assert_allclose(outputs(as_float)[1], base[1], rtol=1e-5)
    for key, changed in (("rgb", 255 - obs["rgb"]), ("proprio", obs["proprio"] + 0.5)):
        assert not np.allclose(outputs(dict(obs, **{key: changed}))[1], base[1]), key
    # privileged keys are never an input
    np.testing.assert_array_equal(outputs(dict(obs, privileged_target_xy=obs["privileged_target_xy"] + 1))[1], base[1])


def test_encoder_errors_name_the_problem() -> None:
    env = make_env("VLReach-v0", num_objects=2, image_size=32)
    with pytest.raises(ValueError, match="at least 36"):
        jax.eval_shape(ActorCritic(env.action_space, (8,), encoder="nature_cnn").init, jax.random.PRNGKey(0),
                       vl_obs(env, jax.random.PRNGKey(0)))
    cartpole = make_env("CartPole-v1")
    with pytest.raises(ValueError, match="no image leaf"):
        ActorCritic(cartpole.action_space, (8,), encoder="impala").init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match="policy.encoder must be one of"):
        ActorCritic(Box(-1.0, 1.0, (2,)), (8,), encoder="resnet").init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))



@pytest.mark.parametrize("overrides, message", [
    (["policy.encoder=\"nature_cnn\""], "policy.encoder 'nature_cnn': the observation has no image leaf"),
    (["env.name=\"VLReach-v0\"", "env.image_size=32", "policy.encoder=\"nature_cnn\""], "at least 36 x 36"),
    (["policy.encoder=\"resnet\""], "policy.encoder"),
])
def test_cli_names_a_bad_encoder_and_writes_nothing(tmp_path, capsys, overrides, message) -> None:
    from jaxrl_vla import train

    args = ["--no-progress", "--output-dir", str(tmp_path / "runs")]
    for override in overrides:
        args += ["--set", override]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()

@pytest.mark.long  # ~10 min on 2 cores: python -m pytest -m long
def test_vl_reach_from_pixels_learns(tmp_path) -> None:
    """configs/vl_reach_cnn.json's agent (Nature-CNN on VLReach's 36x36 rgb + proprio + instruction, two
    objects) for 32 iterations: the training return climbs from a random policy's (about -0.1 to 0.1:
    the progress reward of aimless motion) to ~0.45 in the measured run (BENCHMARKS.md, vl_reach_cnn)."""
    import json

    from jaxrl_vla.build import build_trainer
    from jaxrl_vla.config import read_config_file, resolve

    raw = read_config_file("configs/vl_reach_cnn.json")
    raw["trainer"].update(iterations=32, eval_freq=0, save_freq=0, output_dir=str(tmp_path), progress=False)
    trainer = build_trainer(resolve(raw))
    trainer.train()
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    returns = [r["episode_return_mean"] for r in records if "episode_return_mean" in r]
    assert np.mean(returns[-4:]) > 0.25 and np.mean(returns[-4:]) > np.mean(returns[:4]) + 0.2
