"""The Python API as a user writes it (docs/python_api.md): one Trainer for every env and both
buffer types, the seed's algorithm dict, config.json that the CLI tools read, train() that
continues, save / load / predict, the callback, TorchRL obs_keys and the episode-limit warning,
and a resumed run that keeps its --total-timesteps budget."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest

from jaxrl_vla import PPOConfig, Trainer
from jaxrl_vla.config import ConfigError
from jaxrl_vla.envs import make_env
from jaxrl_vla.models.actor_critic import ActorCritic

SMALL = {"name": "ppo", "cfg": {"n_epochs": 1, "batch_size": 64, "learning_rate": 1e-3}}


def small_trainer(tmp_path, env="CartPole-v1", **kw):
    """A tiny PPO run on `env` (anything Trainer takes; its policy acts in CartPole's action space)."""
    settings = dict(buffer_size=32, num_envs=2, output_dir=tmp_path, progress=False, eval_freq=0, save_freq=0)
    settings.update(kw)
    policy = ActorCritic(make_env("CartPole-v1").action_space, (16,))
    return Trainer(policy, env, settings.pop("algorithm", SMALL), **settings)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_one_trainer_both_buffer_types_with_the_seeds_buffer_size(tmp_path):
    standard = small_trainer(tmp_path, buffer_type="standard")  # 32 steps per env x 2 envs
    vla = small_trainer(tmp_path, buffer_type="vla", buffer_size=64)  # a 64-transition circular buffer
    assert isinstance(standard, Trainer) and isinstance(vla, Trainer)
    assert standard.samples_per_iteration == vla.samples_per_iteration == 64
    vla.train(total_timesteps=128)
    assert int(vla.state.global_step) == 128 and int(vla.state.iteration) == 2
    saved = json.loads((vla.run_dir / "config.json").read_text())
    assert saved["trainer"]["buffer_type"] == "vla" and saved["trainer"]["buffer_size"] == 64


def test_env_ids_and_gymnasium_objects(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'gymnasium:Acrobot-v1'"):
        small_trainer(tmp_path, env="Acrobot-v1")
    by_id = small_trainer(tmp_path, env="gymnasium:Acrobot-v1")
    assert by_id.env.action_space.n == 3
    env = gym.make("Acrobot-v1")
    policy = ActorCritic(env.action_space, (16,))  # a gymnasium space is accepted
    trainer = Trainer(policy, env, SMALL, buffer_size=32, num_envs=2, output_dir=tmp_path, progress=False,
                      eval_freq=1, num_eval_episodes=1, max_episode_steps=20, save_freq=0)
    with pytest.warns(RuntimeWarning, match="did not end within 20 steps"):  # Acrobot's episodes outlast 20 steps
        trainer.train(total_timesteps=64)  # standard mode on a host env: collect [T, N], then learn
    assert int(trainer.state.global_step) == 64
    saved = json.loads((trainer.run_dir / "config.json").read_text())
    assert saved["env"] == {"name": "gymnasium:Acrobot-v1"} and saved["trainer"]["max_episode_steps"] == 20
    action = trainer.predict(env.reset(seed=0)[0])
    assert action.shape == () and env.action_space.contains(int(action))
    vector = small_trainer(tmp_path, env=gym.make_vec("CartPole-v1", num_envs=4), num_envs=None)
    assert vector.num_envs == 4 and vector.env.name == "CartPole-v1"  # the VectorEnv's own count
    limited = small_trainer(tmp_path, env=gym.make("CartPole-v1", max_episode_steps=50))
    assert limited.env.max_episode_steps == 50 and limited.resolved_config()["env"] == {
        "name": "gymnasium:CartPole-v1", "max_episode_steps": 50}
    from_callable = small_trainer(tmp_path, env=lambda: gym.make("CartPole-v1", max_episode_steps=50))
    assert from_callable.env.max_episode_steps == 50


def test_algorithm_dict_and_bad_inputs_are_named(tmp_path):
    trainer = small_trainer(tmp_path, algorithm={"name": "ppo", "cfg": {"gamma": 0.9, "batch_size": 32}})
    assert isinstance(trainer.cfg, PPOConfig) and trainer.cfg.gamma == 0.9 and trainer.cfg.batch_size == 32
    with pytest.raises(ConfigError, match="algorithm.cfg.learnin_rate: unknown key.*learning_rate"):
        small_trainer(tmp_path, algorithm={"name": "ppo", "cfg": {"learnin_rate": 1e-3}})
    with pytest.raises(ValueError, match="not an env the Trainer can run"):
        small_trainer(tmp_path, env=42)


def test_a_torch_vla_is_refused_at_construction(tmp_path):
    torch = pytest.importorskip("torch")
    from jaxrl_vla.models.vla_policy import VLAPolicy

    class TorchVLA(torch.nn.Module):  # the seed's interface, in torch
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 2)

        def forward(self, observations):
            return self.net(observations["proprio"])

        def get_value(self, observations):
            return self.net(observations["proprio"])[:, :1]

        def evaluate_actions(self, observations, actions):
            return torch.zeros(len(actions)), torch.zeros(len(actions))

    env = make_env("CartPole-v1")
    with pytest.raises(ValueError, match="TorchVLA is a torch module.*Flax twin.*docs/bring_your_own_vla.md"):
        Trainer(VLAPolicy(TorchVLA()), env, SMALL, buffer_size=32, num_envs=2, output_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # refused before any run directory


def test_train_continues_then_save_load_predict_and_the_cli_tools(tmp_path, capsys):
    from jaxrl_vla import eval as jaxrl_eval
    from jaxrl_vla import train as jaxrl_train

    trainer = small_trainer(tmp_path, eval_freq=2, num_eval_episodes=2, iterations_per_call=1)
    trainer.train(total_timesteps=128)
    run_dir = trainer.run_dir
    trainer.train(total_timesteps=64)  # as SB3's learn(): 64 more env steps in the same run
    assert trainer.run_dir == run_dir and int(trainer.state.global_step) == 192
    assert [r["iteration"] for r in metrics(run_dir)] == [1, 2, 3]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["policy"]["hidden_sizes"] == [16] and saved["trainer"]["iterations"] == 3
    assert saved["algorithm"]["cfg"]["learning_rate"] == 1e-3

    copy_dir = trainer.save(tmp_path / "saved")
    loaded = Trainer.load(copy_dir, progress=False)
    obs = np.array([0.01, -0.02, 0.03, 0.0], np.float32)
    assert int(loaded.state.iteration) == 3
    assert loaded.predict(obs) == trainer.predict(obs)
    batch = np.stack([obs, -obs, obs * 2])
    assert loaded.predict(batch).shape == (3,)
    np.testing.assert_array_equal(loaded.predict(batch), trainer.predict(batch))

    loaded.train(total_timesteps=64)  # a loaded trainer continues its run (here the copy)
    assert int(loaded.state.iteration) == 4 and loaded.run_dir == copy_dir
    assert [r["iteration"] for r in metrics(copy_dir)] == [4]

    run = jaxrl_eval.load_run(run_dir)  # what `python -m jaxrl_vla.eval --run` reads
    assert run.iteration == 3
    assert jaxrl_eval.main(["--run", str(run_dir), "--episodes", "2"]) == 0
    assert "mean return" in capsys.readouterr().out
    assert jaxrl_train.main(["--resume", str(run_dir), "--total-timesteps", "256", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"resuming {run_dir} from iteration 3 (192 env steps); 1 more to its budget of 4" in err
    assert [r["iteration"] for r in metrics(run_dir)] == [1, 2, 3, 4]

    fresh = small_trainer(tmp_path)
    fresh.train(total_timesteps=64)
    first = fresh.run_dir
    fresh.train(total_timesteps=64, new_run=True)
    assert fresh.run_dir != first and int(fresh.state.iteration) == 1


def test_callback_sees_each_iteration_and_stops_training(tmp_path):
    seen = []

    def callback(record):
        seen.append(record["iteration"])
        return record["iteration"] < 2  # False at iteration 2: stop

    trainer = small_trainer(tmp_path, callback=callback, iterations_per_call=1)
    trainer.train(total_timesteps=64 * 10)
    stopped_at = int(trainer.state.iteration)
    assert seen[:2] == [1, 2] and 2 <= stopped_at <= 3  # the call dispatched ahead of the stop still runs
    assert trainer.stopped_by_callback and not trainer.interrupted
    assert (trainer.run_dir / "checkpoints" / str(stopped_at)).is_dir()


def test_resumed_run_keeps_its_total_timesteps_budget(tmp_path, capsys):
    from jaxrl_vla import train as jaxrl_train

    sets = ["--set", "trainer.buffer_size=32", "--set", "trainer.num_envs=2", "--set", "trainer.eval_freq=0",
            "--set", "algorithm.cfg.batch_size=64", "--set", "algorithm.cfg.n_epochs=1",
            "--set", "policy.hidden_sizes=[16]", "--output-dir", str(tmp_path), "--no-progress"]
    assert jaxrl_train.main([*sets, "--total-timesteps", "128"]) == 0  # 2 iterations; the config says 100
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    capsys.readouterr()
    assert jaxrl_train.main(["--resume", str(run_dir), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"resuming {run_dir} from iteration 2 (128 env steps); already at its budget of 2 iterations" in err
    assert len(metrics(run_dir)) == 2


def test_torchrl_env_object_with_obs_keys_and_an_endless_episode_warning(tmp_path):
    pytest.importorskip("torchrl")
    from torchrl.envs import PendulumEnv

    env = PendulumEnv()  # its observation also holds the physical params; it never ends an episode
    trainer = Trainer(ActorCritic(make_env("Pendulum-v1").action_space, (16,)), env, SMALL, obs_keys=["th", "thdot"],
                      buffer_size=32, num_envs=2, output_dir=tmp_path, progress=False, eval_freq=0, save_freq=0,
                      max_episode_steps=16)
    assert sorted(trainer.env.observation_space) == ["th", "thdot"]
    with pytest.raises(ConfigError, match="env.obs_keys: the env has no observation 'theta'.*it has 'th', 'thdot', 'params/max_speed'"):
        Trainer(ActorCritic(make_env("Pendulum-v1").action_space, (16,)), env, SMALL, obs_keys=["theta"],
                buffer_size=32, num_envs=2, output_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="32 steps without ending, past the episode limit of 16"):
        trainer.train(total_timesteps=64)
    assert int(trainer.state.global_step) == 64
    # config.json cannot name an env object: load it with the env (and the keys the run read)
    loaded = Trainer.load(trainer.run_dir, env=PendulumEnv(), policy=trainer.policy, obs_keys=["th", "thdot"])
    obs = {"th": np.float32(0.5), "thdot": np.float32(-1.0)}
    np.testing.assert_array_equal(loaded.predict(obs), trainer.predict(obs))
    assert loaded.predict(obs).shape == (1,)


def test_batched_torch_env_objects_train_and_evaluate_in_rounds(tmp_path):
    pytest.importorskip("torchrl")
    from torchrl.envs import PendulumEnv, SerialEnv

    from bridge.testing_envs import TargetReachTD
    from jaxrl_vla.envs.base import Box

    seed_env = TargetReachTD(num_envs=2, max_episode_steps=8)  # the seed's TensorDict contract, 2 copies
    trainer = Trainer(ActorCritic(Box(-1.0, 1.0, (2,)), (16,)), seed_env, SMALL, obs_keys=["robot"],
                      buffer_size=32, output_dir=tmp_path, progress=False, eval_freq=1, num_eval_episodes=3,
                      save_freq=0)
    assert trainer.num_envs == 2 and sorted(trainer.env.observation_space["robot"]) == ["pos", "steps"]
    trainer.train(total_timesteps=64)
    (record,) = metrics(trainer.run_dir)
    assert record["eval/episodes"] == 4  # two rounds of the env's 2 copies cover 3 episodes
    with pytest.raises(ValueError, match="holds 3 env copies.*num_envs must be 3, got 2"):
        Trainer(ActorCritic(make_env("Pendulum-v1").action_space, (16,)), SerialEnv(3, PendulumEnv), SMALL,
                obs_keys=["th", "thdot"], num_envs=2, buffer_size=32, output_dir=tmp_path)
