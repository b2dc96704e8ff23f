"""GRPO in vla (async) mode and with host envs (grpo_trainer.AsyncGRPOTrainer): collectors own whole
groups, every round resets them with one fresh seed, the learner trains on complete rounds; each
checked against the rounds' own numbers (NumPy), with gymnasium CartPole and a tiny NumPy host env."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from jaxrl_vla.algo import grpo
from jaxrl_vla.build import build_trainer
from jaxrl_vla.config import ConfigError, load_config
from jaxrl_vla.envs.base import Box, Discrete
from jaxrl_vla.envs.host import make_gymnasium_env
from jaxrl_vla.models.actor_critic import ActorCritic
from jaxrl_vla.training.grpo_trainer import AsyncGRPOTrainer, round_seed
from jaxrl_vla.training.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LIMIT = 24  # CartPole's episode limit here: every episode of a 32-step round ends


def collector_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("jaxrl-collector")]


@pytest.fixture(autouse=True)
def no_leftover_threads():
    assert collector_threads() == []
    yield
    assert collector_threads() == [], "a test left collector threads running"


class Recording(AsyncGRPOTrainer):
    """Keeps a host copy of every round the learner trains on."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.trained: list[Any] = []

    def _collect(self):
        collected = super()._collect()
        if collected is not None:
            self.trained.append(jax.device_get(collected[0]))
        return collected


class ReachVecEnv:
    """A 1-D reach to 0 from a start in [-1, 1] drawn from [seed, copy]: actions {-1, 0, +1} x 0.25,
    success (terminated) within 0.2 of 0, truncated after 6 steps; auto-resets from the copy's stream."""

    def __init__(self, num_envs: int, seed: int):
        self.num_envs = num_envs
        self.seed = seed
        self.rngs: list[np.random.Generator] = []
        self.pos = np.zeros(num_envs)
        self.t = np.zeros(num_envs, int)

    def reset(self, seed: int | None = None) -> np.ndarray:
        seed = self.seed if seed is None else seed
        self.rngs = [np.random.default_rng([seed, i]) for i in range(self.num_envs)]
        self.pos = np.array([r.uniform(-1, 1) for r in self.rngs])
        self.t[:] = 0
        return self._obs()

    def _obs(self) -> np.ndarray:
        return np.stack([self.pos, self.t / 6.0], axis=1).astype(np.float32)

    def step(self, actions: np.ndarray):
        self.pos = self.pos + 0.25 * (np.asarray(actions) - 1)
        self.t += 1
        terminated = np.abs(self.pos) < 0.2
        truncated = ~terminated & (self.t >= 6)
        final_obs = self._obs()
        for i in np.flatnonzero(terminated | truncated):
            self.pos[i], self.t[i] = self.rngs[i].uniform(-1, 1), 0
        return (self._obs(), np.full(self.num_envs, -0.1, np.float32), terminated, truncated,
                {"final_obs": final_obs, "success": terminated.copy()})

    def close(self) -> None:
        pass


class ReachEnv:
    """HostEnvSpec of ReachVecEnv: seeded resets, success reported."""

    is_host_env = True
    observation_space = Box(-2.0, 2.0, (2,), np.float32)
    action_space = Discrete(3)
    max_episode_steps = 6
    reports_success = True
    seeded_reset = True

    def make(self, num_envs: int, seed: int) -> ReachVecEnv:
        return ReachVecEnv(num_envs, seed)


def cartpole_trainer(tmp_path: Path, cls: type = Recording, **overrides: Any) -> AsyncGRPOTrainer:
    env = make_gymnasium_env("CartPole-v1", max_episode_steps=LIMIT)
    cfg = grpo.GRPOConfig(batch_size=64, n_epochs=1, group_size=4, reward="return", learning_rate=1e-2)
    kwargs: dict[str, Any] = dict(buffer_size=8 * 32, buffer_type="vla", num_envs=8, num_collectors=2, eval_freq=0,
                                  save_freq=0, output_dir=tmp_path, progress=False, seed=3)
    kwargs.update(overrides)
    return cls(ActorCritic(env.action_space, (16,)), env, cfg, **kwargs)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def np_first_end(dones: np.ndarray) -> np.ndarray:
    """[N] index of each env's first done (T where none)."""
    t_len, n = dones.shape
    out = np.full(n, t_len)
    for e in range(n):
        hits = np.flatnonzero(dones[:, e])
        if hits.size:
            out[e] = hits[0]
    return out


