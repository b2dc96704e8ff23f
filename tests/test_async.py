"""The async (VLA) trainer and host envs: hand-off without loss, versions and
staleness, faults and timeouts, stop/restart, chunks, checkpoints, learning."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxrl_vla.algo.ppo import PPOConfig
from jaxrl_vla.build import build_trainer
from jaxrl_vla.config import load_config
from jaxrl_vla.envs.base import Box, Discrete
from jaxrl_vla.envs.host import HostEnvSpec, HostVecEnv, JaxHostEnv, make_gymnasium_env
from jaxrl_vla.envs import make_env
from jaxrl_vla.models.actor_critic import ActorCritic, flatten_obs
from jaxrl_vla.models.distributions import Categorical
from jaxrl_vla.training.async_trainer import AsyncTrainer, CollectorError, EnvStepTimeout
from jaxrl_vla.training.checkpoint import Checkpointer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ------------------------------------------------------------------ a host env that tags every step


class IdVecEnv:
    """obs = [env id, steps taken by this env, 0, 0]: every transition's obs is unique.

    Episodes last `episode_len` steps and end alternately by termination and by
    truncation. Optionally raises or hangs at a given step; records the actions.
    """

    def __init__(self, spec: "IdEnv", first_id: int, num_envs: int):
        self.spec = spec
        self.num_envs = num_envs
        self.ids = np.arange(first_id, first_id + num_envs)
        self.t = np.zeros(num_envs, np.int64)
        self.episode_t = np.zeros(num_envs, np.int64)
        self.episodes = np.zeros(num_envs, np.int64)
        self.actions: list[np.ndarray] = []
        self.thread_names: set[str] = set()
        self.closed = False

    def _obs(self) -> np.ndarray:
        return np.stack([self.ids, self.t, np.zeros_like(self.t), np.zeros_like(self.t)], axis=1).astype(np.float32)

    def reset(self, seed: int | None = None) -> np.ndarray:
        return self._obs()

    def step(self, actions: np.ndarray):
        spec = self.spec
        self.thread_names.add(threading.current_thread().name)
        self.actions.append(np.array(actions))
        if spec.fail_at is not None and len(self.actions) == spec.fail_at:
            spec.raised_at = time.monotonic()
            raise RuntimeError("boom from IdVecEnv.step")
        if spec.hang_at is not None and len(self.actions) == spec.hang_at:
            spec.hang_started = time.monotonic()
            spec.release.wait()
        self.t += 1
        self.episode_t += 1
        done = self.episode_t >= spec.episode_len
        terminated = done & (self.episodes % 2 == 0)
        truncated = done & (self.episodes % 2 == 1)
        obs = self._obs()
        final_obs = obs.copy()
        self.episodes += done
        self.episode_t[done] = 0
        return obs, np.ones(self.num_envs, np.float32), terminated, truncated, {"final_obs": final_obs}

    def close(self) -> None:
        self.closed = True


class IdEnv:
    """HostEnvSpec for IdVecEnv; remembers every instance it made."""

    is_host_env = True
    observation_space = Box(-1e9, 1e9, (4,), np.float32)
    action_space = Discrete(2)
    max_episode_steps = 50
    reports_success = False

    def __init__(self, episode_len: int = 7, fail_at: int | None = None, hang_at: int | None = None):
        self.episode_len = episode_len
        self.fail_at = fail_at
        self.hang_at = hang_at
        self.raised_at: float | None = None
        self.hang_started: float | None = None
        self.release = threading.Event()
        self.made: list[IdVecEnv] = []

    def make(self, num_envs: int, seed: int) -> IdVecEnv:
        env = IdVecEnv(self, 1000 * len(self.made), num_envs)
        self.made.append(env)
        return env


class RecordingTrainer(AsyncTrainer):
    """Keeps a host copy of every rollout the learner trains on."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.trained: list[Any] = []

    def _collect(self):
        collected = super()._collect()
        if collected is not None:
            self.trained.append(jax.device_get(collected[0]))
        return collected


class ChunkPolicy(nn.Module):
    """Emits H actions per inference: Categorical [B, H] and values [B, H]."""

    action_chunk: int = 4

    @nn.compact
    def __call__(self, obs: Any):
        x = flatten_obs(obs) * 1e-3
        logits = nn.Dense(self.action_chunk * 2)(x).reshape(x.shape[0], self.action_chunk, 2)
        return Categorical(logits), nn.Dense(self.action_chunk)(x)


def collector_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("jaxrl-collector")]


@pytest.fixture(autouse=True)
def no_leftover_threads():
    assert collector_threads() == []
    yield
    assert collector_threads() == [], "a test left collector threads running"


