"""Trainer: the seed's training coordinator, over jitted pure functions.

    trainer = Trainer(policy, env, algorithm, buffer_size=128, num_envs=8)
    trainer.train(total_timesteps=100_000)

Standard mode with a JAX-native env runs each iteration (rollout by scan over
vmapped envs, GAE, n_epochs x minibatch update) as ONE jitted function whose
state is donated, so the host only dispatches and logs.
"""

from __future__ import annotations

import concurrent.futures
import datetime as _dt
import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxrl_vla.algo import ppo
from jaxrl_vla.envs.base import Env
from jaxrl_vla.envs.wrappers import VecEnv
from jaxrl_vla.models.policy import action_chunk_size, zeros_like_obs
from jaxrl_vla.training import sharding
from jaxrl_vla.training.checkpoint import Checkpointer
from jaxrl_vla.training.learner import TrainState, initial_train_state, make_learn_fn
from jaxrl_vla.training.logging import RunLogger
from jaxrl_vla.training.normalizer import init_stats
from jaxrl_vla.training.rollout import EpisodeStats, make_evaluate_fn, make_rollout_fn

BUFFER_TYPES = ("standard", "vla")


def new_run_dir(output_dir: str | Path, exp_name: str) -> Path:
    """A fresh directory `output_dir/exp_name-YYYYmmdd-HHMMSS[-k]`; never reuses one."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir) / f"{exp_name}-{stamp}"
    candidate, k = base, 1
    while True:
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            k += 1
            candidate = base.with_name(f"{base.name}-{k}")


def episode_summary(stats: EpisodeStats, prefix: str = "") -> dict[str, float | None]:
    count = float(stats.count)
    if count == 0:
        return {f"{prefix}episodes": 0}
    out = {
        f"{prefix}episodes": int(count),
        f"{prefix}episode_return_mean" if not prefix else f"{prefix}return_mean": float(stats.return_sum) / count,
        f"{prefix}episode_length_mean" if not prefix else f"{prefix}length_mean": float(stats.length_sum) / count,
    }
    return out


class Trainer:
    """Coordinates collection, learning, evaluation, logging and checkpoints.

    Args (the seed's, plus what a run needs):
      policy        a flax Module following `jaxrl_vla.models.policy` (dist, value)
      env           a JAX-native `Env` (single instance; vmapped num_envs times)
      algorithm     a `PPOConfig`
      buffer_size   steps per env per rollout (standard mode)
      buffer_type   "standard" | "vla" (async; see jaxrl_vla.training.async_trainer)
      batch_size    PPO minibatch size (overrides algorithm.batch_size when given)
      num_envs      parallel envs
      iterations    planned iterations (fixes the LR schedule); train() may override
      success_key   info key counted as task success (the env's "success" by default)
    """

    def __init__(
        self,
        policy: nn.Module,
        env: Env,
        algorithm: ppo.PPOConfig,
        buffer_size: int = 2048,
        buffer_type: str = "standard",
        batch_size: int | None = None,
        num_envs: int = 1,
        seed: int = 0,
        iterations: int | None = None,
        eval_freq: int = 10,
        num_eval_episodes: int = 10,
        save_freq: int = 50,
        output_dir: str | Path = "runs",
        exp_name: str = "run",
        normalize_observations: bool = False,
        trainable_mask: Any = None,
        init_params: Any = None,
        config: dict | None = None,
        progress: bool = True,
        log_fn: Callable[[dict], None] | None = None,
    ):
        if buffer_type not in BUFFER_TYPES:
            raise ValueError(f"trainer.buffer_type must be one of {BUFFER_TYPES}, got {buffer_type!r}")
        if buffer_type != "standard":
            raise ValueError("buffer_type 'vla' is served by jaxrl_vla.training.async_trainer.AsyncTrainer")
        self.policy = policy
        self.env = env
        self.buffer_type = buffer_type
        self.cfg = algorithm if batch_size is None else algorithm.replace(batch_size=int(batch_size))
        self.buffer_size = int(buffer_size)
        self.num_envs = int(num_envs)
        self.seed = int(seed)
        self.iterations = iterations
        self.eval_freq = int(eval_freq)
        self.num_eval_episodes = int(num_eval_episodes)
        self.save_freq = int(save_freq)
        self.output_dir = Path(output_dir)
        self.exp_name = exp_name
        self.normalize_observations = normalize_observations
        self.trainable_mask = trainable_mask
        self.init_params = init_params
        self.config = config or {}
        self.progress = progress
        self.log_fn = log_fn
        self.chunk = action_chunk_size(policy)
        self.samples_per_iteration = self.buffer_size * self.num_envs
        self.cfg.num_minibatches(self.samples_per_iteration)  # fail early with a named error
        self.vec_env = VecEnv(env, self.num_envs)
        self.mesh = sharding.make_mesh()
        self.run_dir: Path | None = None
        self.state: TrainState | None = None
        self.trace_count = 0
        self._stop = threading.Event()
        self._pending: tuple | None = None  # an iteration dispatched ahead (see _run_iteration)

    # ------------------------------------------------------------------ setup

    def _init_state(self, key: jax.Array, params: Any = None) -> TrainState:
        """The initial state (jitted by `train`). Loaded weights come in as `params`,
        an argument, so a pretrained VLA is never baked into the program as a constant."""
        key, init_key, env_key = jax.random.split(key, 3)
        env_state, obs = self.vec_env.reset(env_key)
        # the state is donated whole: an env whose observation aliases a leaf of its
        # state would donate one buffer twice, so the observation gets its own
        obs = jax.tree_util.tree_map(jnp.copy, obs)
        if params is None:
            params = self.policy.init(init_key, zeros_like_obs(self.env.observation_space, 1))
        stats = init_stats(jax.tree_util.tree_map(lambda x: x[0], obs)) if self.normalize_observations else None
        return initial_train_state(params, self.optimizer, stats, key, env_state, obs)

    def _shardings(self, state: TrainState) -> TrainState:
        return sharding.batch_sharded(self.mesh, state, self.num_envs)

    def _build(self, total_iterations: int) -> None:
        num_minibatches = self.cfg.num_minibatches(self.samples_per_iteration)
        total_grad_steps = total_iterations * self.cfg.n_epochs * num_minibatches
        self.optimizer = ppo.make_optimizer(self.cfg, total_grad_steps, self.trainable_mask)
        apply_fn = self.policy.apply
        rollout = make_rollout_fn(apply_fn, self.vec_env, self.buffer_size, self.chunk)
        learn = make_learn_fn(apply_fn, self.optimizer, self.cfg)

        def iteration(state: TrainState):
            self.trace_count += 1  # runs only while tracing: counts compilations
            key, rollout_key = jax.random.split(state.key)
            env_state, obs, transitions, last_value, episodes = rollout(
                state.params, state.obs_stats, state.env_state, state.obs, rollout_key, state.iteration
            )
            state = state.replace(key=key, env_state=env_state, obs=obs)
            state, metrics = learn(state, transitions, last_value)
            # one float32 vector for every scalar: a single device->host transfer per iteration;
            # the step counter is returned apart from the (donated) state so it can be read later
            leaves, self._report_treedef = jax.tree_util.tree_flatten((metrics, episodes))
            return state, jnp.stack([jnp.asarray(x, jnp.float32) for x in leaves]), state.global_step + 0

        template = jax.eval_shape(self._init_state, jax.random.PRNGKey(0), self.init_params)
        state_shardings = self._shardings(template)
        self._iteration = jax.jit(
            iteration,
            donate_argnums=0,
            out_shardings=(state_shardings, sharding.replicated(self.mesh), sharding.replicated(self.mesh)),
        )
        self._state_shardings = state_shardings
        # compile the iteration on a second core while this one initialises the state
        abstract_state = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), template, state_shardings
        )
        self._compiler = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="compile")
        self._iteration_compiled = self._compiler.submit(lambda: self._iteration.lower(abstract_state).compile())
        eval_env = VecEnv(self.env, self.num_eval_episodes)
        max_steps = int(getattr(self.env, "max_episode_steps", 1000))
        self._evaluate = jax.jit(make_evaluate_fn(apply_fn, eval_env, max_steps, self.chunk))
        if self.eval_freq > 0:
            self._precompile_evaluation(template)

    def _precompile_evaluation(self, template: TrainState) -> None:
        """Compile the evaluation program on a second thread too: XLA compiles each
        program on one core, so on a 2-core laptop this takes evaluation off the
        time to the first result."""
        replicated = sharding.replicated(self.mesh)
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
            (template.params, template.obs_stats, self._eval_key()),
        )
        self._evaluate_compiled = self._compiler.submit(lambda: self._evaluate.lower(*abstract).compile())

    def _eval_key(self) -> jax.Array:
        return jax.random.PRNGKey(self.seed + 1)

    # ------------------------------------------------------------------ run

    def _open_run(self, resume: Path | None) -> None:
        if resume is not None:
            self.run_dir = Path(resume)
            return
        self.run_dir = new_run_dir(self.output_dir, self.exp_name)
        (self.run_dir / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")

    def describe(self, total_iterations: int) -> str:
        """One line saying what an iteration is, so `buffer_size` is never ambiguous."""
        minibatches = self.cfg.num_minibatches(self.samples_per_iteration)
        return (
            f"{self.buffer_type} mode: {self.buffer_size} steps x {self.num_envs} envs = "
            f"{self.samples_per_iteration:,} transitions per iteration, {self.cfg.n_epochs} epochs x "
            f"{minibatches} minibatches of {self.cfg.batch_size}; {total_iterations} iterations; run dir {self.run_dir}"
        )

    def evaluate(self) -> dict[str, float | None]:
        """Deterministic evaluation over num_eval_episodes first episodes."""
        future = getattr(self, "_evaluate_compiled", None)
        evaluate = self._evaluate if future is None else future.result()
        key = jax.device_put(self._eval_key(), sharding.replicated(self.mesh))
        stats = jax.device_get(evaluate(self.state.params, self.state.obs_stats, key))
        out = episode_summary(stats, prefix="eval/")
        if float(stats.count) > 0 and self._env_reports_success():
            out["eval/success_rate"] = float(stats.success_sum) / float(stats.count)
        return out

    def _env_reports_success(self) -> bool:
        return bool(getattr(self.env, "reports_success", False))

    def train(self, total_timesteps: int | None = None, resume: str | Path | None = None) -> TrainState:
        """Train until `total_timesteps` env steps (or `iterations`); returns the final state."""
        if total_timesteps is not None:
            total_iterations = max(1, math.ceil(int(total_timesteps) / self.samples_per_iteration))
        elif self.iterations is not None:
            total_iterations = int(self.iterations)
        else:
            raise ValueError("give total_timesteps or trainer.iterations")
        self._build(total_iterations)
        self._open_run(Path(resume) if resume else None)
        checkpointer = Checkpointer(self.run_dir)
        init = jax.jit(self._init_state, out_shardings=self._state_shardings)
        state = init(jax.random.PRNGKey(self.seed), self.init_params)
        if resume:
            state, _ = checkpointer.restore(state)
        self.state = state
        start = int(state.iteration)
        logger = RunLogger(self.run_dir, total_iterations, start, progress=self.progress)
        logger.console.print(self.describe(total_iterations))
        previous_handler = self._install_sigint()
        interrupted = False
        try:
            self._start_workers(start)
            interrupted = self._loop(start, total_iterations, logger, checkpointer)
        finally:
            self._stop_workers()
            if getattr(self, "_compiler", None) is not None:
                self._compiler.shutdown(wait=False)
            if self._pending is not None:  # the loop raised after a prefetch: its state is the newest
                self.state, self._pending = self._pending[0], None
            jax.block_until_ready(self.state)
            checkpointer.save(int(self.state.iteration), self.state, {"config": self.config})
            checkpointer.close()
            logger.close()
            self._restore_sigint(previous_handler)
        verb = "interrupted at" if interrupted else "finished"
        logger.console.print(
            f"{verb} iteration {int(self.state.iteration)} ({int(self.state.global_step):,} env steps); "
            f"outputs in {self.run_dir} (metrics.jsonl, tensorboard/, checkpoints/)"
        )
        self.interrupted = interrupted
        return self.state

    def _evaluation_due(self, iteration: int, total: int) -> bool:
        return self.eval_freq > 0 and (iteration % self.eval_freq == 0 or iteration == total)

    def _checkpoint_due(self, iteration: int, total: int) -> bool:
        return self.save_freq > 0 and iteration % self.save_freq == 0 and iteration < total

    def _loop(self, start: int, total: int, logger: RunLogger, checkpointer: Checkpointer) -> bool:
        last_eval: dict = {}
        for it in range(start, total):
            done = it + 1
            if self._stop.is_set() and self._pending is None:
                return True
            t0 = time.perf_counter()
            # the next iteration may start early unless this one's state is needed on the host
            prefetch = (
                done < total
                and not self._stop.is_set()
                and not self._evaluation_due(done, total)
                and not self._checkpoint_due(done, total)
            )
            result = self._run_iteration(prefetch=prefetch)
            if result is None:  # a stop request ended the iteration early
                return True
            new_state, metrics, episodes = result
            elapsed = time.perf_counter() - t0
            self.state = new_state
            global_step = metrics.pop("global_step", None)
            record = {
                "iteration": done,
                "global_step": int(new_state.global_step if global_step is None else global_step),
                "sps": self.samples_per_iteration / elapsed,
                "iteration_time": elapsed,
            }
            record.update(episode_summary(episodes))
            if self._env_reports_success() and float(episodes.count) > 0:
                record["success_rate"] = float(episodes.success_sum) / float(episodes.count)
            record.update({k: float(v) for k, v in metrics.items()})
            if self._evaluation_due(done, total):
                last_eval = self.evaluate()
                record.update(last_eval)
            logger.log(record)
            if self.log_fn is not None:
                self.log_fn(record)
            if self._checkpoint_due(done, total):
                checkpointer.save(done, self.state, {"config": self.config})
        self.final_eval = last_eval
        return False

    def _run_iteration(self, prefetch: bool = False) -> tuple[TrainState, dict, EpisodeStats] | None:
        """One collect + learn step -> (new state, host metrics, host EpisodeStats).

        None means a stop request ended it before it finished. The async trainer
        overrides this (collectors feed it); standard mode runs one jitted call.

        With `prefetch`, the next iteration is dispatched before this one's
        results are fetched, so the device runs back to back while the host
        logs. The returned state is then donated to that call: the loop
        only prefetches when nothing (evaluation, checkpoint, the end) needs it.
        """
        result = self._pending if self._pending is not None else self._step()(self.state)
        self._pending = None
        new_state, report, global_step = result
        if prefetch:  # queued behind this one before waiting for it: the device never idles
            self._pending = self._step()(new_state)
        report, global_step = jax.device_get((report, global_step))
        metrics, episodes = jax.tree_util.tree_unflatten(self._report_treedef, list(report))
        metrics = dict(metrics, global_step=global_step)
        return new_state, metrics, episodes

    def _step(self) -> Callable:
        """The compiled iteration (waits for the background compile the first time)."""
        return self._iteration_compiled.result()

    def _start_workers(self, start_iteration: int) -> None:
        """Hook: start background work before the loop (the async trainer's collectors)."""

    def _stop_workers(self) -> None:
        """Hook: stop and join background work; runs even when the loop raised."""

    def request_stop(self) -> None:
        """Finish the iterations already dispatched (the current one and at most one
        ahead), checkpoint and return (what Ctrl-C does)."""
        self._stop.set()

    def _install_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self._stop.is_set():  # a second Ctrl-C: give up waiting
                raise KeyboardInterrupt
            self._stop.set()

        return signal.signal(signal.SIGINT, handler)

    def _restore_sigint(self, previous) -> None:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
