"""Remote collectors on Ray (trainer.collectors.backend 'ray'): training through the config,
version tagging, a killed actor (error or restart), an unreachable address."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from jaxrl_vla.algo.ppo import PPOConfig  # noqa: E402
from jaxrl_vla.build import build_trainer  # noqa: E402
from jaxrl_vla.config import ConfigError, load_config  # noqa: E402
from jaxrl_vla.envs.base import Box, Discrete  # noqa: E402
from jaxrl_vla.models.actor_critic import ActorCritic  # noqa: E402
from jaxrl_vla.training.async_trainer import AsyncTrainer, CollectorError  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class StepVecEnv:
    """obs = [env id, steps taken, 0, 0]; episodes of 7 steps; an optional sleep per step."""

    def __init__(self, num_envs: int, seed: int, delay: float):
        self.num_envs, self.delay = num_envs, delay
        self.ids = np.arange(num_envs) + 1000 * (seed % 1000)
        self.t = np.zeros(num_envs, np.int64)

    def _obs(self) -> np.ndarray:
        zeros = np.zeros_like(self.t)
        return np.stack([self.ids, self.t, zeros, zeros], axis=1).astype(np.float32)

    def reset(self, seed: int | None = None) -> np.ndarray:
        return self._obs()

    def step(self, actions: np.ndarray):
        if self.delay:
            time.sleep(self.delay)
        self.t += 1
        truncated = self.t % 7 == 0
        obs = self._obs()
        return obs, np.ones(self.num_envs, np.float32), np.zeros(self.num_envs, bool), truncated, {"final_obs": obs}

    def close(self) -> None:
        pass


class StepEnv:
    """HostEnvSpec of StepVecEnv; pickled by value into the actors (the test module is not importable there)."""

    is_host_env = True
    observation_space = Box(-1e9, 1e9, (4,), np.float32)
    action_space = Discrete(2)
    max_episode_steps = 50
    reports_success = False

    def __init__(self, delay: float = 0.0):
        self.delay = delay

    def make(self, num_envs: int, seed: int) -> StepVecEnv:
        return StepVecEnv(num_envs, seed, self.delay)


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


class Recording(AsyncTrainer):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.trained: list[Any] = []

    def _collect(self):
        collected = super()._collect()
        if collected is not None:
            self.trained.append(collected[0])
        return collected


pytestmark = pytest.mark.filterwarnings("ignore:config.json cannot name the env")


def make_trainer(env: Any, tmp_path: Path, cls: type = Recording, log_fn: Any = None, **collectors: Any) -> AsyncTrainer:
    return cls(ActorCritic(env.action_space, hidden_sizes=(8,)), env, PPOConfig(batch_size=16, n_epochs=1),
               buffer_size=32, buffer_type="vla", num_envs=4, eval_freq=0, save_freq=0, output_dir=tmp_path,
               progress=False, seed=0, log_fn=log_fn, collectors={"backend": "ray", "num": 2, **collectors})


def test_async_example_trains_with_ray_collectors_from_the_config(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "cartpole_async.json", overrides=[
        "trainer.buffer_size=32", "trainer.num_envs=4", "trainer.iterations=2", "trainer.eval_freq=0",
        "trainer.progress=false", f"trainer.output_dir={tmp_path}", "algorithm.cfg.batch_size=32",
        "algorithm.cfg.n_epochs=1", "trainer.collectors.backend=ray", "trainer.collectors.num=2"])
    trainer = build_trainer(cfg)
    state = trainer.train()
    assert int(state.iteration) == 2 and int(state.global_step) == 64
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2] and all(r["staleness_max"] >= 0 for r in records)
    assert not [a for a in ray.util.list_named_actors()]  # nothing named leaks


def test_transitions_tagged_with_the_acting_version_and_no_torch_in_actors(tmp_path: Path) -> None:
    trainer = make_trainer(StepEnv(), tmp_path)
    seen_modules: list[list[str]] = []
    original = trainer._collect

    def collect():
        out = original()  # the actors exist once a rollout came back
        if not seen_modules:
            seen_modules.append(ray.get(trainer.collectors[0].actor.modules.remote()))
        return out

    trainer._collect = collect
    trainer.train(total_timesteps=4 * trainer.samples_per_iteration)
    assert len(trainer.trained) == 4
    for k, rollout in enumerate(trainer.trained):
        versions = np.asarray(rollout.policy_version)  # [T, N]
        assert versions.min() >= 0 and versions.max() <= k
        # one inference per chunk (H = 1 here): each row one version, and versions never go back in time
        assert (np.diff(versions, axis=0) >= 0).all()
        steps = np.asarray(rollout.obs)[..., 1].astype(int)
        if k == 0:
            np.testing.assert_array_equal(steps[:, 0], np.arange(8))  # each env's steps in order, none lost
    assert seen_modules and "jaxrl_vla" in seen_modules[0] and "torch" not in seen_modules[0]


class Killing(Recording):
    """Kills collector 0's actor once, after the first rollout."""

    killed_at: float | None = None
    raised_at: float | None = None

    def _collect(self):
        if len(self.trained) == 1 and self.killed_at is None:
            self.killed_at = time.monotonic()
            ray.kill(self.collectors[0].actor)
        return super()._collect()

    def _check_collectors(self) -> None:
        try:
            super()._check_collectors()
        except Exception:
            self.raised_at = self.raised_at or time.monotonic()
            raise


def test_killed_actor_fails_the_run_within_2_s(tmp_path: Path) -> None:
    trainer = make_trainer(StepEnv(delay=0.01), tmp_path, Killing)
    with pytest.raises(CollectorError, match="collector 0 failed.*Ray actor of collector 0 died"):
        trainer.train(total_timesteps=20 * trainer.samples_per_iteration)
    assert trainer.raised_at - trainer.killed_at < 2.0
    assert [t for t in threading.enumerate() if t.name.startswith("jaxrl-collector")] == []


def test_killed_actor_is_restarted_when_max_restarts_allows(tmp_path: Path) -> None:
    trainer = make_trainer(StepEnv(delay=0.01), tmp_path, Killing, max_restarts=1)
    with pytest.warns(RuntimeWarning, match="restart 1 of 1"):
        state = trainer.train(total_timesteps=4 * trainer.samples_per_iteration)
    assert int(state.iteration) == 4 and trainer.killed_at is not None


def test_unreachable_address_names_the_field_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trainer.collectors.address '127.0.0.1:1'"):
        make_trainer(StepEnv(), tmp_path, address="127.0.0.1:1")
    with pytest.raises(ConfigError, match="trainer.collectors.backend"):
        make_trainer(StepEnv(), tmp_path, backend="processes")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_stops_the_run_and_ends_the_actors(tmp_path: Path) -> None:
    actors: list[Any] = []

    def interrupt_after_two(record: dict) -> None:
        if record["iteration"] == 2:
            actors.extend(c.actor for c in trainer.collectors)
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does

    trainer = make_trainer(StepEnv(delay=0.01), tmp_path, log_fn=interrupt_after_two)
    state = trainer.train(total_timesteps=10 * trainer.samples_per_iteration)
    assert trainer.interrupted and int(state.iteration) == 2
    assert [t for t in threading.enumerate() if t.name.startswith("jaxrl-collector")] == []
    assert len(actors) == 2
    for actor in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.modules.remote(), timeout=10)
