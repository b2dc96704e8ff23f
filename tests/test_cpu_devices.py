"""trainer.cpu_devices: the CLI splits the host CPU into JAX devices, so standard mode runs data-parallel."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxrl_vla import train
from jaxrl_vla.config import load_config
from jaxrl_vla.training import sharding

EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "vla_example" / "train_config.json"


@pytest.mark.parametrize(
    ("requested", "num_envs", "batch_size", "cores", "expected"),
    [
        (0, 64, 256, 2, 2),     # the VLA example on 2 cores
        (0, 8, 64, 16, 8),      # never more devices than env batch or minibatch can be split into
        (0, 12, 64, 8, 4),      # the largest count that divides both
        (0, 7, 64, 8, 1),       # odd env count: no split
        (0, 64, 1024, 1, 1),
        (3, 8, 64, 2, 3),       # an explicit count is the user's (the Trainer checks its divisibility)
    ],
)
def test_device_count(requested, num_envs, batch_size, cores, expected):
    assert sharding.cpu_device_count(requested, num_envs, batch_size, cores) == expected


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], 4),                                           # 8 envs, 256-sample minibatches, 4 cores
        (["trainer.cpu_devices=1"], 1),
        (["trainer.buffer_type=vla", "trainer.buffer_size=2048"], 1),   # host collectors: auto stays off
        (["env.name=gymnasium:CartPole-v1"], 1),           # host env: auto stays off
        (["trainer.buffer_type=vla", "trainer.buffer_size=2048", "trainer.cpu_devices=2"], 2),  # explicit: applied
    ],
)
def test_auto_splits_only_a_vla_policy_in_standard_mode_with_a_jax_env(monkeypatch, overrides, expected):
    monkeypatch.setattr(sharding, "available_cores", lambda: 4)
    cfg = load_config(EXAMPLE, overrides)
    # in this process JAX already has its one CPU device (conftest): the count is computed, not applied
    assert train.apply_cpu_devices(cfg) == expected
    assert sharding.split_host_cpu(2) is False


@pytest.mark.parametrize("overrides", [[], ["trainer.cpu_devices=0"]])
def test_auto_leaves_an_mlp_policy_on_one_device(monkeypatch, overrides):
    """CartPole's MLP update is too short for the all-reduce between CPU devices (14x slower per iteration
    measured on 2 cores), so the default config stays on one device."""
    monkeypatch.setattr(sharding, "available_cores", lambda: 4)
    assert train.apply_cpu_devices(load_config(None, overrides)) == 1
    assert sharding.split_host_cpu(2) is False


def cli(*overrides: str, tmp_path, xla_flags: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    args = [sys.executable, "-m", "jaxrl_vla.train", "--no-progress", "--output-dir", str(tmp_path),
            "--set", "trainer.iterations=2", "--set", "trainer.eval_freq=2"]
    for override in overrides:
        args += ["--set", override]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)


def test_cli_trains_on_the_devices_it_asks_for(tmp_path):
    """A requested split takes effect in `python -m jaxrl_vla.train` (the run line says so and training
    completes on the mesh); 1 keeps one device; a device count in XLA_FLAGS is the user's and wins."""
    split = cli("trainer.cpu_devices=2", tmp_path=tmp_path / "a")
    assert split.returncode == 0, split.stderr[-3000:]
    assert "data-parallel over 2 cpu devices" in split.stdout + split.stderr
    single = cli("trainer.cpu_devices=1", tmp_path=tmp_path / "b")
    assert single.returncode == 0, single.stderr[-3000:]
    assert "data-parallel" not in single.stdout + single.stderr
    user = cli("trainer.cpu_devices=2", tmp_path=tmp_path / "c", xla_flags="--xla_force_host_platform_device_count=4")
    assert user.returncode == 0, user.stderr[-3000:]
    assert "data-parallel over 4 cpu devices" in user.stdout + user.stderr
