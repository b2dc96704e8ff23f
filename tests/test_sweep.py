"""Seeds vmapped in one program: each seed of a sweep follows the run of a single Trainer with that seed,
the seeds differ from one another, every seed gets its own metrics stream, and what a sweep cannot run is
named."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxrl_vla import Trainer
from jaxrl_vla.algo import PPOConfig
from jaxrl_vla.envs import make_env
from jaxrl_vla.models.actor_critic import ActorCritic
from jaxrl_vla.training.sweep import run_sweep

CFG = PPOConfig(learning_rate=2.5e-3, n_epochs=2, batch_size=128)


def trainer(tmp_path, seed=0, buffer_size=32, **kw):
    env = make_env("CartPole-v1")
    return Trainer(ActorCritic(env.action_space, (16, 16)), env, CFG, buffer_size=buffer_size, num_envs=8, seed=seed,
                   eval_freq=0, save_freq=0, output_dir=tmp_path, progress=False, **kw)


def test_each_seed_of_a_sweep_follows_its_single_run(tmp_path):
    result = run_sweep(trainer(tmp_path), num_seeds=3, iterations=4, iterations_per_call=2, output_dir=tmp_path / "sweep")
    assert result.seeds == [0, 1, 2]
    for index, seed in enumerate((0, 2)):
        single = trainer(tmp_path / f"single{seed}", seed=seed, iterations=4, iterations_per_call=2)
        single.train()
        swept = jax.tree_util.tree_map(lambda x: np.asarray(x)[seed], result.states.params)
        alone = jax.tree_util.tree_map(np.asarray, single.state.params)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), swept, alone)
    p = jax.tree_util.tree_leaves(result.states.params)[0]
    assert not np.allclose(np.asarray(p[0]), np.asarray(p[1]))  # different seeds, different agents
    for seed in result.seeds:
        lines = (result.run_dir / f"seed_{seed}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["iteration"] for x in lines] == [1, 2, 3, 4]
        assert all(json.loads(x)["learning_rate"] == pytest.approx(CFG.learning_rate) for x in lines)  # constant
    assert (result.run_dir / "params.msgpack").stat().st_size > 0


def test_a_sweep_refuses_what_it_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="standard mode with a JAX-native env"):
        run_sweep(trainer(tmp_path, buffer_type="vla", buffer_size=256, num_collectors=1), num_seeds=2,
                  iterations=1)
    with pytest.raises(ValueError, match="num_seeds"):
        run_sweep(trainer(tmp_path), num_seeds=2, iterations=1, seeds=[1, 2, 3])


def test_sweep_cli_writes_one_stream_per_seed(tmp_path):
    result = subprocess.run([sys.executable, "-m", "jaxrl_vla.sweep", "--num-seeds", "2", "--set", "trainer.iterations=2",
                             "--set", f"trainer.output_dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = tmp_path.iterdir()
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["seed_0", "seed_1"]
    bad = subprocess.run([sys.executable, "-m", "jaxrl_vla.sweep", "--num-seeds", "0"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "--num-seeds" in bad.stderr