def np_group_advantages(outcome: np.ndarray, g: int) -> np.ndarray:
    out = np.zeros(len(outcome))
    for s in range(0, len(outcome), g):
        r = outcome[s:s + g].astype(np.float64)
        out[s:s + g] = (r - r.mean()) / (r.std(ddof=1) + grpo.ADVANTAGE_EPS)
    return out


# ---------------------------------------------------------------------------- rounds and groups


def test_vla_mode_rounds_share_group_starts_and_advantages_match_numpy(tmp_path: Path) -> None:
    trainer = cartpole_trainer(tmp_path)
    assert isinstance(Trainer(ActorCritic(Discrete(2), (4,)), make_gymnasium_env("CartPole-v1"),
                              grpo.GRPOConfig(group_size=4, reward="return", batch_size=32), buffer_size=64,
                              num_envs=8, buffer_type="vla", progress=False), AsyncGRPOTrainer)
    trainer.train(total_timesteps=3 * trainer.samples_per_iteration)
    records = read_metrics(trainer.run_dir)
    assert len(trainer.trained) == len(records) == 3
    starts = []
    for k, (rollout, record) in enumerate(zip(trainer.trained, records)):
        obs = np.asarray(rollout.obs)  # [T, N, 4]
        first = obs[0].reshape(2, 4, 4)  # [groups, G, obs]: envs of a group are consecutive
        # every member of a group starts from its group's state; the two groups differ
        np.testing.assert_array_equal(first, np.repeat(first[:, :1], 4, axis=1))
        assert not np.array_equal(first[0, 0], first[1, 0])
        starts.append(first[:, 0])
        # whole episodes: each env's first episode ends within the round; the rest is masked
        dones = np.asarray(rollout.terminated) | np.asarray(rollout.truncated)
        end = np_first_end(dones)
        assert np.all(end < LIMIT)
        length = end + 1  # CartPole: reward 1 per step, so the outcome 'return' is the episode's length
        steps = np.arange(dones.shape[0])[:, None]
        np.testing.assert_array_equal(np.asarray(rollout.reward), (steps <= end[None]).astype(np.float32))
        # the learner's advantages (grpo.make_grpo_batch, what its jitted learn runs) against NumPy
        batch, metrics = grpo.make_grpo_batch(trainer.policy.apply, trainer.state.params, None, rollout, trainer.cfg)
        advantage = np.asarray(batch.advantage).reshape(dones.shape)
        weight = np.asarray(batch.weight).reshape(dones.shape)
        expected = np_group_advantages(length, 4)
        assert np.abs(expected).max() > 0  # the members' episodes differ
        np.testing.assert_allclose(advantage, np.broadcast_to(expected, dones.shape), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(weight, (steps <= end[None]).astype(np.float32))
        assert record["grpo/outcome_mean"] == pytest.approx(length.mean(), rel=1e-6)
        assert record["grpo/valid_fraction"] == pytest.approx((steps <= end[None]).mean(), rel=1e-6)
        versions = np.asarray(rollout.policy_version)
        assert versions.max() <= k and record["staleness_max"] <= 1
    # rounds start from fresh states; the two collectors' groups too
    flat = np.concatenate(starts)
    assert len({tuple(s) for s in flat}) == len(flat)


def test_round_seeds_are_fresh_and_standard_mode_with_a_host_env_is_reproducible(tmp_path: Path) -> None:
    seeds = {round_seed(0, c, r) for c in range(3) for r in range(50)}
    assert len(seeds) == 150 and all(0 <= s < 2**31 for s in seeds)
    assert round_seed(0, 1, 2) == round_seed(0, 1, 2) != round_seed(1, 1, 2)
    runs = []
    for name in ("a", "b"):
        trainer = cartpole_trainer(tmp_path / name, buffer_type="standard", buffer_size=32)
        started: list[str] = []
        original = threading.Thread.start

        def spy(thread: threading.Thread) -> None:
            started.append(thread.name)
            original(thread)

        threading.Thread.start = spy
        try:
            trainer.train(total_timesteps=2 * trainer.samples_per_iteration)
        finally:
            threading.Thread.start = original
        assert not any(n.startswith("jaxrl-collector") for n in started)  # synchronous rounds: no thread
        assert all(r["staleness"] == 0 for r in read_metrics(trainer.run_dir))
        runs.append(trainer)
    for a, b in zip(runs[0].trained, runs[1].trained):  # same trainer.seed: the same starts and episodes
        np.testing.assert_array_equal(np.asarray(a.obs), np.asarray(b.obs))
    first = [np.asarray(r.obs)[0] for r in runs[0].trained]
    np.testing.assert_array_equal(first[0].reshape(2, 4, 4), np.repeat(first[0].reshape(2, 4, 4)[:, :1], 4, 1))
    assert not np.array_equal(first[0], first[1])


# ---------------------------------------------------------------------------- training


@pytest.mark.filterwarnings("ignore:config.json cannot name")
def test_vla_mode_with_a_host_env_trains_and_logs_the_filter(tmp_path: Path) -> None:
    env = ReachEnv()
    cfg = grpo.GRPOConfig(batch_size=48, n_epochs=2, group_size=4, reward="success", filter_low=0.1,
                          filter_high=0.9, kl_coef=0.05, learning_rate=3e-2)
    trainer = Recording(ActorCritic(env.action_space, (16,)), env, cfg, buffer_size=12 * 6, buffer_type="vla",
                        num_envs=12, num_collectors=3, eval_freq=4, num_eval_episodes=4, save_freq=0,
                        output_dir=tmp_path, progress=False, seed=0)
    state = trainer.train(total_timesteps=4 * trainer.samples_per_iteration)
    records = read_metrics(trainer.run_dir)
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    for rollout, record in zip(trainer.trained, records):
        dones = np.asarray(rollout.terminated) | np.asarray(rollout.truncated)
        end = np_first_end(dones)
        success = np.asarray(rollout.terminated)[end, np.arange(12)]  # the reach ends by success or by time
        rate = success.reshape(3, 4).mean(axis=1)
        kept = (rate >= 0.1) & (rate <= 0.9)
        assert record["grpo/groups_kept"] == pytest.approx(kept.mean())
        assert record["grpo/outcome_mean"] == pytest.approx(success.mean())
        for key in ("loss/total", "loss/policy", "loss/kl", "approx_kl", "clip_fraction_high"):
            assert np.isfinite(record[key]), key
    assert any(0 < r["grpo/groups_kept"] < 1 for r in records)  # the filter dropped some groups, kept others
    assert "eval/success_rate" in records[-1]
    # trained: the parameters moved from the reference (the starting policy, kept for the KL term)
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                   state.params, state.ref_params)
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-3


