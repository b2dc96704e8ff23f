"""AsyncTrainer: the VLA mode (`buffer_type: "vla"`) and host envs in standard mode.

Users build it as `Trainer(..., buffer_type="vla")` or `Trainer(host_env, ...)`: the one
public Trainer constructs this implementation (`trainer.implementation`); the name stays
importable for code that names it.

Why: a VLA policy spends >100 ms per inference. In standard mode the learner
idles while the policy acts and the policy idles while the learner trains; here
collector threads act and step envs continuously while the main thread trains.

Threads and hand-off
--------------------
    collector c (thread)                          main thread (learner)
    ---------------------                         ---------------------
    snap = store.snapshot()  (version, params)    wait: every collector's buffer full
    actions = infer(snap, obs)   [N_c, H, ...]    take(): unrolled rows + next_obs, clear
    for j in H: env.step(actions[:, j])           learn(state, rollout, V(next_obs))
        buffer.add(Transition(..., chunk_index=j,  store.publish(version + 1, params)
                   policy_version=snap.version))

* Each collector owns N / num_collectors envs and one `VLABuffer` [T, N_c]
  (T = buffer_size / num_envs); nobody else touches them. The learner
  concatenates the collectors' rows along the env axis.
* Versioned snapshots: `PolicyStore` holds one immutable (version, params,
  obs_stats) tuple, swapped by reference when the learner publishes. A collector
  reads it once per chunk, so a chunk is always acted by one consistent set of
  parameters (the seed's collector ran the very module the optimiser was
  updating). The learner's jit does NOT donate its state: the published params
  are shared with collectors and donation would delete them under their feet.
* Nothing lost or trained twice: buffers are created with overwrite=False, so a
  collector whose buffer is full (and not yet taken) waits; `take()` copies the
  rows and clears the buffer under its lock, so each row is handed over exactly
  once. Every transition carries the acting version and log-prob; the learner
  logs staleness = its version - the acting version (mean and max).
* Faults: while waiting for data and while its update runs (it polls the
  device arrays), the learner checks the collectors every few ms: a collector
  exception is re-raised as `CollectorError` chained to the original (its
  traceback); an env step or inference running longer than `env_step_timeout`
  raises `EnvStepTimeout`. stop / Ctrl-C / any error close the buffers (waking
  waiting collectors) and join every thread; a thread stuck inside an env step
  is abandoned with its env (never closed or reused), and a new run refuses to
  start while such a thread is alive.
* Checkpoints hold the learner's TrainState (host env state restarts on resume;
  rows collected but not yet trained are dropped, not counted).

Standard mode with a host env (`buffer_type: "standard"`, e.g.
`"gymnasium:CartPole-v1"`) uses the same collector synchronously in the main
thread: collect T = buffer_size steps per env, train, repeat; no thread.

GRPO (`grpo_trainer.AsyncGRPOTrainer`) reuses all of this with two hooks: `_new_collector`
(a `RoundCollector` of whole groups, whose `collect_unit` is one round of episodes from one
seeded reset, not one chunk) and `_make_learn` (GRPO's critic-free learner on complete rounds).

Action chunks: one inference yields H actions; the collector executes them in
order, records `chunk_index`, and stores the chunk's first observation (what
the PPO loss re-scores, as in the JAX-native rollout).
"""

from __future__ import annotations

import collections
import math
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_vla.algo import ppo
from jaxrl_vla.buffer.circular import BufferClosed, VLABuffer, steps_for_capacity
from jaxrl_vla.envs.host import HostVecEnv, as_host_env, is_host_env
from jaxrl_vla.envs.wrappers import VecEnv
from jaxrl_vla.models.policy import zeros_like_obs
from jaxrl_vla.models.vla_policy import auxiliary_loss
from jaxrl_vla.training import compiler, distributed, sharding
from jaxrl_vla.training.acting import act_chunk_with_info, state_value, value_where
from jaxrl_vla.training.learner import TrainState, initial_train_state, make_learn_fn
from jaxrl_vla.training.normalizer import init_stats
from jaxrl_vla.training.rollout import EpisodeStats, make_evaluate_fn
from jaxrl_vla.training.trainer import BUFFER_TYPES, Trainer, episode_summary, resolve_algorithm
from jaxrl_vla.types import Transition

PyTree = Any
POLL_S = 0.005  # how often the learner looks at the collectors while it waits
STOP_GRACE_S = 2.0  # on Ctrl-C / request_stop: how long a collector inside an env call is waited for


class CollectorError(RuntimeError):
    """A collector thread raised; the original exception (and traceback) is the __cause__."""


class EnvStepTimeout(TimeoutError):
    """An env step or policy inference ran past trainer.env_step_timeout."""


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class PolicySnapshot:
    """One consistent set of acting parameters and the version that names them."""

    version: int
    params: Any
    obs_stats: Any


