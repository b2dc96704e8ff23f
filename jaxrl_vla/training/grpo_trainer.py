"""GRPO's trainers: groups of rollouts from one initial state and a critic-free learner, in both modes.

`GRPOTrainer` (standard mode, JAX-native env): each iteration resets all N envs into
N / G groups (every group from one initial state: `grpo.GroupVecEnv`), runs
`trainer.buffer_size` steps (the step limit: one episode per env, steps after its end
masked, an unfinished episode cut there), scores each env's episode by its outcome and
runs `grpo.update`. Where everything else happens (jitted iteration loop, evaluation,
checkpoints, resume) is the Trainer's.

`AsyncGRPOTrainer` (vla mode, and every host env: gymnasium, TorchRL, TensorDict,
Meta-World; `Trainer(...)` picks it) is the async trainer with rounds instead of a
stream of chunks, as RLinf / SimpleVLA-RL collect GRPO's groups: each collector owns
whole groups (its num_envs / num_collectors envs a multiple of G) and repeats rounds
(`RoundCollector`): reset its groups with one fresh seed (`round_seed`, from
trainer.seed), act until every env's first episode ended or the step limit
T = steps per env per iteration, hand over the round [T, n]. The learner takes one
round per collector (groups never straddle collectors) and runs the same
`make_grpo_learn_fn` as standard mode. Threads, stop / Ctrl-C, faults, checkpoints and
evaluation are the async trainer's.

Why the circular buffer still fits: a round writes exactly T rows (its early-ended
tail padded, see `RoundCollector`), the buffer's capacity, so a full buffer is one
complete round; the collector that finished one starts the next once the learner has
taken it: at most one round ahead, acted by the learner's version or the one before
(staleness <= 1), logged as PPO's (staleness, staleness_max).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrl_vla.algo import grpo
from jaxrl_vla.envs.base import supports_seeded_reset
from jaxrl_vla.models.vla_policy import auxiliary_loss
from jaxrl_vla.training.async_trainer import POLL_S, AsyncTrainer, Collector, PolicySnapshot
from jaxrl_vla.training.learner import TrainState
from jaxrl_vla.training.normalizer import normalize, update_stats
from jaxrl_vla.training.rollout import make_rollout_fn
from jaxrl_vla.training.trainer import Trainer
from jaxrl_vla.types import Demonstrations, Transition


def check_group_env(env: Any) -> None:
    """GRPO compares rollouts from one initial state: an env that cannot reset to a given state is
    a config error (ValueError here; `build_trainer` makes it a ConfigError)."""
    if not supports_seeded_reset(env):
        raise ValueError(f"algorithm.name 'grpo': env {type(env).__name__} cannot reset to a given state "
                         "(seeded_reset is False; see jaxrl_vla.envs.base), so a group's rollouts would not "
                         "share their start; use algorithm.name 'ppo'")


def check_outcome(cfg: grpo.GRPOConfig, env: Any) -> None:
    """The outcome 'success' needs an env whose infos report it."""
    if cfg.reward == "success" and not getattr(env, "reports_success", False):
        raise ValueError(f"algorithm.cfg.reward 'success': {type(env).__name__} reports no info['success']; "
                         "use 'return'")


def with_reference(state: TrainState, cfg: grpo.GRPOConfig) -> TrainState:
    """With kl_coef > 0, the starting policy as the KL reference, checkpointed with the state (resume keeps it)."""
    if cfg.kl_coef > 0:
        state = state.replace(ref_params=jax.tree_util.tree_map(jnp.copy, state.params))
    return state


def make_grpo_learn_fn(
    apply_fn: Callable,
    optimizer: optax.GradientTransformation,
    cfg: grpo.GRPOConfig,
    trainable_mask: Any = None,
    minibatch_sharding: jax.sharding.Sharding | None = None,
    auxiliary_loss_fn: Callable[[Any, Any, Any], jax.Array] | None = None,
) -> Callable[..., tuple[TrainState, dict]]:
    """`learn(state, rollout [T, N], last_value, demos=None) -> (state, metrics)` as
    `learner.make_learn_fn`'s, with GRPO's batch and loss (`last_value` is unused: no critic)."""

    def learn(state: TrainState, rollout: Transition, last_value: jax.Array,
              demos: Demonstrations | None = None) -> tuple[TrainState, dict]:
        del last_value
        stats = state.obs_stats

        def normalized_apply(params, obs):
            return apply_fn(params, normalize(stats, obs))

        aux_loss_fn = None
        if auxiliary_loss_fn is not None:
            def aux_loss_fn(params, obs):
                return auxiliary_loss_fn(params, normalize(stats, obs), obs)

        batch, grpo_metrics = grpo.make_grpo_batch(normalized_apply, state.params, state.ref_params, rollout, cfg)
        key, update_key = jax.random.split(state.key)
        params, opt_state, metrics = grpo.update(
            state.params, state.opt_state, batch, update_key, apply_fn=normalized_apply, optimizer=optimizer,
            cfg=cfg, trainable_mask=trainable_mask, minibatch_sharding=minibatch_sharding, aux_loss_fn=aux_loss_fn,
            demos=demos,
        )
        metrics.update(grpo_metrics)
        metrics["staleness"] = jnp.mean(state.iteration - rollout.policy_version.astype(jnp.float32))
        new_stats = None if stats is None else update_stats(stats, rollout.obs)
        new_state = state.replace(params=params, opt_state=opt_state, obs_stats=new_stats, key=key,
                                  global_step=state.global_step + rollout.reward.size,
                                  iteration=state.iteration + 1)
        return new_state, metrics

    return learn


class GRPOTrainer(Trainer):
    """`Trainer` for `algorithm` a `grpo.GRPOConfig` (standard mode, JAX-native env).

    trainer.num_envs must be a multiple of algorithm.cfg.group_size; trainer.buffer_size is the
    step limit of every episode (the env's max_episode_steps lets every episode end)."""

    def __init__(self, policy: Any, env: Any, algorithm: grpo.GRPOConfig, **kwargs: Any):
        if not isinstance(algorithm, grpo.GRPOConfig):
            raise ValueError("GRPOTrainer needs a GRPOConfig (algorithm.name 'grpo')")
        algorithm.check()
        check_group_env(env)
        check_outcome(algorithm, env)
        if algorithm.noise_correlation > 0:
            raise ValueError("algorithm.cfg.noise_correlation is PPO-only (GRPO's rollouts draw independent noise)")
        super().__init__(policy, env, algorithm, **kwargs)
        self.vec_env = grpo.GroupVecEnv(env, self.num_envs, algorithm.group_size, algorithm.reward)

    def describe(self, total_iterations: int) -> str:
        """The Trainer's line, plus what a GRPO iteration collects."""
        limit = getattr(self.env, "max_episode_steps", None)
        cut = "" if limit is None or self.buffer_size >= limit else f" (the env's own limit is {limit})"
        return (f"GRPO: {self.num_envs // self.cfg.group_size} groups of {self.cfg.group_size}, one episode per env "
                f"per iteration, cut at {self.buffer_size} steps{cut}, outcome {self.cfg.reward!r}; "
                + super().describe(total_iterations))

    def _init_state(self, key: jax.Array, params: Any = None) -> TrainState:
        return with_reference(super()._init_state(key, params), self.cfg)

    def _rollout_and_learn(self, apply_fn: Callable, obs_encoder: Callable | None) -> tuple[Callable, Callable]:
        collect = make_rollout_fn(apply_fn, self.vec_env, self.buffer_size, self.chunk, obs_encoder)
        vec_env = self.vec_env

        def rollout(params, obs_stats, env_state, obs, key, version):
            """Every iteration starts fresh groups (one episode per env per iteration)."""
            del env_state, obs
            reset_key, key = jax.random.split(key)
            env_state, obs = vec_env.reset(reset_key)
            return collect(params, obs_stats, env_state, obs, key, version)

        learn = make_grpo_learn_fn(apply_fn, self.optimizer, self.cfg, self.trainable_mask, self.minibatch_sharding,
                                   auxiliary_loss(self.policy))
        return rollout, learn


# --------------------------------------------------------------------------- vla mode and host envs


def round_seed(seed: int, collector: int, round_index: int) -> int:
    """The reset seed of a collector's round: fresh for every (collector, round), a function of
    trainer.seed (runs are reproducible, a resumed run draws new starts: `round_index` counts from
    the iteration it resumes at). 31 bits: every adapter takes it (a JAX PRNGKey, gymnasium, torch)."""
    return int(np.random.SeedSequence([int(seed), int(collector), int(round_index)]).generate_state(1)[0] >> 1)


def interleave(parts: list[Any]) -> Any:
    """G pytrees [k, ...] -> one [k * G, ...] where row j * G + m is part m's row j (group j, member m)."""
    return jax.tree_util.tree_map(lambda *xs: np.stack(xs, axis=1).reshape((-1,) + np.shape(xs[0])[1:]), *parts)


class GroupHostVecEnv:
    """`HostVecEnv` of N = k x G copies in k groups of G (group j: envs jG .. jG + G - 1): the host
    twin of `grpo.GroupVecEnv`, made of G member envs of k copies each.

    Why members, not one env of N copies: a host env's `reset(seed=s)` gives its copies different
    starts (gymnasium seeds copy i with s + i, Meta-World draws copy i's task and goal from [s, i],
    a JAX env on the host splits the key of s), and reproduces them for the same s; that is all
    `seeded_reset = True` promises (jaxrl_vla.envs.base). Every member is reset with the round's
    one seed, so copy j of every member starts from the same state: group j's G members share it,
    the k groups differ, and no env needs a per-copy seed API.

    `step` returns the rewards a GRPO round stores, `grpo.outcome_rewards` (their sum over the
    round is each env's outcome), with the protocol's terminated / truncated / final_obs / success
    and, for the collector's episode statistics: env_reward (the env's own reward), live (the env's
    first episode was running before this step), first_end. `finished`: whose first episode ended.
    Other info keys of the members are dropped.
    """

    def __init__(self, members: list[Any], outcome: str):
        sizes = {int(m.num_envs) for m in members}
        if len(sizes) != 1:
            raise ValueError(f"GroupHostVecEnv: members of unequal sizes {sorted(sizes)}")
        self.members = members
        self.group_size = len(members)
        self.num_envs = sizes.pop() * self.group_size
        self.outcome = outcome
        self.finished = np.ones(self.num_envs, bool)  # no round started yet

    def reset(self, seed: int | None = None) -> Any:
        """Every member reset with `seed` (None: each member's own seed from make, equal by construction)."""
        self.finished = np.zeros(self.num_envs, bool)
        return interleave([member.reset(seed=seed) for member in self.members])

    def step(self, actions: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict]:
        actions = np.asarray(actions)
        per_member = actions.reshape((self.num_envs // self.group_size, self.group_size) + actions.shape[1:])
        results = [member.step(per_member[:, m]) for m, member in enumerate(self.members)]
        obs = interleave([r[0] for r in results])
        reward, terminated, truncated = (interleave([np.asarray(r[i]) for r in results]) for i in (1, 2, 3))
        terminated, truncated = terminated.astype(bool), truncated.astype(bool)
        infos = [r[4] for r in results]
        success = None
        if any("success" in info for info in infos):  # gymnasium reports it only on steps that end an episode
            k = self.num_envs // self.group_size
            success = interleave([np.asarray(info.get("success", np.zeros(k, bool)), bool) for info in infos])
        done = terminated | truncated
        live = ~self.finished
        first_end = done & live
        if self.outcome == "success" and success is None and first_end.any():
            raise ValueError("algorithm.cfg.reward 'success': the env's step info has no 'success' on a step that "
                             "ends an episode; use 'return'")
        scored = grpo.outcome_rewards(reward, success, live, first_end, self.outcome)
        info = {"final_obs": interleave([info["final_obs"] for info in infos]), "env_reward": reward,
                "live": live, "first_end": first_end}
        if success is not None:
            info["success"] = success
        self.finished = self.finished | done
        return obs, np.asarray(scored, np.float32), terminated, truncated, info

    def close(self) -> None:
        for member in self.members:
            member.close()


class RoundCollector(Collector):
    """GRPO's collector: rounds of whole episodes of its groups, not a stream of chunks.

    A round resets the groups with one fresh seed (`seeds(round)`), acts chunk by chunk (the
    async collector's `collect_chunk`: one snapshot per chunk, its version on every row, the
    token / flow head's sample_info) until every env's first episode ended or the step limit
    `steps`, then pads the round to `steps` rows with copies of its last transition (flagged
    terminated, reward 0: after every env's first end, so `grpo.episode_mask` masks them; no env
    step is spent on them, which matters for a simulator whose episodes end early on success).
    Exactly `steps` rows per round = the buffer's capacity: a full buffer is one complete round
    (module docstring). Episode statistics count each env's first episode of a round only (what is
    trained on); the padding's rows count as env steps in global_step (T x N per iteration).
    """

    def __init__(self, *args: Any, steps: int, seeds: Callable[[int], int], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.steps = int(steps)
        self.seeds = seeds
        self.rounds = 0

    def reset(self) -> None:
        """Nothing: every round resets its groups itself (`collect_round`)."""

    def collect_unit(self, stop: threading.Event) -> None:
        self.collect_round(stop)

    def collect_steps(self, num_steps: int) -> None:
        """Synchronous collection (standard mode): one round of `num_steps` = the step limit."""
        if num_steps != self.steps:
            raise ValueError(f"RoundCollector: a round is {self.steps} steps, asked for {num_steps}")
        self.collect_round()

    def collect_round(self, stop: threading.Event | None = None) -> None:
        """One round into the buffer (module docstring); returns early, unfinished, on `stop`.

        It starts once the learner has taken the previous round (not at once, acting its first chunk
        with the parameters the learner is replacing): every row is then acted by the version the
        learner trains at or the one before (staleness <= 1)."""
        while self.buffer.is_full():
            if stop is not None and stop.is_set():
                return
            time.sleep(POLL_S)
        seed = self.seeds(self.rounds)
        self.rounds += 1
        self.obs = self._timed("env.reset", self.env.reset, seed)
        self._return[:] = 0.0
        self._length[:] = 0
        written = 0
        while written < self.steps and not self.env.finished.all():
            if stop is not None and stop.is_set():
                return
            written += self.collect_chunk(stop)
        if written < self.steps and not (stop is not None and stop.is_set()):
            self.buffer.add(self._padding(self.steps - written), self.obs)

    def _padding(self, rows: int) -> Transition:
        last = self.last_transition
        n = self.num_envs
        pad = last.replace(reward=np.zeros(n, np.float32), terminated=np.ones(n, bool), truncated=np.zeros(n, bool),
                           final_value=np.zeros_like(last.final_value))
        return jax.tree_util.tree_map(lambda x: np.broadcast_to(x, (rows,) + np.shape(x)), pad)

    def _track_episodes(self, reward: np.ndarray, done: np.ndarray, info: dict) -> None:
        """First episodes of the round only (`GroupHostVecEnv`'s live / first_end), with the env's own return."""
        live = info["live"]
        self._return += np.where(live, info["env_reward"], 0.0)
        self._length += live
        success = info.get("success")
        if success is not None:
            self.saw_success = True
        for i in np.flatnonzero(info["first_end"]):
            self.episodes.append((float(self._return[i]), int(self._length[i]),
                                  None if success is None else bool(success[i])))


class AsyncGRPOTrainer(AsyncTrainer):
    """GRPO in vla mode (`buffer_type: "vla"`) and with host envs (both buffer types): rounds of groups
    from the collectors, `make_grpo_learn_fn` on the learner (module docstring).

    As `AsyncTrainer`, plus: (trainer.num_envs / trainer.num_collectors) must be a multiple of
    algorithm.cfg.group_size (each collector owns whole groups); the env must reset to a given state
    (`seeded_reset`); the steps per env per iteration (vla mode: buffer_size / num_envs) are every
    round's step limit. Collectors run as threads (not `trainer.collectors.backend: ray`).
    """

    def __init__(self, policy: Any, env: Any, algorithm: grpo.GRPOConfig, buffer_size: int = 2048,
                 buffer_type: str | None = None, **kwargs: Any):
        if not isinstance(algorithm, grpo.GRPOConfig):
            raise ValueError("AsyncGRPOTrainer needs a GRPOConfig (algorithm.name 'grpo')")
        algorithm.check()
        resolved = self._resolve_env(env, kwargs.get("obs_keys"))
        check_group_env(resolved)
        check_outcome(algorithm, resolved)
        collectors = kwargs.get("collectors") or ((kwargs.get("config") or {}).get("trainer") or {}).get("collectors")
        if (collectors or {}).get("backend", "threads") == "ray":
            raise ValueError("trainer.collectors.backend 'ray': GRPO's round collectors run as threads of this "
                             "process (use backend 'threads')")
        super().__init__(policy, env, algorithm, buffer_size, buffer_type, **kwargs)
        per_collector = self.num_envs // self.num_collectors
        if per_collector % algorithm.group_size:
            raise ValueError(f"trainer.num_envs ({self.num_envs}) / trainer.num_collectors ({self.num_collectors}) = "
                             f"{per_collector} envs per collector must be a multiple of algorithm.cfg.group_size "
                             f"({algorithm.group_size}): each collector owns whole groups")
        if getattr(self.host_env, "fixed_num_envs", None) is not None:
            raise ValueError(f"env: {self.host_env!r} holds a fixed number of env copies, but GRPO makes "
                             f"algorithm.cfg.group_size ({algorithm.group_size}) env instances per collector; pass a "
                             "factory of the env (or its id)")

    def describe(self, total_iterations: int) -> str:
        limit = self.host_env.max_episode_steps
        cut = "" if self.buffer_size >= limit else f" (the env's own limit is {limit})"
        return (f"GRPO: {self.num_envs // self.cfg.group_size} groups of {self.cfg.group_size} over "
                f"{self.num_collectors} collector(s), each round one seeded reset and one episode per env, cut at "
                f"{self.buffer_size} steps{cut}, outcome {self.cfg.reward!r}; " + super().describe(total_iterations))

    def _init_state(self, key: jax.Array, params: Any = None) -> TrainState:
        return with_reference(super()._init_state(key, params), self.cfg)

    def _make_learn(self, apply_fn: Callable) -> Callable:
        learn_fn = make_grpo_learn_fn(apply_fn, self.optimizer, self.cfg, self.trainable_mask,
                                      self.minibatch_sharding, auxiliary_loss(self.policy))

        def learn(state, rollout, next_obs, demos):
            """GRPO's batch and update on one round per collector (no critic: next_obs is unused)."""
            del next_obs
            self.trace_count += 1  # runs only while tracing: counts compilations
            return learn_fn(state, rollout, None, demos)

        return learn

    def final_values(self, snapshot: PolicySnapshot, final_obs: Any, truncated: np.ndarray) -> np.ndarray:
        """0: GRPO bootstraps nothing, so a time-limit cut costs no extra inference."""
        return np.zeros(np.shape(truncated), np.float32)

    def _new_collector(self, index: int, num_envs: int, env_seed: int, buffer: Any, key: jax.Array,
                       value_dtype: Any, start_iteration: int) -> Collector:
        members = [self.host_env.make(num_envs // self.cfg.group_size, env_seed) for _ in range(self.cfg.group_size)]
        env = GroupHostVecEnv(members, self.cfg.reward)
        seed = self.seed

        def seeds(round_number: int) -> int:
            return round_seed(seed, index, start_iteration + round_number)

        return RoundCollector(index, env, buffer, self.store, self.infer, self.final_values, key, value_dtype,
                              steps=self.buffer_size, seeds=seeds)
