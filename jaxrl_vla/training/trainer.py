"""Trainer: the seed's training coordinator, over jitted pure functions.

    trainer = Trainer(policy, env, algorithm, buffer_size=128, num_envs=8)
    trainer.train(total_timesteps=100_000)

One public class for every env and both modes (docs/python_api.md): `Trainer(...)`
builds the implementation the inputs need, all of them Trainers: this class for
standard mode with a JAX-native env, `async_trainer.AsyncTrainer` for
`buffer_type="vla"` and for host envs (gymnasium, TorchRL, TensorDict, Meta-World),
`grpo_trainer.GRPOTrainer` / `AsyncGRPOTrainer` for a `GRPOConfig` (standard / vla mode or host envs).

Standard mode with a JAX-native env runs each iteration (rollout by scan over
vmapped envs, GAE, n_epochs x minibatch update) as ONE jitted function whose
state is donated, so the host only dispatches and logs. Up to K such
iterations run per jitted call (a loop over the iteration; `iterations_per_call`):
on small problems the ~2 ms of dispatch and device->host sync per call is a
large share of an iteration, and K iterations pay it once. The host still logs
one record per iteration, and calls end exactly where the state is needed
(evaluation, checkpoints, the end; see `call_size`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as _dt
import functools
import json
import math
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from jaxrl_vla.algo import ppo
from jaxrl_vla.config import check_iterations_per_call
from jaxrl_vla.envs.base import Discrete, Env
from jaxrl_vla.envs.wrappers import VecEnv
from jaxrl_vla.models.policy import action_chunk_size, zeros_like_obs
from jaxrl_vla.models.vla_policy import auxiliary_loss, frozen_vision_encoder
from jaxrl_vla.training import compiler, distributed, sharding
from jaxrl_vla.training.checkpoint import Checkpointer
from jaxrl_vla.training.learner import TrainState, initial_train_state, make_learn_fn
from jaxrl_vla.training.logging import RunLogger
from jaxrl_vla.training.normalizer import init_reward_stats, init_stats, scale_rewards
from jaxrl_vla.training.rollout import EpisodeStats, make_evaluate_fn, make_rollout_fn
from jaxrl_vla.types import Demonstrations

BUFFER_TYPES = ("standard", "vla")

# Automatic iterations_per_call (0): the program is compiled for up to
# MAX_AUTO_ITERATIONS_PER_CALL iterations per call (a divisor of eval_freq and
# save_freq), and each call runs as many as fill about CALL_TARGET_SECONDS at the
# measured iteration time (a divisor of that maximum, so calls still end on every
# evaluation and checkpoint). Fast iterations (a CartPole iteration takes ~6 ms on
# a 2-core CPU) then pay the per-call dispatch, sync and thread-pool wake-up
# (measured: 16-32 per call run ~5% faster than 8) once per 32 iterations; slow
# ones (a VLA iteration takes seconds) run one per call, so the progress bar keeps
# moving and Ctrl-C (which finishes the calls already dispatched) answers within
# about two iterations. How iterations are grouped never changes a result (see
# `loop_iterations`).
MAX_AUTO_ITERATIONS_PER_CALL = 32
CALL_TARGET_SECONDS = 0.25

# Per iteration, what the host gets back from a call: metrics (with global_step) and episode stats.
IterationReport = tuple[dict, EpisodeStats]


class TrainingDiverged(RuntimeError):
    """The learner's losses or statistics became NaN/inf: the run stops instead of training on to the end."""


def first_non_finite_metric(first_iteration: int, metrics: list[dict]) -> tuple[int, str, float] | None:
    """(iteration, metric name, value) of the first non-finite learner metric in a call's reports, or None.

    Only the learner's metrics are checked (losses, KL, grad norms ...): they are finite on every healthy
    iteration, whereas episode statistics may be legitimately absent."""
    for offset, record in enumerate(metrics):
        for name, value in record.items():
            if name == "global_step":
                continue
            number = float(value)
            if not math.isfinite(number):
                return first_iteration + offset, name, number
    return None


def new_run_dir(output_dir: str | Path, exp_name: str) -> Path:
    """A fresh directory `output_dir/exp_name-YYYYmmdd-HHMMSS[-k]`; never reuses one.

    The name is refused if it has a path separator or '..': the run must lie inside output_dir."""
    from jaxrl_vla.config import is_safe_run_name

    if not is_safe_run_name(exp_name):
        raise ValueError(f"exp_name {exp_name!r}: must be a plain name (no path separators or '..') so the run "
                         f"directory stays inside {output_dir}")
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


def auto_iterations_per_call(eval_freq: int, save_freq: int, total_iterations: int) -> int:
    """The largest K <= MAX_AUTO_ITERATIONS_PER_CALL (and <= the run's iterations)
    dividing eval_freq and save_freq where they are > 0: no call then straddles an
    evaluation or a checkpoint."""
    periods = [p for p in (eval_freq, save_freq) if p > 0]
    cap = max(1, min(MAX_AUTO_ITERATIONS_PER_CALL, total_iterations))
    return max(k for k in range(1, cap + 1) if all(p % k == 0 for p in periods))


def adaptive_call_iterations(max_k: int, seconds_per_iteration: float | None,
                             target_seconds: float = CALL_TARGET_SECONDS) -> int:
    """The largest divisor of `max_k` whose call lasts at most `target_seconds` (at least 1);
    1 before any iteration has been timed."""
    if seconds_per_iteration is None:
        return 1
    fit = int(target_seconds / max(seconds_per_iteration, 1e-9))
    return max(d for d in range(1, max_k + 1) if max_k % d == 0 and (d <= fit or d == 1))


def call_size(done: int, total: int, k: int) -> int:
    """Iterations of the jitted call that starts after `done` of `total`: up to the next
    multiple of `k` (or to `total`), so

      - every multiple of k is a call end; as k divides eval_freq and save_freq,
        every iteration that evaluates or checkpoints is the last of its call,
        whose state the host then has;
      - only a run's tail (total not a multiple of k) and a resumed run's head
        (a checkpoint written with another k or total) make calls of fewer than
        k iterations, run by the same program (see `loop_iterations`).
    """
    return min(k - done % k, total - done)


def loop_iterations(
    iteration: Callable, max_size: int, state: TrainState, size: jax.Array, data: Any = None
) -> tuple[TrainState, jax.Array, jax.Array]:
    """Run `size` iterations (a traced int32 in [1, max_size]) of `iteration(state, data)`
    as one program -> (state, reports [max_size, M], step counters [max_size]); rows
    from `size` on stay 0. `data` (the demonstrations, or None) is read by every
    iteration and never changes: an argument, not a constant baked into the program.

    The trip count is an argument, so ONE compiled program serves every call
    size: a tail or head call needs no second compilation (which, on a 2-core
    machine, competes with training for a core), and since every iteration of a
    run executes the same compiled loop body, how its iterations are grouped into
    calls never changes a bit of the result (resuming stays exact). The iteration is traced
    once, to a jaxpr: its output shapes size the stacked reports, and it is the
    loop's body.
    """
    closed, (_, report, step) = jax.make_jaxpr(iteration, return_shape=True)(state, data)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    data_leaves = jax.tree_util.tree_leaves(data)

    def body(i: jax.Array, carry: tuple) -> tuple:
        leaves, reports, steps = carry
        *leaves, report_i, step_i = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *leaves, *data_leaves)
        return leaves, reports.at[i].set(report_i), steps.at[i].set(step_i)

    reports = jnp.zeros((max_size, *report.shape), report.dtype)
    steps = jnp.zeros((max_size, *step.shape), step.dtype)
    leaves, reports, steps = jax.lax.fori_loop(0, size, body, (leaves, reports, steps))
    return jax.tree_util.tree_unflatten(treedef, leaves), reports, steps