class PolicyStore:
    """The learner publishes, collectors snapshot. Publishing swaps one reference to an
    immutable snapshot (atomic in Python), so a reader gets the old or the new
    parameters, never a mixture."""

    def __init__(self) -> None:
        self._snapshot: PolicySnapshot | None = None

    def publish(self, version: int, params: Any, obs_stats: Any) -> None:
        self._snapshot = PolicySnapshot(int(version), params, obs_stats)

    def snapshot(self) -> PolicySnapshot:
        if self._snapshot is None:
            raise RuntimeError("no parameters published yet")
        return self._snapshot


# --------------------------------------------------------------------------- collector

InferFn = Callable[[PolicySnapshot, PyTree, jax.Array, int], tuple[np.ndarray, np.ndarray, np.ndarray]]
FinalValueFn = Callable[[PolicySnapshot, PyTree, np.ndarray], np.ndarray]


class Collector:
    """One collector: its own host envs, its own buffer, its own RNG stream.

    `collect_chunk` does one inference and executes the chunk; `run` repeats it
    on a thread until stopped; the synchronous path calls `collect_steps`.
    `busy` is (what, since) while inside an env call or inference, so the
    learner can time them out; `error` holds an exception that ended `run`.
    """

    def __init__(
        self,
        index: int,
        env: HostVecEnv,
        buffer: VLABuffer,
        store: PolicyStore,
        infer: InferFn,
        final_values: FinalValueFn,
        key: jax.Array,
        value_dtype: Any,
    ):
        self.index = index
        self.env = env
        self.buffer = buffer
        self.store = store
        self.infer = infer
        self.final_values = final_values
        self.key = key
        self.value_dtype = value_dtype
        self.num_envs = env.num_envs
        self.obs: PyTree = None
        self.inferences = 0
        self.steps_written = 0
        self.busy: tuple[str, float] | None = None
        self.error: BaseException | None = None
        self.saw_success = False
        self.episodes: collections.deque = collections.deque()  # (return, length, success) per ended episode
        self.last_transition: Transition | None = None
        self._return = np.zeros(self.num_envs, np.float64)
        self._length = np.zeros(self.num_envs, np.int64)
        self.thread: threading.Thread | None = None

    # ---------------------------------------------------------------- steps

    def _timed(self, what: str, fn: Callable, *args: Any) -> Any:
        self.busy = (what, time.monotonic())
        try:
            return fn(*args)
        finally:
            self.busy = None

    def reset(self) -> None:
        self.obs = self._timed("env.reset", self.env.reset)

    def collect_chunk(self, stop: threading.Event | None = None) -> int:
        """One inference, then its H actions in order; returns the steps written."""
        snap = self.store.snapshot()
        chunk_obs = self.obs
        actions, log_probs, values, sample_info = self._timed("policy inference", self.infer, snap, chunk_obs, self.key,
                                                              self.inferences)
        self.inferences += 1
        n = self.num_envs
        version = np.full(n, snap.version, np.int32)
        written = 0
        for j in range(actions.shape[1]):  # host env steps: inherently one call per step
            if stop is not None and stop.is_set():
                break
            obs, reward, terminated, truncated, info = self._timed("env.step", self.env.step, actions[:, j])
            terminated, truncated = np.asarray(terminated, bool), np.asarray(truncated, bool)
            if truncated.any():
                final_value = self._timed("policy inference (final value)", self.final_values, snap, info["final_obs"], truncated)
            else:
                final_value = np.zeros(n, self.value_dtype)
            transition = Transition(
                obs=chunk_obs,
                action=actions[:, j],
                log_prob=log_probs[:, j],
                value=values[:, j],
                reward=np.asarray(reward, np.float32),
                terminated=terminated,
                truncated=truncated,
                final_value=np.asarray(final_value, self.value_dtype),
                chunk_index=np.full(n, j, np.int32),
                policy_version=version,
                sample_info=sample_info,  # a token / flow head's sample: the same for every step of the chunk
            )
            self.buffer.add(transition, obs)  # waits while the learner has not taken a full buffer
            self.last_transition = transition  # what a GRPO round pads with (grpo_trainer.RoundCollector)
            self.steps_written += 1
            written += 1
            self._track_episodes(reward, np.logical_or(terminated, truncated), info)
            self.obs = obs
        return written

    def collect_steps(self, num_steps: int) -> None:
        """Synchronous collection of exactly `num_steps` steps (a multiple of the chunk)."""
        done = 0
        while done < num_steps:
            done += self.collect_chunk()

    def _track_episodes(self, reward: np.ndarray, done: np.ndarray, info: dict) -> None:
        self._return += reward
        self._length += 1
        if not done.any():
            return
        success = info.get("success")
        if success is not None:
            self.saw_success = True
        for i in np.flatnonzero(done):
            self.episodes.append((float(self._return[i]), int(self._length[i]), None if success is None else bool(success[i])))
        self._return[done] = 0.0
        self._length[done] = 0

    # ---------------------------------------------------------------- thread

    def collect_unit(self, stop: threading.Event) -> None:
        """What the thread repeats: one chunk (a GRPO collector: one round of whole episodes)."""
        self.collect_chunk(stop)

    def run(self, stop: threading.Event) -> None:
        """Thread body: collect until `stop`; an exception is kept for the learner."""
        try:
            if self.obs is None:
                self.reset()
            while not stop.is_set():
                self.collect_unit(stop)
        except BufferClosed:
            pass  # the trainer is stopping
        except BaseException as err:  # noqa: BLE001 - handed to the learner, which re-raises
            self.error = err

    def start(self, stop: threading.Event) -> None:
        if self.thread is not None and self.thread.is_alive():
            raise RuntimeError(f"collector {self.index} is already running on its envs")
        self.thread = threading.Thread(target=self.run, args=(stop,), name=f"jaxrl-collector-{self.index}", daemon=True)
        self.thread.start()

    def hung_for(self) -> tuple[str, float] | None:
        busy = self.busy
        return None if busy is None else (busy[0], time.monotonic() - busy[1])