def make_trainer(env: Any, tmp_path: Path, cls: type = AsyncTrainer, policy: Any = None, **overrides: Any) -> AsyncTrainer:
    policy = policy or ActorCritic(env.action_space, hidden_sizes=(16,))
    kwargs: dict[str, Any] = dict(
        buffer_size=32, buffer_type="vla", num_envs=4, num_collectors=2, eval_freq=0, save_freq=0,
        output_dir=tmp_path, progress=False, seed=0,
    )
    kwargs.update(overrides)
    return cls(policy, env, PPOConfig(batch_size=16, n_epochs=1), **kwargs)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ hand-off


def test_no_transition_lost_or_trained_twice_and_staleness_logged(tmp_path: Path) -> None:
    env = IdEnv()
    trainer = make_trainer(env, tmp_path, RecordingTrainer, num_collectors=2)
    iterations = 6
    state = trainer.train(total_timesteps=iterations * trainer.samples_per_iteration)
    assert int(state.iteration) == iterations
    assert int(state.global_step) == iterations * 32
    assert len(env.made) == 2 and all(e.closed for e in env.made)
    # each collector stepped only its own envs, from its own thread
    assert [sorted(e.thread_names) for e in env.made] == [["jaxrl-collector-0"], ["jaxrl-collector-1"]]

    trained = trainer.trained
    assert len(trained) == iterations
    obs = np.concatenate([np.asarray(r.obs) for r in trained], axis=0)  # [iters * T, N, 4]
    ids, steps = obs[..., 0].astype(int), obs[..., 1].astype(int)
    assert obs.shape[:2] == (iterations * 8, 4)
    for column in range(4):
        assert len(set(ids[:, column])) == 1  # one env per column, never mixed
        # each env's steps trained exactly once, none skipped: 0, 1, 2, ... in order
        np.testing.assert_array_equal(steps[:, column], np.arange(iterations * 8))
    assert len({(i, s) for i, s in zip(ids.ravel(), steps.ravel())}) == ids.size

    # versions: acted by a published version not newer than the learner's
    for k, rollout in enumerate(trained):
        versions = np.asarray(rollout.policy_version)
        assert versions.min() >= 0 and versions.max() <= k
    records = read_metrics(trainer.run_dir)
    assert [r["iteration"] for r in records] == list(range(1, iterations + 1))
    for r in records:
        assert r["staleness"] >= 0 and r["staleness_max"] >= r["staleness"]
        assert "collect_time" in r and "train_time" in r
    assert records[0]["staleness"] == 0  # the first rollout is acted by version 0 = learner's