def learning_rate_per_iteration(cfg: ppo.PPOConfig, total_iterations: int, samples_per_iteration: int) -> np.ndarray:
    """[total_iterations]: the optax schedule's rate at each iteration's first gradient step, what
    metrics.jsonl logs as `learning_rate` (computed once: a lookup per record, no device call).

    It is the base rate (policy.lr_scale multiplies it per module); with target_kl, masked updates
    do not advance Adam's counter, so a decaying rate actually applied lags this nominal one."""
    per_iteration = cfg.n_epochs * cfg.num_minibatches(samples_per_iteration)
    schedule = ppo.learning_rate_schedule(cfg, total_iterations * per_iteration)
    steps = jnp.arange(total_iterations) * per_iteration
    return np.asarray(jax.device_get(jax.vmap(schedule)(steps)), np.float64)  # vmap: a constant comes out [N] too


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


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _constructor_kwargs(obj: Any, cls: type) -> dict | None:
    """The non-default constructor arguments of `obj`, read back from its attributes (`x` or `_x`);
    None when one cannot be read or written as JSON."""
    import inspect

    out = {}
    for name, param in inspect.signature(cls).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        missing = object()
        value = getattr(obj, name, getattr(obj, "_" + name, missing))
        if value is missing or callable(value):
            return None
        if isinstance(value, tuple):
            value = list(value)
        if param.default is not inspect.Parameter.empty and value == param.default:
            continue
        if not _jsonable(value):
            return None
        out[name] = value
    return out


def env_config(env: Any) -> dict | None:
    """The config's `env` section that rebuilds `env` (registered JAX envs, gymnasium ids), or None."""
    from jaxrl_vla import envs
    from jaxrl_vla.envs.host import GymnasiumEnv

    if isinstance(env, GymnasiumEnv):
        if not getattr(env, "nameable", True) or not _jsonable(env.kwargs):
            return None
        return {"name": f"gymnasium:{env.name}", **env.kwargs}
    for name, factory in envs._REGISTRY.items():
        try:
            cls = envs._resolve(factory)
        except Exception:  # noqa: BLE001 - an env whose module cannot import is not this one
            continue
        if type(env) is cls:
            kwargs = _constructor_kwargs(env, cls)
            return None if kwargs is None or not _rebuilds(env, cls, kwargs) else {"name": name, **kwargs}
    return None


def _rebuilds(env: Any, cls: type, kwargs: dict) -> bool:
    """Whether `cls(**kwargs)` makes an env of `env`'s spaces and limit: the attributes read back by
    `_constructor_kwargs` may hold a derived value of the argument they are named after."""
    try:
        twin = cls(**kwargs)
    except Exception:  # noqa: BLE001 - not rebuildable from these arguments
        return False
    same = lambda name: getattr(twin, name, None) == getattr(env, name, None)  # noqa: E731
    try:
        return all(bool(same(name)) for name in ("observation_space", "action_space", "max_episode_steps"))
    except Exception:  # noqa: BLE001 - spaces that do not compare (arrays): not provably the same
        return False


def policy_config(policy: Any, chunk: int) -> dict | None:
    """The config's `policy` section that rebuilds an ActorCritic `policy`, or None for other policies."""
    from jaxrl_vla.config import SCHEMA
    from jaxrl_vla.models.actor_critic import ActorCritic

    if type(policy) is not ActorCritic:
        return None
    out = {"name": "actor_critic", "hidden_sizes": list(policy.hidden_sizes), "activation": policy.activation,
           "log_std_init": float(policy.log_std_init), "action_chunk": chunk}
    for field in ("encoder",):  # fields newer than this function: written when the schema has them
        if field in SCHEMA["policy"] and hasattr(policy, field):
            out[field] = getattr(policy, field)
    return out


def _is_torch_module(obj: Any) -> bool:
    """A torch.nn.Module, told without importing torch."""
    return any(c.__name__ == "Module" and c.__module__.startswith("torch.nn") for c in type(obj).__mro__)


def check_policy(policy: Any) -> None:
    """ValueError unless `policy` is a Flax module the jitted programs can run (a torch model is not)."""
    inner = getattr(policy, "model", None)
    torch_model = policy if _is_torch_module(policy) else inner if _is_torch_module(inner) else None
    if torch_model is not None:
        raise ValueError(
            f"policy: {type(torch_model).__name__} is a torch module; the Trainer runs Flax models inside jit, so a "
            "torch VLA (forward / get_value / evaluate_actions) needs its Flax twin, with its weights converted by "
            "the bridge (bridge.convert, register_twin): see docs/bring_your_own_vla.md")
    if not (callable(getattr(policy, "init", None)) and callable(getattr(policy, "apply", None))):
        raise ValueError(f"policy: expected a flax.linen Module returning (dist, value) (ActorCritic, VLAPolicy), "
                         f"got a {type(policy).__name__}")


def resolve_algorithm(algorithm: Any) -> ppo.PPOConfig:
    """A `PPOConfig` (or `GRPOConfig`) as given, or built from the seed's dict
    {"name": "ppo", "cfg": {...}} (a config's `algorithm` section: unknown keys are named)."""
    if isinstance(algorithm, ppo.PPOConfig):
        return algorithm
    if isinstance(algorithm, dict):
        from jaxrl_vla.build import build_algorithm
        from jaxrl_vla.config import SCHEMA, ConfigError, _resolve_section

        section = _resolve_section("algorithm", SCHEMA["algorithm"], algorithm)
        if section["demo_path"] is not None or section["demo_augment"]:
            raise ConfigError("algorithm.demo_path: in Python, pass the demonstrations as Trainer(..., demos=...)")
        return build_algorithm(section)
    raise ValueError(f"algorithm: expected a PPOConfig or a dict like {{'name': 'ppo', 'cfg': {{...}}}}, "
                     f"got a {type(algorithm).__name__}")


def resolve_env(env: Any, obs_keys: Any = None) -> Any:
    """Whatever env a user holds -> a JAX-native Env or a host env spec (`envs.host.as_trainer_env`)."""
    from jaxrl_vla.envs.host import as_trainer_env

    return as_trainer_env(env, obs_keys)


def implementation(env: Any, algorithm: ppo.PPOConfig, buffer_type: str) -> type:
    """The Trainer class that runs these (resolved) inputs."""
    from jaxrl_vla.envs.host import is_host_env

    if type(algorithm).__name__ == "GRPOConfig":
        from jaxrl_vla.training.grpo_trainer import AsyncGRPOTrainer, GRPOTrainer

        return AsyncGRPOTrainer if buffer_type == "vla" or is_host_env(env) else GRPOTrainer
    if buffer_type == "vla" or is_host_env(env):
        from jaxrl_vla.training.async_trainer import AsyncTrainer

        return AsyncTrainer
    return Trainer


