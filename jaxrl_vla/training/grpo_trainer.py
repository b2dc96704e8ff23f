"""GRPO's trainer: the standard-mode Trainer with group resets and a critic-free learner.

Each iteration resets all N envs into N / G groups (every group from one initial
state: `grpo.GroupVecEnv`), runs `trainer.buffer_size` steps (the step limit:
one episode per env, steps after its end masked, an unfinished episode cut
there), scores each env's episode by its outcome and runs `grpo.update`. Where
everything else happens (jitted iteration loop, evaluation, checkpoints,
resume) is the Trainer's.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxrl_vla.algo import grpo
from jaxrl_vla.envs.base import supports_seeded_reset
from jaxrl_vla.models.vla_policy import auxiliary_loss
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
    if getattr(env, "is_host_env", False):
        raise ValueError("algorithm.name 'grpo' runs in standard mode with a JAX-native env; host envs "
                         "(env.type gymnasium/torchrl/tensordict) are not supported yet")


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
        if algorithm.reward == "success" and not getattr(env, "reports_success", False):
            raise ValueError(f"algorithm.cfg.reward 'success': {type(env).__name__} reports no info['success']; "
                             "use 'return'")
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
        state = super()._init_state(key, params)
        if self.cfg.kl_coef > 0:  # the starting policy, checkpointed with the state (resume keeps it)
            state = state.replace(ref_params=jax.tree_util.tree_map(jnp.copy, state.params))
        return state

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