def test_ctrl_c_ends_the_collectors(tmp_path: Path) -> None:
    def interrupt_after_one(record: dict) -> None:
        if record["iteration"] == 1:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does

    trainer = cartpole_trainer(tmp_path, log_fn=interrupt_after_one)
    state = trainer.train(total_timesteps=50 * trainer.samples_per_iteration)
    assert trainer.interrupted and int(state.iteration) == 1
    assert collector_threads() == []
    assert (Path(trainer.run_dir) / "checkpoints").is_dir()


# ---------------------------------------------------------------------------- bad input


def test_config_errors_name_the_fields(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"trainer\.num_envs \(8\) / trainer\.num_collectors \(4\).*"
                                         r"algorithm\.cfg\.group_size \(4\)"):
        cartpole_trainer(tmp_path, num_collectors=4)
    grpo_cfg = ["algorithm.name=grpo", "algorithm.cfg.reward=return", "algorithm.cfg.batch_size=64"]
    with pytest.raises(ConfigError, match=r"trainer\.num_envs \(8\).*trainer\.num_collectors \(2\).*"
                                          r"algorithm\.cfg\.group_size \(8\)"):
        load_config(CONFIGS / "cartpole_async.json", grpo_cfg + ["trainer.num_collectors=2"])
    with pytest.raises(ConfigError, match=r"trainer\.collectors\.backend"):
        load_config(CONFIGS / "cartpole_async.json", grpo_cfg + ["algorithm.cfg.group_size=4",
                                                                 "trainer.collectors.backend=ray"])
    # a gymnasium env has no success to report; a host env that cannot reset to a seed is refused
    cfg = load_config(CONFIGS / "gymnasium_cartpole.json", ["algorithm.name=grpo", "algorithm.cfg.batch_size=64"])
    with pytest.raises(ConfigError, match=r"algorithm\.cfg\.reward 'success'"):
        build_trainer(cfg)

    class Unseeded(ReachEnv):
        seeded_reset = False

    with pytest.raises(ValueError, match="cannot reset to a given state"):
        AsyncGRPOTrainer(ActorCritic(Discrete(3), (4,)), Unseeded(), grpo.GRPOConfig(group_size=4, batch_size=8),
                         buffer_size=32, num_envs=4, progress=False)
    # the config path builds the async GRPO trainer for a gymnasium env
    cfg = load_config(CONFIGS / "gymnasium_cartpole.json", grpo_cfg + ["trainer.buffer_size=32"])
    assert isinstance(build_trainer(cfg), AsyncGRPOTrainer)