class Trainer:
    """Coordinates collection, learning, evaluation, logging and checkpoints.

    Args (the seed's, plus what a run needs):
      policy        a flax Module following `jaxrl_vla.models.policy` (dist, value): ActorCritic, VLAPolicy
                    around a Flax VLA (a torch module is refused: it needs its Flax twin)
      env           a JAX-native `Env` (vmapped num_envs times), an env id ("CartPole-v1",
                    "gymnasium:Acrobot-v1"), a gymnasium Env / VectorEnv, a TorchRL EnvBase, a host env
                    spec, or a callable making one (`jaxrl_vla.envs.host.as_trainer_env`)
      algorithm     a `PPOConfig`, or the seed's dict {"name": "ppo", "cfg": {...}}
      buffer_size   standard mode: steps per env per rollout; vla mode: the circular buffer's
                    capacity in transitions (buffer_size / num_envs steps per env per iteration)
      buffer_type   "standard" | "vla" (collectors on threads; see jaxrl_vla.training.async_trainer)
      batch_size    PPO minibatch size (overrides algorithm.batch_size when given)
      num_envs      parallel envs (default 1, or a gymnasium VectorEnv's own count)
      num_collectors, env_step_timeout  vla mode: collector threads; seconds an env step may take
      callback      called with each iteration's metrics record (after logging); returning False
                    stops training after the iterations already dispatched (as SB3's callbacks)
      max_episode_steps  evaluation episodes are cut here, and the run warns when an env ends no
                    episode within it (default: the env's own limit)
      obs_keys      TorchRL / TensorDict envs: the observation keys the policy reads (TorchRL's in_keys)
      iterations    planned iterations (fixes the LR schedule); train() may override
      success_key   info key counted as task success (the env's "success" by default)
      demos         expert `Demonstrations` (raw observations, host or device arrays) for PPO's
                    demonstration loss, weighted by algorithm.cfg.demo_coef (> 0 needs them)
      iterations_per_call  iterations per jitted call (standard mode with a JAX env); must divide
                    eval_freq and save_freq; 0: auto, calls of ~CALL_TARGET_SECONDS of up to
                    `auto_iterations_per_call` iterations (`adaptive_call_iterations`)
      mesh          `trainer.mesh` {"data": D, "fsdp": F} over every device (default: all 'data'), or a
                    ('data', 'fsdp') `jax.sharding.Mesh` (`sharding.make_mesh`): see `training.sharding`
    """

    def __new__(cls, policy: Any = None, env: Any = None, algorithm: Any = None, *args: Any, **kwargs: Any):
        """`Trainer(...)` builds the implementation its inputs need (see the module docstring); a
        subclass named explicitly is built as it is."""
        obj_cls = cls
        resolved = None
        if cls is Trainer:
            buffer_type = kwargs.get("buffer_type", args[1] if len(args) > 1 else "standard")
            algorithm = resolve_algorithm(algorithm)
            resolved = (env, resolve_env(env, kwargs.get("obs_keys")))
            obj_cls = implementation(resolved[1], algorithm, buffer_type)
        obj = super().__new__(obj_cls)
        obj._resolved_env = resolved  # __init__ gets the same env again: resolve it once
        return obj

    def _resolve_env(self, env: Any, obs_keys: Any = None) -> Any:
        cached = getattr(self, "_resolved_env", None)
        if cached is not None and (env is cached[0] or env is cached[1]):
            return cached[1]
        resolved = resolve_env(env, obs_keys)
        self._resolved_env = (env, resolved)
        return resolved

    def __init__(
        self,
        policy: nn.Module,
        env: Env,
        algorithm: ppo.PPOConfig,
        buffer_size: int = 2048,
        buffer_type: str = "standard",
        batch_size: int | None = None,
        num_envs: int | None = None,
        seed: int = 0,
        iterations: int | None = None,
        eval_freq: int = 10,
        num_eval_episodes: int = 10,
        save_freq: int = 50,
        output_dir: str | Path = "runs",
        exp_name: str = "run",
        normalize_observations: bool = False,
        normalize_rewards: bool = False,
        trainable_mask: Any = None,
        lr_scales: Any = None,
        init_params: Any = None,
        config: dict | None = None,
        progress: bool = True,
        log_fn: Callable[[dict], None] | None = None,
        iterations_per_call: int = 0,
        demos: Demonstrations | None = None,
        mesh: dict | jax.sharding.Mesh | None = None,
        num_collectors: int = 1,
        env_step_timeout: float = 60.0,
        callback: Callable[[dict], bool | None] | None = None,
        max_episode_steps: int | None = None,
        obs_keys: Any = None,
    ):
        if buffer_type not in BUFFER_TYPES:
            raise ValueError(f"trainer.buffer_type must be one of {BUFFER_TYPES}, got {buffer_type!r}")
        if buffer_type != "standard":  # Trainer(...) builds AsyncTrainer (GRPO: AsyncGRPOTrainer) for 'vla'
            raise ValueError(f"trainer.buffer_type {buffer_type!r}: {type(self).__name__} runs standard mode only")
        check_policy(policy)
        env = self._resolve_env(env, obs_keys)
        algorithm = resolve_algorithm(algorithm)
        self.policy = policy
        self.env = env
        self.buffer_type = buffer_type
        self.cfg = algorithm if batch_size is None else algorithm.replace(batch_size=int(batch_size))
        self.buffer_size = int(buffer_size)
        self.num_envs = int(num_envs if num_envs is not None else getattr(env, "default_num_envs", 1))
        if max_episode_steps is not None and int(max_episode_steps) <= 0:
            raise ValueError(f"trainer.max_episode_steps must be > 0, got {max_episode_steps}")
        self.max_episode_steps = None if max_episode_steps is None else int(max_episode_steps)
        self.callback = callback
        self.stopped_by_callback = False
        self.seed = int(seed)
        self.iterations = iterations
        self.eval_freq = int(eval_freq)
        self.num_eval_episodes = int(num_eval_episodes)
        self.save_freq = int(save_freq)
        if int(iterations_per_call) < 0:
            raise ValueError(f"trainer.iterations_per_call must be >= 0 (0: auto), got {iterations_per_call}")
        check_iterations_per_call(int(iterations_per_call), self.eval_freq, self.save_freq)
        self.iterations_per_call = int(iterations_per_call)
        self.output_dir = Path(output_dir)
        self.exp_name = exp_name
        self.normalize_observations = normalize_observations
        self.normalize_rewards = bool(normalize_rewards)
        if self.normalize_rewards and (hasattr(self, "async_mode") or type(algorithm) is not ppo.PPOConfig):
            raise ValueError("trainer.normalize_rewards: PPO in standard mode with a JAX-native env only (the "
                             "scaling runs inside its jitted iteration)")
        self.trainable_mask = trainable_mask
        self.lr_scales = lr_scales
        self.init_params = init_params
        self.config = config or {}
        self.progress = progress
        self.log_fn = log_fn
        self.chunk = action_chunk_size(policy)
        if (self.cfg.demo_coef > 0) != (demos is not None):
            raise ValueError("algorithm.cfg.demo_coef > 0 needs demonstrations (algorithm.demo_path)" if demos is None
                             else "demonstrations were given but algorithm.cfg.demo_coef is 0: they would be unused")
        self.demos = demos
        if demos is not None and demos.augment is not None and self._rollout_encoder() is not None:
            raise ValueError("algorithm.demo_augment: the augmentation reads the demonstrations' pixels, but with the "
                             "vision encoder frozen (policy.freeze) the learner reads its precomputed features instead")
        self._demo_encoder: Callable | None = None  # set by _build: the rollout's frozen-vision encoder
        self._device_demos: Demonstrations | None = None  # set by train: the demos as the learner reads them
        self.samples_per_iteration = self.buffer_size * self.num_envs
        self.cfg.num_minibatches(self.samples_per_iteration)  # fail early with a named error
        if self.cfg.noise_correlation > 0 and isinstance(env.action_space, Discrete):
            raise ValueError(
                f"algorithm.cfg.noise_correlation ({self.cfg.noise_correlation}) needs continuous (Box) actions; "
                f"{type(env).__name__}'s are discrete"
            )
        self.vec_env = VecEnv(env, self.num_envs)
        self.mesh = mesh if isinstance(mesh, jax.sharding.Mesh) else sharding.make_mesh(**(mesh or {}))
        if sharding.fsdp_size(self.mesh) > 1:  # a split that shards nothing is named here, before a run dir exists
            shapes = init_params if init_params is not None else jax.eval_shape(
                self.policy.init, jax.random.PRNGKey(0), zeros_like_obs(env.observation_space, 1))
            sharding.check_shardable(shapes, sharding.fsdp_size(self.mesh))
        self.minibatch_sharding = sharding.minibatch_sharding(self.mesh, self.cfg.batch_size)  # checks batch_size
        self.run_dir: Path | None = None
        self.state: TrainState | None = None
        self.trace_count = 0
        self._stop = threading.Event()
        self._pending: tuple | None = None  # a call dispatched ahead (see _run_fused)
        # the compiled program running up to call_iterations iterations (a future: it compiles in
        # the background); None until this class's _build makes it: a subclass that builds its
        # own learner (the async trainer) runs one host-driven iteration per call instead
        self._program: concurrent.futures.Future | None = None
        # iterations per jitted call in this run, resolved from iterations_per_call by _build
        # (1 where the host drives each iteration)
        self.call_iterations = 1

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
        state = initial_train_state(params, self.optimizer, stats, key, env_state, obs)
        return state.replace(reward_stats=init_reward_stats(self.num_envs)) if self.normalize_rewards else state

    def _shardings(self, state: TrainState) -> TrainState:
        """Env state and observations split over the mesh by env; parameters, optimiser state and the
        reference params along 'fsdp' by `sharding.param_shardings` (all replicated with fsdp 1); the rest
        (normaliser, counters, key) replicated. By field, not by shape: a parameter whose leading axis
        happens to equal num_envs (a 2-d action head's bias with 2 envs) is not env-batched."""
        sharding.check_shardable(state.params, sharding.fsdp_size(self.mesh))
        replicated = jax.tree_util.tree_map(lambda _: sharding.replicated(self.mesh), state)
        placed = replicated.replace(params=sharding.param_shardings(self.mesh, state.params),
                                    opt_state=sharding.param_shardings(self.mesh, state.opt_state),
                                    ref_params=sharding.param_shardings(self.mesh, state.ref_params))
        if state.env_state is None:  # host envs (the async trainer): nothing env-batched in the state
            return placed
        return placed.replace(env_state=sharding.batch_sharded(self.mesh, state.env_state, self.num_envs),
                              obs=sharding.batch_sharded(self.mesh, state.obs, self.num_envs))

    def _rollout_and_learn(self, apply_fn: Callable, obs_encoder: Callable | None) -> tuple[Callable, Callable]:
        """The iteration's pure `rollout(params, obs_stats, env_state, obs, key, version)` and
        `learn(state, transitions, last_value, demos)`: PPO's; GRPO's trainer overrides this."""
        rollout = make_rollout_fn(apply_fn, self.vec_env, self.buffer_size, self.chunk, obs_encoder,
                                  self.cfg.noise_correlation)
        learn = make_learn_fn(apply_fn, self.optimizer, self.cfg, self.trainable_mask, self.minibatch_sharding,
                              auxiliary_loss(self.policy))
        return rollout, learn

    def _make_iteration(self, total_iterations: int) -> Callable:
        """The optimiser for `total_iterations` and the pure iteration (state, demos) -> (state, report
        vector, global_step) that the fused loop scans (and `training.sweep` vmaps over seeds)."""
        num_minibatches = self.cfg.num_minibatches(self.samples_per_iteration)
        total_grad_steps = total_iterations * self.cfg.n_epochs * num_minibatches
        self.optimizer = ppo.make_optimizer(self.cfg, total_grad_steps, self.trainable_mask, self.lr_scales)
        apply_fn = self.policy.apply
        obs_encoder = self._rollout_encoder()
        self._demo_encoder = obs_encoder
        rollout, learn = self._rollout_and_learn(apply_fn, obs_encoder)

        def iteration(state: TrainState, demos: Demonstrations | None) -> tuple[TrainState, jax.Array, jax.Array]:
            self.trace_count += 1  # runs only while tracing: counts compilations
            key, rollout_key = jax.random.split(state.key)
            env_state, obs, transitions, last_value, episodes = rollout(
                state.params, state.obs_stats, state.env_state, state.obs, rollout_key, state.iteration
            )
            state = state.replace(key=key, env_state=env_state, obs=obs)
            if state.reward_stats is not None:  # the learner sees scaled rewards; episode returns stay raw
                reward_stats, rewards = scale_rewards(state.reward_stats, transitions.reward,
                                                      transitions.terminated | transitions.truncated, self.cfg.gamma)
                transitions = transitions.replace(reward=rewards)
                state = state.replace(reward_stats=reward_stats)
            state, metrics = learn(state, transitions, last_value, demos)
            # one float32 vector for every scalar: a single device->host transfer per call;
            # the step counter is returned apart from the (donated) state so it can be read later
            leaves, self._report_treedef = jax.tree_util.tree_flatten((metrics, episodes))
            return state, jnp.stack([jnp.asarray(x, jnp.float32) for x in leaves]), state.global_step + 0

        return iteration

    def _build(self, total_iterations: int) -> None:
        iteration = self._make_iteration(total_iterations)
        apply_fn = self.policy.apply
        template = jax.eval_shape(self._init_state, jax.random.PRNGKey(0), self.init_params)
        state_shardings = self._shardings(template)
        self._out_shardings = (state_shardings, sharding.replicated(self.mesh), sharding.replicated(self.mesh))
        self._iteration_fn = iteration
        # one iteration on its own: the loop runs the program below, but
        # benchmarks/ppo_throughput.py's fused diagnostic loops this unit
        self._iteration = compiler.jit(iteration, donate_argnums=0, out_shardings=self._out_shardings)
        self._state_shardings = state_shardings
        self._abstract_state = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), template, state_shardings
        )
        replicated = sharding.replicated(self.mesh)
        self._abstract_demos = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
            jax.eval_shape(self._encode_demos, template.params, self.demos),
        )
        self.call_iterations = self.iterations_per_call or auto_iterations_per_call(
            self.eval_freq, self.save_freq, total_iterations
        )
        # compile the program on a second core while this one initialises the state
        self._compiler = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="compile")
        self._program = self._compiler.submit(self._compile_program)
        eval_env = VecEnv(self.env, self.num_eval_episodes)
        max_steps = self.episode_limit()
        constrain = sharding.env_batch_constraint(self.mesh, self.num_eval_episodes)
        self._evaluate = compiler.jit(make_evaluate_fn(apply_fn, eval_env, max_steps, self.chunk, constrain))
        if self.eval_freq > 0:
            self._precompile_evaluation(template)

    def _compile_program(self) -> Callable:
        """Compile `loop_iterations` for this run: (state, size, demos) -> (state, reports, steps)."""
        program = compiler.jit(
            functools.partial(loop_iterations, self._iteration_fn, self.call_iterations),
            donate_argnums=0,
            out_shardings=self._out_shardings,
        )
        size = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(self.mesh))
        return program.lower(self._abstract_state, size, self._abstract_demos).compile()

    def _rollout_encoder(self) -> Callable | None:
        """The frozen vision encoder the rollout stores features with, or None: it then runs once per
        collected sample, not once per epoch (raw observations only, so not with normalisation)."""
        return None if self.normalize_observations else frozen_vision_encoder(self.policy, self.trainable_mask)

    def _encode_demos(self, params: Any, demos: Demonstrations | None) -> Demonstrations | None:
        """The demonstrations as the learner reads them: through the rollout's frozen vision encoder
        when it has one (the features of a frozen encoder never change, so they are computed once)."""
        if demos is None or self._demo_encoder is None:
            return demos
        return demos.replace(obs=self._demo_encoder(params, demos.obs))

    def _prepare_demos(self, params: Any, rows_per_call: int = 2048) -> Demonstrations | None:
        """`_encode_demos` in slices of `rows_per_call` (one compiled program; the pixels of all the
        demonstrations need not fit through the encoder at once), placed replicated on the mesh."""
        if self.demos is None:
            return None
        replicated = sharding.replicated(self.mesh)
        if self._demo_encoder is None:
            return jax.device_put(self.demos, replicated)
        size = self.demos.size
        rows = min(rows_per_call, size)
        encode = compiler.jit(self._demo_encoder)
        host = jax.tree_util.tree_map(np.asarray, self.demos.obs)
        parts = []
        for start in range(0, size, rows):
            index = np.minimum(np.arange(start, start + rows), size - 1)  # the last slice repeats its final row
            piece = jax.tree_util.tree_map(lambda x: x[index], host)
            parts.append(jax.device_get(encode(params, piece)))
        obs = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs)[:size], *parts)
        return jax.device_put(self.demos.replace(obs=obs), replicated)

    def _precompile_evaluation(self, template: TrainState) -> None:
        """Compile the evaluation program on a second thread too: XLA compiles each
        program on one core, so on a 2-core laptop this takes evaluation off the
        time to the first result."""
        shardings = (self._state_shardings.params, self._state_shardings.obs_stats, sharding.replicated(self.mesh))
        abstract = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            (template.params, template.obs_stats, self._eval_key()), shardings,
        )
        self._evaluate_compiled = self._compiler.submit(lambda: self._evaluate.lower(*abstract).compile())

    def _eval_key(self) -> jax.Array:
        return jax.random.PRNGKey(self.seed + 1)

    def episode_limit(self) -> int:
        """Steps after which an evaluation episode is cut: trainer.max_episode_steps, else the env's limit."""
        return self.max_episode_steps or int(getattr(self.env, "max_episode_steps", 1000))

    def _warn_unfinished(self, finished: int) -> None:
        """Warn (once a run) when evaluation episodes did not end within the episode limit."""
        if finished >= self.num_eval_episodes or getattr(self, "_warned_unfinished", False):
            return
        self._warned_unfinished = True
        warnings.warn(
            f"evaluation: {self.num_eval_episodes - finished} of {self.num_eval_episodes} episodes of {self.env!r} did "
            f"not end within {self.episode_limit()} steps (trainer.max_episode_steps), so they are not counted; an "
            "env without a time limit needs one (a TimeLimit wrapper, env.max_episode_steps) or a larger "
            "trainer.max_episode_steps", RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ run

    def _open_run(self, resume: Path | None, total_iterations: int) -> None:
        if resume is not None:
            self.run_dir = Path(resume)
            self._write_config(total_iterations, update_only=True)
            return
        run_dir = None
        if distributed.is_primary():  # with several processes, process 0 makes it and tells the others
            run_dir = new_run_dir(self.output_dir, self.exp_name)
        self.run_dir = distributed.agree_on_run_dir(run_dir)
        self._write_config(total_iterations)  # every process holds the config (checkpoint metadata); 0 writes it

    def _write_config(self, total_iterations: int, update_only: bool = False) -> None:
        """config.json of the run: the full resolved config (`resolved_config` for runs started from
        Python), with trainer.iterations the run's budget, so `train --resume` keeps it. `update_only`:
        an existing file only gets that budget (a resume's --set overrides stay out of it)."""
        if not self.config:
            self.config = self.resolved_config()
        if isinstance(self.config.get("trainer"), dict):
            self.config["trainer"]["iterations"] = int(total_iterations)
        if not distributed.is_primary():
            return
        path = self.run_dir / "config.json"
        written = self.config
        if update_only and path.is_file():
            written = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(written.get("trainer"), dict):
                written["trainer"]["iterations"] = int(total_iterations)
        path.write_text(json.dumps(written, indent=2) + "\n")

    def resolved_config(self) -> dict:
        """This trainer's full config as `python -m jaxrl_vla.train` reads it (config.json of a run
        started from Python), so `jaxrl_vla.eval --run` and `train --resume` rebuild the run.

        What no config can name (an env object without an id, a policy other than ActorCritic,
        demonstrations given as arrays) is written as far as it goes, with a warning: such a run
        reloads with `Trainer.load(path, env=..., policy=...)`."""
        from jaxrl_vla.config import SCHEMA, ConfigError, resolve

        unnamed = []
        env_cfg = env_config(self.env)
        if env_cfg is None:
            unnamed.append(f"the env {self.env!r}")
            env_cfg = {"name": repr(self.env)}
        policy_cfg = policy_config(self.policy, self.chunk)
        if policy_cfg is None:
            unnamed.append(f"the policy {type(self.policy).__name__}")
            policy_cfg = {"name": "vla"}
        async_mode = bool(getattr(self, "async_mode", False))
        trainer_cfg = {
            "buffer_size": int(getattr(self, "capacity", self.buffer_size)) if async_mode else self.buffer_size,
            "buffer_type": self.buffer_type, "iterations": int(self.iterations or 1), "num_envs": self.num_envs,
            "seed": self.seed, "eval_freq": self.eval_freq, "num_eval_episodes": self.num_eval_episodes,
            "save_freq": self.save_freq, "exp_name": self.exp_name, "output_dir": str(self.output_dir),
            "normalize_observations": bool(self.normalize_observations), "progress": bool(self.progress),
            "normalize_rewards": self.normalize_rewards,
            "iterations_per_call": self.iterations_per_call, "max_episode_steps": self.max_episode_steps,
            "num_collectors": int(getattr(self, "num_collectors", 1)),
            "env_step_timeout": float(getattr(self, "env_step_timeout", 60.0)),
            "mesh": {"fsdp": sharding.fsdp_size(self.mesh)},
        }
        fields = SCHEMA["algorithm"]["cfg"]
        algo_cfg = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k in fields}
        name = "grpo" if type(self.cfg).__name__ == "GRPOConfig" else "ppo"
        raw = {"trainer": trainer_cfg, "algorithm": {"name": name, "cfg": algo_cfg}, "policy": policy_cfg, "env": env_cfg}
        if self.demos is not None:
            unnamed.append("the demonstrations (arrays, not algorithm.demo_path)")
            raw["algorithm"]["cfg"]["demo_coef"] = 0.0
        try:
            config = resolve(raw)
        except ConfigError as err:
            unnamed.append(f"a setting ({err})")
            config = raw
        if unnamed:
            warnings.warn(f"config.json cannot name {', '.join(unnamed)}: `python -m jaxrl_vla.eval --run` and "
                          "`train --resume` cannot rebuild this run; Trainer.load(path, env=..., policy=...) can",
                          RuntimeWarning, stacklevel=4)
        return config

    def describe(self, total_iterations: int) -> str:
        """One line saying what an iteration is, so `buffer_size` is never ambiguous."""
        minibatches = self.cfg.num_minibatches(self.samples_per_iteration)
        per_call = ""
        if self._program is not None:
            upto = "" if self.iterations_per_call else "up to "
            per_call = f", {upto}{self.call_iterations} per jitted call"
        return (
            f"{self.buffer_type} mode: {self.buffer_size} steps x {self.num_envs} envs = "
            f"{self.samples_per_iteration:,} transitions per iteration, {self.cfg.n_epochs} epochs x "
            f"{minibatches} minibatches of {self.cfg.batch_size}; {total_iterations} iterations{per_call}; "
            f"{self._describe_devices()}run dir {self.run_dir}"
        )

    def _describe_devices(self) -> str:
        if self.mesh.size == 1:
            return ""
        platform = self.mesh.devices.flat[0].platform
        processes = jax.process_count()
        hosts = f" in {processes} processes" if processes > 1 else ""
        env_leaves = jax.tree_util.tree_leaves(self.state.obs) if self.state is not None else []
        if processes > 1 and env_leaves:  # what this process steps: its devices' rows of the env batch
            hosts += f" (this one steps {sum(s.data.shape[0] for s in env_leaves[0].addressable_shards)} envs)"
        fsdp = sharding.fsdp_size(self.mesh)
        if fsdp == 1:
            return f"data-parallel over {self.mesh.size} {platform} devices{hosts}; "
        params = sharding.describe_params(self.mesh, self.state.params) if self.state is not None else ""
        return (f"mesh data {self.mesh.shape[sharding.DATA_AXIS]} x fsdp {fsdp} over {self.mesh.size} {platform} "
                f"devices{hosts} ({params}); ")

    def evaluate(self) -> dict[str, float | None]:
        """Deterministic evaluation over num_eval_episodes first episodes."""
        future = getattr(self, "_evaluate_compiled", None)
        evaluate = self._evaluate if future is None else future.result()
        key = jax.device_put(self._eval_key(), sharding.replicated(self.mesh))
        stats = jax.device_get(evaluate(self.state.params, self.state.obs_stats, key))
        self._warn_unfinished(int(stats.count))
        out = episode_summary(stats, prefix="eval/")
        if float(stats.count) > 0 and self._env_reports_success():
            out["eval/success_rate"] = float(stats.success_sum) / float(stats.count)
        return out

    def _env_reports_success(self) -> bool:
        return bool(getattr(self.env, "reports_success", False))

    def train(self, total_timesteps: int | None = None, resume: str | Path | None = None,
              new_run: bool = False) -> TrainState:
        """Train; returns the final state.

        First call (or `new_run=True`): a new run directory and a fresh state, trained for
        `total_timesteps` env steps (rounded up to whole iterations), else `iterations`.
        Called again on the same Trainer (or after `Trainer.load`): the run continues where it
        stopped, as SB3's `learn(reset_num_timesteps=False)`: same run directory, parameters,
        optimiser state and step counters, for `total_timesteps` MORE env steps (else another
        `iterations`). `resume=RUN_DIR` (what `train --resume` does): that run's latest checkpoint,
        trained up to its budget: `total_timesteps` in all when given, else `iterations`, which
        config.json records as the run's budget (a run started with --total-timesteps keeps it).
        """
        continuing = self.state is not None and self.run_dir is not None and resume is None and not new_run
        done_before = int(self.state.iteration) if continuing else 0
        if total_timesteps is not None:
            planned = max(1, math.ceil(int(total_timesteps) / self.samples_per_iteration))
        elif self.iterations is not None:
            planned = int(self.iterations)
        else:
            raise ValueError("give total_timesteps or trainer.iterations")
        total_iterations = done_before + planned
        self._build(total_iterations)
        self._learning_rates = learning_rate_per_iteration(self.cfg, total_iterations, self.samples_per_iteration)
        self._diverged = False
        self._final_save = False
        self._stop.clear()
        self.stopped_by_callback = False
        if continuing:
            self._write_config(total_iterations, update_only=True)
        else:
            self._open_run(Path(resume) if resume else None, total_iterations)
        checkpointer = Checkpointer(self.run_dir)
        if continuing:  # placed as this run's program expects (a loaded state sits on one device)
            state = jax.device_put(self.state, self._state_shardings)
        else:
            init = compiler.jit(self._init_state, out_shardings=self._state_shardings)
            # onto the mesh as the state holds them (fsdp-sharded or replicated): pretrained params arrive
            # committed to one device (the loader's), and a large VLA's must never be replicated whole
            key = jax.device_put(jax.random.PRNGKey(self.seed), sharding.replicated(self.mesh))
            init_params = None if self.init_params is None else jax.device_put(self.init_params,
                                                                               self._state_shardings.params)
            state = init(key, init_params)
        if resume:
            state, _ = checkpointer.restore(state)
        self._device_demos = self._prepare_demos(state.params)
        self.state = state
        start = int(state.iteration)
        # only process 0 prints and writes metrics; every process writes its checkpoint shards
        logger = (RunLogger(self.run_dir, total_iterations, start, progress=self.progress,
                            start_step=int(state.global_step)) if distributed.is_primary()
                  else distributed.SilentLogger())
        logger.console.print(self.describe(total_iterations))
        if resume or continuing:
            verb = "resuming" if resume else "continuing"
            left = (f"{total_iterations - start} more to its budget of {total_iterations}" if start < total_iterations
                    else f"already at its budget of {total_iterations} iterations: nothing to train (give "
                         "--total-timesteps, counted from the start of the run, to train further)")
            logger.console.print(f"{verb} {self.run_dir} from iteration {start} ({int(state.global_step):,} env steps); "
                                 f"{left}")
        if total_timesteps is not None:
            steps = planned * self.samples_per_iteration
            rounded = "" if steps == int(total_timesteps) else f" (rounded up to whole iterations of {self.samples_per_iteration:,})"
            more = " more" if continuing else ""
            logger.console.print(f"total timesteps {int(total_timesteps):,}{more}: {planned} iterations = {steps:,} env steps{rounded}")
        previous_handler = self._install_sigint()
        interrupted = False
        try:
            self._start_workers(start)
            interrupted = self._loop(start, total_iterations, logger, checkpointer)
        finally:
            self._final_save = True  # from here on Ctrl-C only prints (see _install_sigint)
            self._stop_workers()
            if getattr(self, "_compiler", None) is not None:
                self._compiler.shutdown(wait=False)
            if self._pending is not None:  # the loop raised after a prefetch: its state is the newest
                self.state, self._pending = self._pending[0], None
            jax.block_until_ready(self.state)
            # unless the loop just saved this iteration (a stop right after a save_freq checkpoint), or the
            # state holds non-finite numbers (a diverged run keeps its last good checkpoint as the latest)
            if not self._diverged and checkpointer.latest_iteration() != int(self.state.iteration):
                checkpointer.save(int(self.state.iteration), self.state, {"config": self.config})
            checkpointer.close()
            logger.close()
            self._final_save = False
            self._restore_sigint(previous_handler)
        verb = ("stopped by the callback at" if self.stopped_by_callback else "interrupted at") if interrupted else "finished"
        logger.console.print(
            f"{verb} iteration {int(self.state.iteration)} ({int(self.state.global_step):,} env steps); "
            f"outputs in {self.run_dir} (metrics.jsonl, tensorboard/, checkpoints/)"
        )
        self.interrupted = interrupted and not self.stopped_by_callback
        return self.state

    # ------------------------------------------------------------------ save, load, predict

    def save(self, path: str | Path) -> Path:
        """Write the current state into directory `path` as a run directory (config.json and
        checkpoints/<iteration>), which `Trainer.load`, `python -m jaxrl_vla.eval --run` and
        `train --resume` read. The run's own directory gets a checkpoint at the end of every
        train() anyway; this is for a copy elsewhere."""
        if self.state is None:
            raise ValueError("save: nothing to save yet; call train() (or Trainer.load) first")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if not self.config:
            self.config = self.resolved_config()
        jax.block_until_ready(self.state)
        if distributed.is_primary():
            (path / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        checkpointer = Checkpointer(path)
        try:
            checkpointer.save(int(self.state.iteration), self.state, {"config": self.config})
        finally:
            checkpointer.close()
        return path

    @classmethod
    def load(cls, path: str | Path, env: Any = None, policy: Any = None, obs_keys: Any = None,
             **settings: Any) -> "Trainer":
        """The Trainer of the run directory `path` (its config.json), holding its latest checkpoint's
        state: `predict` acts with it, `train()` continues the run in `path`.

        `env` / `policy` replace what config.json names (needed where it could not name them), with
        the `obs_keys` the run used for a TorchRL env; `settings` replace trainer fields (e.g.
        progress=False, num_envs=1)."""
        from jaxrl_vla.build import build_algorithm, build_env, build_policy, build_trainer, trainer_kwargs
        from jaxrl_vla.config import ConfigError, resolve

        path = Path(path)
        config_path = path / "config.json"
        if not config_path.is_file():
            raise ValueError(f"Trainer.load: {path} has no config.json (is it a run directory?)")
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
        for key, value in settings.items():
            if key not in cfg.get("trainer", {}):
                raise ConfigError(f"Trainer.load: {key!r} is not a trainer field")
            cfg["trainer"][key] = value
        cfg = resolve(cfg)
        if env is None and policy is None:
            trainer = build_trainer(cfg)
        else:
            env = resolve_env(env, obs_keys) if env is not None else build_env(cfg["env"])
            policy = policy if policy is not None else build_policy(cfg["policy"], env)[0]
            t = cfg["trainer"]
            trainer = Trainer(policy, env, build_algorithm(cfg["algorithm"]), config=cfg,
                              num_collectors=t["num_collectors"], env_step_timeout=t["env_step_timeout"],
                              **trainer_kwargs(cfg))
        trainer._restore(path)
        return trainer

    def _restore(self, run_dir: Path) -> None:
        """self.state <- the latest checkpoint of `run_dir`, which becomes this trainer's run."""
        total = int(self.iterations or 1)
        grad_steps = total * self.cfg.n_epochs * self.cfg.num_minibatches(self.samples_per_iteration)
        self.optimizer = ppo.make_optimizer(self.cfg, grad_steps, self.trainable_mask, self.lr_scales)
        template = jax.jit(self._init_state)(jax.random.PRNGKey(self.seed), self.init_params)
        checkpointer = Checkpointer(run_dir)
        try:
            self.state, _ = checkpointer.restore(template)
        finally:
            checkpointer.close()
        self.run_dir = Path(run_dir)

    def _observation_space(self) -> Any:
        return getattr(self, "host_env", self.env).observation_space

    def predict(self, obs: Any, deterministic: bool = True) -> np.ndarray:
        """Actions for `obs` from the current parameters (observation normalisation included).

        `obs`: one observation (as the env returns it) or a batch with a leading axis; returns
        one action, or [B, ...] actions (an action-chunking policy: its chunk [H, ...] /
        [B, H, ...]). Unlike SB3's predict, the action alone, no recurrent state."""
        from jaxrl_vla.training.acting import act_chunk

        if self.state is None:
            raise ValueError("predict: no parameters yet; call train() or Trainer.load(path) first")
        zeros = zeros_like_obs(self._observation_space(), 1)
        leaves, treedef = jax.tree_util.tree_flatten(zeros)
        try:
            given = treedef.flatten_up_to(obs)
        except (ValueError, TypeError):
            raise ValueError(f"predict: obs must be structured as the env's observations ({treedef})") from None
        given = [np.asarray(x) for x in given]
        single = given[0].ndim == leaves[0].ndim - 1
        batch = jax.tree_util.tree_unflatten(
            treedef, [np.asarray(x, z.dtype)[None] if single else np.asarray(x, z.dtype) for x, z in zip(given, leaves)])
        if getattr(self, "_predict_fn", None) is None:
            apply_fn = self.policy.apply
            self._predict_fn = jax.jit(functools.partial(act_chunk, apply_fn), static_argnames="deterministic")
            self._predict_calls = 0
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed + 2), self._predict_calls)
        self._predict_calls += 1
        actions = np.asarray(self._predict_fn(self.state.params, self.state.obs_stats, batch, key,
                                              deterministic=bool(deterministic))[0])
        if self.chunk == 1:
            actions = actions[:, 0]
        return actions[0] if single else actions

    def _evaluation_due(self, iteration: int, total: int) -> bool:
        return self.eval_freq > 0 and (iteration % self.eval_freq == 0 or iteration == total)

    def _checkpoint_due(self, iteration: int, total: int) -> bool:
        return self.save_freq > 0 and iteration % self.save_freq == 0 and iteration < total

    def _prefetch_allowed(self, done: int, total: int) -> bool:
        """Whether the next call may be dispatched before this one's results are
        fetched: not when the state after `done` iterations is needed on the host."""
        return (
            done < total
            and not self._stop.is_set()
            and not self._evaluation_due(done, total)
            and not self._checkpoint_due(done, total)
        )

    def _loop(self, start: int, total: int, logger: RunLogger, checkpointer: Checkpointer) -> bool:
        """Run the iterations in calls (`_next_call_size`), logging one record per iteration;
        True when stopped early."""
        last_eval: dict = {}
        done, size = start, None
        seconds_per_iteration: float | None = None
        while done < total:
            if self._pending is None and self._stop_now():
                return True
            size = size or self._next_call_size(done, total, seconds_per_iteration)
            after = done + size
            next_size = 0
            if self._prefetch_allowed(after, total):
                next_size = self._next_call_size(after, total, seconds_per_iteration)
            t0 = time.perf_counter()
            result = self._run_call(size, next_size)
            if result is None:  # a stop request ended the call early
                return True
            self.state, reports = result
            seconds_per_iteration = (time.perf_counter() - t0) / size
            records = [self._record(done + i + 1, m, e, seconds_per_iteration) for i, (m, e) in enumerate(reports)]
            diverged = first_non_finite_metric(done + 1, [m for m, _ in reports])
            if diverged is not None:
                for record in records[: diverged[0] - done - 1]:  # the good iterations of this call
                    logger.log(record)
                self._diverged = True
                raise TrainingDiverged(
                    f"iteration {diverged[0]}: {diverged[1]} is {diverged[2]} (non-finite); training stopped. "
                    f"Nothing past the last good checkpoint was saved: latest is "
                    f"{checkpointer.latest_iteration() if checkpointer.latest_iteration() is not None else 'none'}"
                )
            if self._evaluation_due(after, total):  # call_size: only ever the call's last iteration
                last_eval = self.evaluate()
                records[-1].update(last_eval)
            for record in records:
                logger.log(record)
                if distributed.is_primary():
                    self._call_back(record)
            if self._checkpoint_due(after, total):
                checkpointer.save(after, self.state, {"config": self.config})
            done, size = after, next_size  # a call dispatched ahead has its size fixed already
        self.final_eval = last_eval
        return False

    def _call_back(self, record: dict) -> None:
        """`log_fn` (the older hook; its return is ignored), then `callback`, whose False stops training."""
        if self.log_fn is not None:
            self.log_fn(record)
        if self.callback is not None and self.callback(dict(record)) is False:
            self.stopped_by_callback = True
            self._stop.set()

    def _next_call_size(self, done: int, total: int, seconds_per_iteration: float | None) -> int:
        """Iterations of the call that starts after `done`: up to the next multiple of the
        call's K (see `call_size`), K fixed by trainer.iterations_per_call or, in auto, sized
        to the measured iteration time (`adaptive_call_iterations`)."""
        k = self.call_iterations  # 1 where the host drives each iteration (the async trainer)
        if not self.iterations_per_call:
            k = adaptive_call_iterations(k, seconds_per_iteration)
        return call_size(done, total, k)

    def _record(self, iteration: int, metrics: dict, episodes: EpisodeStats, seconds: float) -> dict:
        """The metrics.jsonl record of one iteration; `seconds` is its share of its call's wall time."""
        metrics = dict(metrics)
        global_step = metrics.pop("global_step", None)
        record = {
            "iteration": iteration,
            "global_step": int(self.state.global_step if global_step is None else global_step),
            "sps": self.samples_per_iteration / seconds,
            "iteration_time": seconds,
            "learning_rate": float(self._learning_rates[iteration - 1]),
        }
        record.update(episode_summary(episodes))
        if self._env_reports_success() and float(episodes.count) > 0:
            record["success_rate"] = float(episodes.success_sum) / float(episodes.count)
        record.update({k: float(v) for k, v in metrics.items()})
        return record

    def _run_call(self, size: int, next_size: int) -> tuple[TrainState, list[IterationReport]] | None:
        """Run `size` iterations -> (the state after them, one IterationReport per
        iteration), or None when a stop request ended them early. `next_size` > 0:
        the loop's next call, which may be dispatched ahead (see `_run_fused`).

        Standard mode runs them as one call of its compiled program; a subclass
        without it (the async trainer) runs its own `_run_iteration`, one per call.
        """
        if self._program is not None:
            return self._run_fused(size, next_size)
        result = self._run_iteration(prefetch=next_size > 0)
        if result is None:
            return None
        new_state, metrics, episodes = result
        return new_state, [(metrics, episodes)]

    def _run_fused(self, size: int, next_size: int) -> tuple[TrainState, list[IterationReport]]:
        """One jitted call of `size` iterations (or the call already dispatched ahead).

        With `next_size`, the next call is dispatched before this one's results
        are fetched, so the device runs back to back while the host logs. This
        call's state is then donated to that one: the loop only prefetches when
        nothing (evaluation, checkpoint, the end) needs it.
        """
        result = self._pending if self._pending is not None else self._step()(self.state, np.int32(size), self._device_demos)
        self._pending = None
        new_state, reports, global_steps = result
        if next_size:  # queued behind this one before waiting for it: the device never idles
            self._pending = self._step()(new_state, np.int32(next_size), self._device_demos)
        reports, global_steps = jax.device_get((reports, global_steps))
        return new_state, [self._unpack(reports[i], global_steps[i]) for i in range(size)]

    def _unpack(self, report: Any, global_step: Any) -> IterationReport:
        """One iteration's packed float32 report -> (metrics with global_step, EpisodeStats)."""
        metrics, episodes = jax.tree_util.tree_unflatten(self._report_treedef, list(report))
        return dict(metrics, global_step=int(global_step)), episodes

    def _run_iteration(self, prefetch: bool = False) -> tuple[TrainState, dict, EpisodeStats] | None:
        """Hook for subclasses whose iterations the host drives (the async trainer):
        one collect + learn step -> (new state, host metrics, host EpisodeStats),
        None when a stop request ended it. Standard mode runs `_run_fused` instead."""
        raise NotImplementedError

    def _step(self) -> Callable:
        """The compiled program (waits for the background compile the first time)."""
        return self._program.result()

    def _start_workers(self, start_iteration: int) -> None:
        """Hook: start background work before the loop (the async trainer's collectors)."""

    def _stop_workers(self) -> None:
        """Hook: stop and join background work; runs even when the loop raised."""

    def _stop_now(self) -> bool:
        """Whether the loop stops before its next call: a stop was requested (Ctrl-C, the callback). The
        async trainer on several processes agrees on it inside its iteration instead."""
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Finish the calls already dispatched (the current one and at most one ahead,
        each of at most iterations_per_call iterations), log them, checkpoint and
        return (what Ctrl-C does)."""
        self._stop.set()

    def _install_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if getattr(self, "_final_save", False):  # never abort the final checkpoint: that would lose the run
                print("saving the final checkpoint; it finishes in a moment", file=sys.stderr, flush=True)
                return
            if self._stop.is_set():  # a second Ctrl-C: give up waiting (the final checkpoint is still written)
                raise KeyboardInterrupt
            self._stop.set()

        return signal.signal(signal.SIGINT, handler)

    def _restore_sigint(self, previous) -> None:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