# --------------------------------------------------------------------------- helpers


def concat_envs(parts: list[PyTree], axis: int) -> PyTree:
    """Join collectors' pieces along the env axis (1 for [T, N] rows, 0 for [N] obs)."""
    if len(parts) == 1:
        return parts[0]
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=axis), *parts)


def drain_episodes(collectors: list[Collector]) -> tuple[EpisodeStats, list[bool]]:
    """EpisodeStats of the episodes that ended since the last drain (and their successes)."""
    returns, lengths, successes = [], [], []
    for collector in collectors:
        while collector.episodes:
            ret, length, success = collector.episodes.popleft()
            returns.append(ret)
            lengths.append(length)
            if success is not None:
                successes.append(success)
    stats = EpisodeStats(
        np.float32(len(returns)), np.float32(sum(returns)), np.float32(sum(lengths)), np.float32(sum(successes))
    )
    return stats, successes


def all_ready(tree: PyTree) -> bool:
    return all(leaf.is_ready() for leaf in jax.tree_util.tree_leaves(tree) if isinstance(leaf, jax.Array))


# --------------------------------------------------------------------------- trainer


class AsyncTrainer(Trainer):
    """The Trainer for `buffer_type: "vla"` and for host envs (both buffer types).

    Same constructor as `Trainer` plus:
      num_collectors     collector threads (vla mode), each with num_envs / num_collectors envs
      env_step_timeout   seconds an env step or inference may take before the run fails

    `buffer_size` is the circular buffer's capacity in transitions in vla mode
    (T = buffer_size / num_envs steps per env per iteration) and steps per env
    in standard mode, as in the config. Outputs (metrics.jsonl, TensorBoard,
    progress, evaluation, checkpoints, resume, Ctrl-C) are the Trainer's.
    Extra metrics: staleness / staleness_max (versions), collect_time (learner
    waiting for, or synchronously collecting, data), train_time.

    `env_step_timeout` is enforced where collectors run on threads (vla mode);
    in standard mode the main thread steps the envs itself and only Ctrl-C can
    interrupt a hung step.
    """

    def __init__(
        self,
        policy: Any,
        env: Any,
        algorithm: ppo.PPOConfig,
        buffer_size: int = 2048,
        buffer_type: str | None = None,
        *,
        num_collectors: int = 1,
        env_step_timeout: float = 60.0,
        collectors: dict | None = None,
        **kwargs: Any,
    ):
        if buffer_type is None:  # built by Trainer(...): its default, "standard"; AsyncTrainer(...): "vla"
            buffer_type = "vla" if getattr(self, "_resolved_env", None) is None else "standard"
        if buffer_type not in BUFFER_TYPES:
            raise ValueError(f"trainer.buffer_type must be one of {BUFFER_TYPES}, got {buffer_type!r}")
        env = self._resolve_env(env, kwargs.get("obs_keys"))
        algorithm = resolve_algorithm(algorithm)
        if kwargs.get("num_envs") is None:
            kwargs["num_envs"] = int(getattr(env, "default_num_envs", 1))
        if algorithm.noise_correlation > 0:
            raise ValueError(
                "algorithm.cfg.noise_correlation > 0 needs trainer.buffer_type 'standard' and a JAX env "
                "(the host collectors draw independent noise per step)"
            )
        num_envs = int(kwargs.get("num_envs", 1))
        self.async_mode = buffer_type == "vla"
        if collectors is None:  # built from a config: its trainer.collectors section
            collectors = ((kwargs.get("config") or {}).get("trainer") or {}).get("collectors")
        from jaxrl_vla.training import ray_collectors  # the backend hook; Ray itself is imported only when chosen

        self._remote = ray_collectors.settings(collectors, num_collectors, self.async_mode)
        num_collectors = self._remote.num if self._remote is not None else num_collectors
        if self.async_mode:
            steps = steps_for_capacity(int(buffer_size), num_envs)
            if num_collectors < 1 or num_envs % num_collectors:
                raise ValueError(
                    f"trainer.num_envs ({num_envs}) must be divisible by trainer.num_collectors ({num_collectors}): "
                    "each collector owns num_envs / num_collectors envs"
                )
        else:
            steps = int(buffer_size)
        if env_step_timeout <= 0:
            raise ValueError(f"trainer.env_step_timeout must be > 0, got {env_step_timeout}")
        super().__init__(policy, env, algorithm, buffer_size=steps, buffer_type="standard", **kwargs)
        self.buffer_type = buffer_type
        self.capacity = steps * num_envs
        self.num_collectors = int(num_collectors) if self.async_mode else 1
        self.env_step_timeout = float(env_step_timeout)
        self.host_env = as_host_env(env)
        # several processes (`training.distributed`): each steps its share of the envs with its own collectors
        self._multi = jax.process_count() > 1
        self._envs_here = self.num_envs // jax.process_count()
        if self._multi:
            self._check_across_processes()
        fixed = getattr(self.host_env, "fixed_num_envs", None)
        if fixed is not None and self._envs_here // self.num_collectors != fixed:
            raise ValueError(f"trainer.num_envs: {self.host_env!r} holds {fixed} env copies, so each of the "
                             f"{self.num_collectors} collector(s) steps {fixed}: num_envs must be "
                             f"{fixed * self.num_collectors}, got {self.num_envs} (or pass a factory of the env)")
        if steps % self.chunk:
            raise ValueError(f"policy.action_chunk ({self.chunk}) must divide the steps per env per iteration ({steps})")
        self.store = PolicyStore()
        self.collectors: list[Collector] = []
        self._abandoned: list[Collector] = []
        self._collect_stop = threading.Event()
        self._eval_env: HostVecEnv | None = None
        if self._remote is not None:  # before anything is written: an unreachable address fails here
            ray_collectors.connect(self._remote)

    def _check_across_processes(self) -> None:
        """What several processes need (ValueErrors naming the field, before anything is written): every
        process's collectors own num_envs / processes envs, which its own devices' rows of the mesh hold."""
        processes = jax.process_count()
        if self._remote is not None:
            raise ValueError("trainer.collectors.backend 'ray' runs in one process: with several processes "
                             "(trainer.distributed) each process runs its own thread collectors (backend 'threads')")
        if type(self.cfg) is not ppo.PPOConfig:
            raise ValueError(f"algorithm.name: {type(self.cfg).__name__} with host collectors on several processes "
                             "is not supported yet (PPO only); run it in one process")
        if self.num_envs % (processes * self.num_collectors):
            raise ValueError(f"trainer.num_envs ({self.num_envs}) must be divisible by the processes ({processes}) x "
                             f"trainer.num_collectors ({self.num_collectors}): each process's collectors own "
                             "num_envs / processes envs")
        if self.num_envs % self.mesh.size:
            raise ValueError(f"trainer.num_envs ({self.num_envs}) must be divisible by the number of devices "
                             f"({self.mesh.size}): the learner's batch is split by env over the mesh")

    # ------------------------------------------------------------------ setup

    def _init_state(self, key: jax.Array, params: Any = None) -> TrainState:
        """The learner's state; env state lives in the collectors' host envs."""
        key, init_key, _ = jax.random.split(key, 3)
        example = zeros_like_obs(self.host_env.observation_space, 1)
        if params is None:
            params = self.policy.init(init_key, example)
        stats = init_stats(jax.tree_util.tree_map(lambda x: x[0], example)) if self.normalize_observations else None
        return initial_train_state(params, self.optimizer, stats, key)

    def _build(self, total_iterations: int) -> None:
        num_minibatches = self.cfg.num_minibatches(self.samples_per_iteration)
        total_grad_steps = total_iterations * self.cfg.n_epochs * num_minibatches
        self.optimizer = ppo.make_optimizer(self.cfg, total_grad_steps, self.trainable_mask, self.lr_scales)
        apply_fn = self.policy.apply

        def act(params, obs_stats, obs, key, counter, deterministic=False):
            return act_chunk_with_info(apply_fn, params, obs_stats, obs, jax.random.fold_in(key, counter),
                                       deterministic)

        learn = self._make_learn(apply_fn)
        template = jax.eval_shape(self._init_state, jax.random.PRNGKey(0), self.init_params)
        # parameters and optimiser state as trainer.mesh places them (fsdp-sharded or replicated)
        self._state_shardings = self._shardings(template)
        # no donation: the state's params are the published snapshot collectors act with
        self._learn = compiler.jit(learn, out_shardings=(self._state_shardings, sharding.replicated(self.mesh)))
        self._act_fn = act
        self._act = compiler.jit(act, static_argnames="deterministic")
        self._value_where = compiler.jit(partial(value_where, apply_fn))
        if not is_host_env(self.env):  # a JAX-native env: evaluate with the jitted scan
            eval_env = VecEnv(self.env, self.num_eval_episodes)
            max_steps = self.episode_limit()
            constrain = sharding.env_batch_constraint(self.mesh, self.num_eval_episodes)
            self._evaluate = compiler.jit(make_evaluate_fn(apply_fn, eval_env, max_steps, self.chunk, constrain))

    def _make_learn(self, apply_fn: Callable) -> Callable:
        """The learner's pure `learn(state, rollout [T, N], next_obs, demos) -> (state, metrics)`:
        PPO's here; GRPO's trainer (`grpo_trainer.AsyncGRPOTrainer`) overrides it."""
        learn_fn = make_learn_fn(apply_fn, self.optimizer, self.cfg, self.trainable_mask, self.minibatch_sharding,
                                 auxiliary_loss(self.policy))

        def learn(state, rollout, next_obs, demos):
            """Bootstrap V(obs after the newest step) with the learner's params, then PPO."""
            self.trace_count += 1  # runs only while tracing: counts compilations
            last_value = state_value(apply_fn, state.params, state.obs_stats, next_obs)
            return learn_fn(state, rollout, last_value, demos)

        return learn

    # ------------------------------------------------------------------ acting (overridable)

    def infer(self, snapshot: PolicySnapshot, obs: PyTree, key: jax.Array, counter: int):
        """One policy inference for a collector: numpy (actions [n, H, ...], log_probs [n, H],
        values [n, H], sample_info: None or a token / flow head's sample). The one place a slow model spends its time (the benchmark
        adds its latency here)."""
        out = self._act(snapshot.params, snapshot.obs_stats, obs, key, np.uint32(counter))
        return jax.device_get(out)

    def final_values(self, snapshot: PolicySnapshot, final_obs: PyTree, truncated: np.ndarray) -> np.ndarray:
        """V(final_obs) where truncated (the bootstrap of a time-limit cut), 0 elsewhere."""
        return np.asarray(jax.device_get(self._value_where(snapshot.params, snapshot.obs_stats, final_obs, truncated)))

    def _compile_acting(self, num_envs: int) -> None:
        """Compile inference and the final-value pass here, so a collector's first call is
        not a compile that `env_step_timeout` would mistake for a hang."""
        obs = jax.tree_util.tree_map(np.asarray, zeros_like_obs(self.host_env.observation_space, num_envs))
        snap = self.store.snapshot()
        jax.block_until_ready(self._act(snap.params, snap.obs_stats, obs, jax.random.PRNGKey(0), np.uint32(0)))
        jax.block_until_ready(self._value_where(snap.params, snap.obs_stats, obs, np.zeros(num_envs, bool)))

    def _example_step(self, num_envs: int) -> tuple[Transition, PyTree]:
        """A zero Transition [num_envs, ...] with the dtypes acting produces, and a zero obs."""
        obs = jax.tree_util.tree_map(np.asarray, zeros_like_obs(self.host_env.observation_space, num_envs))
        actions, log_probs, values, sample_info = jax.eval_shape(
            self._act_fn, self.state.params, self.state.obs_stats, obs, jax.random.PRNGKey(0), np.uint32(0)
        )
        n = num_envs
        step = Transition(
            obs=obs,
            action=np.zeros((n,) + actions.shape[2:], actions.dtype),
            log_prob=np.zeros(n, log_probs.dtype),
            value=np.zeros(n, values.dtype),
            reward=np.zeros(n, np.float32),
            terminated=np.zeros(n, bool),
            truncated=np.zeros(n, bool),
            final_value=np.zeros(n, values.dtype),
            chunk_index=np.zeros(n, np.int32),
            policy_version=np.zeros(n, np.int32),
            sample_info=jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), sample_info),
        )
        return step, obs

    # ------------------------------------------------------------------ workers

    def _publish(self, state: TrainState) -> None:
        if self._multi:  # collectors act in this process only: a process-local copy (a collective under fsdp)
            params, obs_stats = distributed.local_copy((state.params, state.obs_stats), self.mesh)
            self.store.publish(int(state.iteration), params, obs_stats)
            return
        self.store.publish(int(state.iteration), state.params, state.obs_stats)

    def _start_workers(self, start_iteration: int) -> None:
        """Make each collector's envs and buffer; start the threads (vla mode)."""
        self._abandoned = [c for c in self._abandoned if c.thread is not None and c.thread.is_alive()]
        if self._abandoned:
            names = ", ".join(c.thread.name for c in self._abandoned)
            raise RuntimeError(
                f"collector thread(s) {names} of a previous run are still inside an env call; refusing to "
                "start new collectors while they run (restart the process)"
            )
        self._publish(self.state)
        self._compile_acting(self._envs_here // self.num_collectors)
        self._collect_stop = threading.Event()
        per_collector = self._envs_here // self.num_collectors
        # with several processes, collector c of process p is collector p * num_collectors + c of the run (its
        # env seeds and key), as if one process ran them all
        first = jax.process_index() * self.num_collectors
        base_key = jax.random.fold_in(jax.random.PRNGKey(self.seed), 0x5EED + start_iteration)
        example, obs = self._example_step(per_collector)
        self.collectors = []
        for c in range(first, first + self.num_collectors):
            buffer = VLABuffer(example, self.buffer_size * per_collector, example_obs=obs, overwrite=False)
            env_seed = self.seed + 1_000 * (start_iteration + 1) + 97 * c
            if self._remote is not None:  # trainer.collectors.backend 'ray': envs and an inference copy in an actor
                from jaxrl_vla.training.ray_collectors import ParamsCache, RayCollector

                cache = cache if c else ParamsCache(self.store)
                self.collectors.append(RayCollector(c, self, per_collector, env_seed, buffer, cache,
                                                    jax.random.fold_in(base_key, c), example.value.dtype,
                                                    self._remote.max_restarts))
                continue
            self.collectors.append(self._new_collector(c, per_collector, env_seed, buffer,
                                                       jax.random.fold_in(base_key, c), example.value.dtype,
                                                       start_iteration))
        if is_host_env(self.env) and self.eval_freq > 0 and distributed.is_primary():
            self._eval_env = self.host_env.make(self._eval_copies(), self.seed + 1)
        if self.async_mode:
            for collector in self.collectors:
                collector.start(self._collect_stop)
        else:
            for collector in self.collectors:
                collector.reset()

    def _new_collector(self, index: int, num_envs: int, env_seed: int, buffer: VLABuffer, key: jax.Array,
                       value_dtype: Any, start_iteration: int) -> Collector:
        """Collector `index` with its own `num_envs` host envs (GRPO's trainer: a round collector of groups)."""
        env = self.host_env.make(num_envs, env_seed)
        return Collector(index, env, buffer, self.store, self.infer, self.final_values, key, value_dtype)

    def _stop_workers(self) -> None:
        """Stop collecting, wake and join every thread, close the envs they released."""
        self._collect_stop.set()
        for collector in self.collectors:
            collector.buffer.close()
        # asked to stop (Ctrl-C): a collector stuck in an env call is abandoned after a short grace, not the
        # whole env_step_timeout, and the user is told at once what is being waited for
        grace = min(self.env_step_timeout, STOP_GRACE_S) if self._stop.is_set() else self.env_step_timeout
        if self._stop.is_set():
            for collector in self.collectors:
                hung = collector.hung_for()
                if hung is not None and collector.thread is not None and collector.thread.is_alive():
                    print(f"stopping: collector {collector.index} is inside {hung[0]} (for {hung[1]:.1f} s); "
                          f"waiting up to {grace:.0f} s for it", file=sys.stderr, flush=True)
        deadline = time.monotonic() + grace
        for collector in self.collectors:
            thread = collector.thread
            if thread is not None:
                hung = collector.hung_for()
                known_hung = hung is not None and hung[1] > self.env_step_timeout
                thread.join(0.1 if known_hung else max(0.1, deadline - time.monotonic()))
                if thread.is_alive():
                    self._abandoned.append(collector)
                    warnings.warn(
                        f"{thread.name} is still inside {collector.busy[0] if collector.busy else 'an env call'}; "
                        "abandoning it and its envs (they are not closed or reused)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    continue
            self._close_env(collector.env)
        if self._eval_env is not None:
            self._close_env(self._eval_env)
            self._eval_env = None
        self.collectors = []

    @staticmethod
    def _close_env(env: HostVecEnv) -> None:
        try:
            env.close()
        except Exception as err:  # noqa: BLE001 - closing must not hide the run's own error
            warnings.warn(f"closing env failed: {err!r}", RuntimeWarning, stacklevel=2)

    def _check_collectors(self) -> None:
        """Raise a collector's exception, or a timeout for a stuck env step / inference."""
        for collector in self.collectors:
            if collector.error is not None:
                err = collector.error
                raise CollectorError(f"collector {collector.index} failed: {type(err).__name__}: {err}") from err
            hung = collector.hung_for()
            if hung is not None and hung[1] > self.env_step_timeout:
                raise EnvStepTimeout(
                    f"collector {collector.index}: {hung[0]} has not returned after {hung[1]:.1f} s "
                    f"(trainer.env_step_timeout = {self.env_step_timeout} s); stopping the run"
                )
            if self.async_mode and collector.thread is not None and not collector.thread.is_alive() and not self._collect_stop.is_set():
                raise CollectorError(f"collector {collector.index} exited unexpectedly")

    def _wait(self, ready: Callable[[], bool]) -> bool:
        """Poll `ready` while checking collectors; False when a stop was requested."""
        while not ready():
            self._check_collectors()
            if self._stop.is_set():
                return False
            time.sleep(POLL_S)
        self._check_collectors()
        return True

    # ------------------------------------------------------------------ iteration

    def _collect(self) -> tuple[Transition, PyTree] | None:
        """The iteration's rollout [T, N] (oldest first) and the obs after it; None if stopped."""
        if self.async_mode:
            if not self._wait(lambda: all(c.buffer.is_full() for c in self.collectors)):
                return None
        else:
            for collector in self.collectors:
                collector.collect_steps(self.buffer_size)
        taken = [c.buffer.take() for c in self.collectors]
        return concat_envs([t[0] for t in taken], axis=1), concat_envs([t[1] for t in taken], axis=0)

    def _run_iteration(self, prefetch: bool = False):
        if self._multi:
            return self._run_iteration_across_processes()
        t0 = time.perf_counter()
        collected = self._collect()
        if collected is None:
            return None
        rollout, next_obs = collected
        t1 = time.perf_counter()
        new_state, metrics = self._learn(self.state, rollout, next_obs, self._device_demos)
        if not self._wait(lambda: all_ready((new_state, metrics))):
            jax.block_until_ready(new_state)  # finish the update so the final checkpoint has it
        metrics, versions = jax.device_get((metrics, rollout.policy_version))
        train_time = time.perf_counter() - t1
        self._publish(new_state)
        episodes, successes = drain_episodes(self.collectors)
        self._warn_endless(episodes)
        metrics = dict(metrics)
        metrics["staleness_max"] = float(int(self.state.iteration) - versions.min())
        metrics["collect_time"] = t1 - t0
        metrics["train_time"] = train_time
        if successes:
            metrics["success_rate"] = float(np.mean(successes))
        return new_state, metrics, episodes

    # ------------------------------------------------------------------ several processes

    def _stop_now(self) -> bool:
        """With several processes a stop request (Ctrl-C, the callback on process 0) is not acted on alone:
        `_run_iteration_across_processes` agrees on it, so every process stops at the same iteration."""
        return False if self._multi else super()._stop_now()

    def _run_iteration_across_processes(self):
        """One iteration on several processes: wait for this process's buffers (or collect them, standard
        mode), agree with the others (`distributed.gather_rows`: stop / failure flags, episode sums, oldest
        acting version), then the learner's update as one SPMD program over the global mesh.

        Lockstep: each process waits for its own buffers; the agreement and the update's collectives sync
        them. Nothing here raises or returns before the agreement, so no process leaves the others inside a
        collective: a stop request or a collector fault on one process stops them all at this iteration
        (the fault re-raised where it happened, a `CollectorError` naming that process elsewhere), and
        `train` then writes the final checkpoint on every process."""
        t0 = time.perf_counter()
        failure: BaseException | None = None
        taken = None
        try:
            if self.async_mode:
                ready = self._wait(lambda: all(c.buffer.is_full() for c in self.collectors))
            else:
                ready = not self._stop.is_set()
                if ready:
                    for collector in self.collectors:
                        collector.collect_steps(self.buffer_size)
            if ready:
                taken = [c.buffer.take() for c in self.collectors]
        except Exception as err:  # noqa: BLE001 - re-raised after the others know
            failure = err
        local_episodes, successes = drain_episodes(self.collectors)
        oldest = min(int(np.min(t[0].policy_version)) for t in taken) if taken else 0
        stop = 2 if self.stopped_by_callback else int(self._stop.is_set() or (taken is None and failure is None))
        rows = distributed.gather_rows([stop, failure is not None, local_episodes.count, local_episodes.return_sum,
                                      local_episodes.length_sum, local_episodes.success_sum, len(successes), oldest])
        if rows[:, 1].any():
            if failure is not None:
                raise failure
            failed = ", ".join(str(i) for i in np.flatnonzero(rows[:, 1]))
            raise CollectorError(f"process(es) {failed} failed (see their output); process {jax.process_index()} "
                                 f"stops with them at iteration {int(self.state.iteration)}")
        if rows[:, 0].any():
            self.stopped_by_callback = bool((rows[:, 0] == 2).any())
            return None
        rollout = distributed.global_env_batch(self.mesh, concat_envs([t[0] for t in taken], axis=1), 1, self.num_envs)
        next_obs = distributed.global_env_batch(self.mesh, concat_envs([t[1] for t in taken], axis=0), 0, self.num_envs)
        t1 = time.perf_counter()
        new_state, metrics = self._learn(self.state, rollout, next_obs, self._device_demos)
        # no collector checks mid-update (raising here would leave the others in its collectives): a fault
        # that happens now is agreed on at the next iteration
        jax.block_until_ready((new_state, metrics))
        metrics = dict(jax.device_get(metrics))
        train_time = time.perf_counter() - t1
        self._publish(new_state)
        total = rows.sum(axis=0)
        episodes = EpisodeStats(*(np.float32(x) for x in total[2:6]))
        self._warn_endless(local_episodes)
        metrics["staleness_max"] = float(int(self.state.iteration) - rows[:, 7].min())
        metrics["collect_time"] = t1 - t0
        metrics["train_time"] = train_time
        if total[6] > 0:
            metrics["success_rate"] = float(total[5] / total[6])
        return new_state, metrics, episodes

    def _describe_devices(self) -> str:
        text = super()._describe_devices()
        if not self._multi:
            return text
        return (f"{text.removesuffix('; ')} (this one steps {self._envs_here} envs in {self.num_collectors} "
                "collector(s)); ")

    def _warn_endless(self, episodes: EpisodeStats) -> None:
        """Warn once a run when a collected episode has run past the episode limit without ending:
        an env with no time limit logs no return and evaluates nothing."""
        if getattr(self, "_warned_endless", False) or not self.collectors:
            return
        longest = max(int(c._length.max()) for c in self.collectors)
        if longest <= self.episode_limit():
            return
        self._warned_endless = True
        warnings.warn(
            f"{self.host_env!r}: an episode has run {longest} steps without ending, past the episode limit of "
            f"{self.episode_limit()} (trainer.max_episode_steps, else the env's max_episode_steps); episode returns "
            "are logged only when episodes end: give the env a time limit (env.max_episode_steps, a TimeLimit / "
            "StepCounter) or raise trainer.max_episode_steps", RuntimeWarning, stacklevel=2)

    def episode_limit(self) -> int:
        return self.max_episode_steps or int(self.host_env.max_episode_steps)

    def _eval_copies(self) -> int:
        """Env copies evaluation runs at once: num_eval_episodes, or the count of an env object that
        holds a fixed number of copies (then rounds of them, see `evaluate`)."""
        return int(getattr(self.host_env, "fixed_num_envs", None) or self.num_eval_episodes)

    # ------------------------------------------------------------------ evaluation

    def _env_reports_success(self) -> bool:
        if is_host_env(self.env):
            return False  # host envs: success_rate comes with the collected metrics when infos carry it
        return super()._env_reports_success()

    def evaluate(self) -> dict[str, float | None]:
        """Deterministic first episodes of num_eval_episodes envs (jitted scan for JAX envs)."""
        if not is_host_env(self.env):
            return super().evaluate()  # one SPMD program: every process runs it (several processes: all call it)
        if self._multi and not distributed.is_primary():
            return {}  # several processes: process 0 alone evaluates, with its local copy (no collective)
        if self._eval_env is None:
            self._eval_env = self.host_env.make(self._eval_copies(), self.seed + 1)
        key = jax.random.PRNGKey(self.seed + 1)

        params, obs_stats = self.state.params, self.state.obs_stats
        if self._multi:  # the process-local copy of this state, published after its update
            params, obs_stats = self.store.snapshot().params, self.store.snapshot().obs_stats

        def act(obs: PyTree, i: int) -> np.ndarray:
            out = self._act(params, obs_stats, obs, key, np.uint32(i), deterministic=True)
            return np.asarray(jax.device_get(out[0]))

        max_chunks = math.ceil(self.episode_limit() / self.chunk)
        copies = self._eval_copies()
        rounds = math.ceil(self.num_eval_episodes / copies)  # > 1 only for an env of a fixed copy count
        parts = [first_episodes(self._eval_env, act, max_chunks, self.seed + 1 + 7919 * r) for r in range(rounds)]
        stats = jax.tree_util.tree_map(lambda *xs: np.float32(sum(xs)), *[p[0] for p in parts])
        successes = [flag for p in parts for flag in p[1]]
        self._warn_unfinished(int(stats.count) + self.num_eval_episodes - rounds * copies)
        out = episode_summary(stats, prefix="eval/")
        if successes:
            out["eval/success_rate"] = float(np.mean(successes))
        return out


def first_episodes(
    env: HostVecEnv, act: Callable[[PyTree, int], np.ndarray], max_chunks: int, seed: int
) -> tuple[EpisodeStats, list[bool]]:
    """Run each of the env's copies until its first episode ends (or max_chunks
    inferences); EpisodeStats of those episodes and their success flags."""
    obs = env.reset(seed=seed)
    n = env.num_envs
    finished = np.zeros(n, bool)
    returns, lengths = np.zeros(n), np.zeros(n)
    successes: list[bool] = []
    for i in range(max_chunks):
        actions = act(obs, i)  # [n, H, ...]
        for j in range(actions.shape[1]):
            obs, reward, terminated, truncated, info = env.step(actions[:, j])
            live = ~finished
            returns += np.where(live, reward, 0.0)
            lengths += live
            first_end = np.logical_and(np.logical_or(terminated, truncated), live)
            if "success" in info:
                successes.extend(bool(x) for x in np.asarray(info["success"])[first_end])
            finished |= first_end
        if finished.all():
            break
    stats = EpisodeStats(finished.sum(), returns[finished].sum(), lengths[finished].sum(), np.float32(sum(successes)))
    return stats, successes
