"""Inputs that used to escape as tracebacks: env keyword arguments of the wrong type, gymnax ids without
gymnax, files that are not demo files, and rollouts too large for the device. Each is one error naming
the key, field or file; through the CLI, exit 2 with nothing written."""

import json
import subprocess
import sys

import numpy as np
import pytest

from jaxrl_vla.build import build_env
from jaxrl_vla.config import ConfigError
from jaxrl_vla.envs import make_env
from jaxrl_vla.tasks.demos import load_demos
from jaxrl_vla.training.memory import check_arrays_fit, space_bytes, transition_bytes


@pytest.mark.parametrize("kwargs,key,wanted", [
    ({"num_objects": "three"}, "num_objects", "an integer"),
    ({"image_size": 64.5}, "image_size", "an integer"),
    ({"num_objects": True}, "num_objects", "an integer"),
    ({"proprio_velocity": 1}, "proprio_velocity", "true/false"),
])
def test_env_kwarg_of_wrong_type_is_named(kwargs, key, wanted):
    with pytest.raises(ConfigError, match=rf"env\.{key}: expected {wanted}, got"):
        build_env({"name": "VLReach-v0", **kwargs})


def test_env_kwargs_of_right_type_pass():
    env = build_env({"name": "VLReach-v0", "num_objects": 3, "image_size": 32, "proprio_velocity": False})
    assert env.observation_space["rgb"].shape[0] == 32


def test_gymnax_id_without_gymnax_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnax", None)  # import gymnax now raises ImportError
    with pytest.raises(ConfigError, match=r"env\.name: 'gymnax:CartPole-v1' needs gymnax.*\[gymnax\]"):
        build_env({"name": "gymnax:CartPole-v1"})


def _pickle_file(path):
    import pickle

    path.write_bytes(pickle.dumps({"obs": [1, 2]}))


def _object_npz(path):
    with open(path, "wb") as f:
        np.savez(f, obs=np.array([{"a": 1}], dtype=object))


def _foreign_npz(path):
    with open(path, "wb") as f:
        np.savez(f, obs=np.zeros(3))


@pytest.mark.parametrize("make,what", [
    (lambda p: p.write_bytes(np.random.default_rng(0).bytes(3000)), "not an .npz archive"),
    (lambda p: p.write_text('{"a": 1}'), "not an .npz archive"),
    (_pickle_file, "not an .npz archive"),
    (_object_npz, "entry 'obs' holds Python objects"),
    (_foreign_npz, "without the 'format_version' entry"),
])
def test_file_that_is_not_a_demo_file_says_so(tmp_path, make, what):
    path = tmp_path / "demos.npz"
    make(path)
    with pytest.raises(ValueError) as err:
        load_demos(path)
    message = str(err.value)
    assert "not a demo file" in message and what in message and str(path) in message
    assert "allow_pickle" not in message and "pickled" not in message


def test_transition_bytes_counts_every_leaf():
    env = make_env("VLReach-v0", image_size=16)
    rgb = env.observation_space["rgb"]
    assert space_bytes(rgb) == int(np.prod(rgb.shape)) * np.dtype(rgb.dtype).itemsize
    assert transition_bytes(env.observation_space, env.action_space) > space_bytes(env.observation_space)


def test_rollout_too_large_for_the_device_names_the_fields():
    env = make_env("CartPole-v1")
    trainer = {"num_envs": 1_000_000, "buffer_size": 128, "num_eval_episodes": 10, "buffer_type": "standard"}
    with pytest.raises(ValueError, match=r"trainer\.buffer_size x trainer\.num_envs: the rollout needs about"):
        check_arrays_fit(env, trainer, limit=2**30)
    check_arrays_fit(env, {**trainer, "num_envs": 8}, limit=2**30)  # fits: no error
    with pytest.raises(ValueError, match=r"trainer\.num_eval_episodes"):
        check_arrays_fit(env, {**trainer, "num_envs": 8, "num_eval_episodes": 10**8}, limit=2**30)


def test_cli_refuses_a_huge_num_envs_before_writing(tmp_path):
    out = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, "-m", "jaxrl_vla.train", "--set", "trainer.num_envs=100000000", "--no-progress",
         "--output-dir", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "trainer.num_envs" in lines[0] and "GiB" in lines[0], lines
    assert not out.exists()