def test_action_chunks_executed_in_order_with_chunk_index(tmp_path: Path) -> None:
    env = IdEnv(episode_len=5)  # episodes end mid-chunk too
    trainer = make_trainer(env, tmp_path, RecordingTrainer, policy=ChunkPolicy(action_chunk=4), num_collectors=1)
    trainer.train(total_timesteps=3 * trainer.samples_per_iteration)
    rollout = jax.tree_util.tree_map(lambda *x: np.concatenate(x), *trainer.trained)
    T = np.asarray(rollout.action).shape[0]
    chunk_index = np.asarray(rollout.chunk_index)
    np.testing.assert_array_equal(chunk_index, np.tile(np.arange(T) % 4, (4, 1)).T)
    # every step of a chunk stores the chunk's first observation
    steps = np.asarray(rollout.obs)[..., 1].astype(int)
    np.testing.assert_array_equal(steps, np.tile((np.arange(T) // 4) * 4, (4, 1)).T)
    # the env received exactly the recorded actions, in order
    executed = np.stack(env.made[0].actions[:T])
    np.testing.assert_array_equal(executed, np.asarray(rollout.action))


# ------------------------------------------------------------------ faults


class RaiseTimingTrainer(AsyncTrainer):
    """Notes when the learner raised a collector's fault (before the final checkpoint)."""

    raised_at: float | None = None

    def _check_collectors(self) -> None:
        try:
            super()._check_collectors()
        except Exception:
            self.raised_at = time.monotonic()
            raise


def test_collector_exception_reraises_in_trainer_within_a_second(tmp_path: Path) -> None:
    env = IdEnv(fail_at=40)  # after the first iterations have trained
    trainer = make_trainer(env, tmp_path, RaiseTimingTrainer)
    with pytest.raises(CollectorError, match="collector .* failed: RuntimeError: boom") as info:
        trainer.train(total_timesteps=1000 * trainer.samples_per_iteration)
    latency = trainer.raised_at - env.raised_at
    assert latency < 1.0, f"took {latency:.2f} s to surface"
    assert time.monotonic() - env.raised_at < 10.0  # joined, checkpointed and out
    cause = info.value.__cause__
    assert isinstance(cause, RuntimeError) and "boom" in str(cause)
    frames = []
    tb = cause.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert "step" in frames and "collect_chunk" in frames  # the collector's own traceback
    assert (Path(trainer.run_dir) / "checkpoints").is_dir()  # the final checkpoint was still written


def test_env_step_timeout_fails_clearly_and_blocks_a_second_collector(tmp_path: Path) -> None:
    env = IdEnv(hang_at=20)
    trainer = make_trainer(env, tmp_path, RaiseTimingTrainer, env_step_timeout=0.5, num_collectors=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(EnvStepTimeout, match=r"env\.step has not returned after .*env_step_timeout = 0\.5 s"):
            trainer.train(total_timesteps=1000 * trainer.samples_per_iteration)
    assert 0.5 <= trainer.raised_at - env.hang_started < 1.5  # the timeout, plus at most a second
    assert any("abandoning" in str(w.message) for w in caught)
    hung_env = env.made[0]
    assert not hung_env.closed  # still in use by the stuck thread: never closed under it
    # the stuck thread still owns its env: a new run refuses to start collectors
    with pytest.raises(RuntimeError, match="refusing to start"):
        trainer.train(total_timesteps=2 * trainer.samples_per_iteration)
    env.release.set()
    for thread in collector_threads():
        thread.join(5)
    assert collector_threads() == []


def test_ctrl_c_stops_joins_and_resume_continues(tmp_path: Path) -> None:
    env = IdEnv()

    def interrupt_after_two(record: dict) -> None:
        if record["iteration"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does

    trainer = make_trainer(env, tmp_path, log_fn=interrupt_after_two)
    state = trainer.train(total_timesteps=10 * trainer.samples_per_iteration)
    assert trainer.interrupted and int(state.iteration) == 2
    assert collector_threads() == []
    run_dir = trainer.run_dir
    saved, _ = Checkpointer(run_dir).restore(state)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(saved), jax.device_get(state))

    resumed = make_trainer(env, tmp_path)
    state = resumed.train(total_timesteps=4 * resumed.samples_per_iteration, resume=run_dir)
    assert not resumed.interrupted
    assert int(state.iteration) == 4 and int(state.global_step) == 4 * 32
    assert [r["iteration"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    assert collector_threads() == []
    assert all(e.closed for e in env.made)


def test_config_errors_name_the_fields(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"buffer_size \(30\).*num_envs \(4\)"):
        make_trainer(IdEnv(), tmp_path, buffer_size=30)
    with pytest.raises(ValueError, match=r"num_envs \(4\).*num_collectors \(3\)"):
        make_trainer(IdEnv(), tmp_path, num_collectors=3)


# ------------------------------------------------------------------ host envs


def test_host_env_adapters_follow_the_protocol() -> None:
    for spec in (make_gymnasium_env("CartPole-v1"), JaxHostEnv(make_env("CartPole-v1"))):
        assert isinstance(spec, HostEnvSpec) and spec.is_host_env and spec.max_episode_steps == 500
        env = spec.make(3, seed=0)
        assert isinstance(env, HostVecEnv)
        obs = env.reset()
        assert obs.shape == (3, 4) and obs.dtype == np.float32
        ended = 0
        for _ in range(60):
            next_obs, reward, terminated, truncated, info = env.step(np.ones(3, np.int32))
            assert reward.dtype == np.float32 and terminated.dtype == bool
            done = terminated | truncated
            if done.any():  # the final obs is the falling pole, the returned one a fresh reset
                assert np.all(np.abs(info["final_obs"][done][:, 2]) > 0.2)
                assert np.all(np.abs(next_obs[done]) <= 0.05)
                ended += int(done.sum())
        assert ended >= 3
        env.close()


@pytest.mark.slow
def test_async_training_on_jax_cartpole_learns(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "cartpole_async.json", [
        f"trainer.output_dir={tmp_path}", "trainer.progress=false", "trainer.iterations=25",
        "trainer.eval_freq=25", "trainer.save_freq=0",
    ])
    trainer = build_trainer(cfg)
    assert isinstance(trainer, AsyncTrainer) and trainer.async_mode
    t0 = time.perf_counter()
    trainer.train()
    assert time.perf_counter() - t0 < 60
    final = read_metrics(trainer.run_dir)[-1]
    assert final["eval/return_mean"] >= 150, final
    assert final["staleness_max"] <= 1


@pytest.mark.slow
def test_gymnasium_cartpole_in_standard_mode_learns(tmp_path: Path) -> None:
    started: list[str] = []
    original = threading.Thread.start

    def spy(self: threading.Thread) -> None:
        started.append(self.name)
        original(self)

    cfg = load_config(CONFIGS / "gymnasium_cartpole.json", [
        f"trainer.output_dir={tmp_path}", "trainer.progress=false", "trainer.iterations=25",
        "trainer.eval_freq=25", "trainer.save_freq=0",
    ])
    trainer = build_trainer(cfg)
    assert isinstance(trainer, AsyncTrainer) and not trainer.async_mode
    threading.Thread.start = spy
    try:
        trainer.train()
    finally:
        threading.Thread.start = original
    assert not any(name.startswith("jaxrl-collector") for name in started)  # synchronous: no thread
    final = read_metrics(trainer.run_dir)[-1]
    assert final["eval/return_mean"] >= 150, final
    assert final["staleness"] == 0
