"""The learner step shared by every collection mode: GAE, PPO update, normaliser."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxrl_vla.algo import ppo
from jaxrl_vla.training.normalizer import RewardStats, RunningStats, normalize, update_stats
from jaxrl_vla.types import Demonstrations, Transition


@struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly; checkpointed whole.

    env_state / obs hold the JAX-native envs' state (None for host envs, whose
    state lives outside JAX and restarts on resume). ref_params: the reference
    (starting) policy a KL penalty pulls towards (GRPO's kl_coef > 0), else None.
    reward_stats: the reward scaling's running returns and moments (trainer.normalize_rewards), else None.
    """

    params: Any
    opt_state: Any
    obs_stats: RunningStats | None
    key: jax.Array
    global_step: jax.Array
    iteration: jax.Array
    env_state: Any = None
    obs: Any = None
    ref_params: Any = None
    reward_stats: RewardStats | None = None


def initial_train_state(
    params: Any, optimizer: optax.GradientTransformation, obs_stats: RunningStats | None, key: jax.Array,
    env_state: Any = None, obs: Any = None,
) -> TrainState:
    """A TrainState at iteration 0 (both trainers start from this)."""
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        obs_stats=obs_stats,
        key=key,
        global_step=jnp.zeros((), jnp.int32),
        iteration=jnp.zeros((), jnp.int32),
        env_state=env_state,
        obs=obs,
    )


def make_learn_fn(
    apply_fn: Callable,
    optimizer: optax.GradientTransformation,
    cfg: ppo.PPOConfig,
    trainable_mask: Any = None,
    minibatch_sharding: jax.sharding.Sharding | None = None,
    auxiliary_loss: Callable[[Any, Any, Any], jax.Array] | None = None,
) -> Callable[..., tuple[TrainState, dict]]:
    """Build the pure `learn(state, rollout [T, N], last_value [N], demos=None) -> (state, metrics)`.

    `minibatch_sharding` is `ppo.update`'s (`sharding.minibatch_sharding`:
    data-parallel minibatches on a multi-device mesh). `auxiliary_loss(params,
    inputs, obs)` (`vla_policy.auxiliary_loss`) is PPO's `aux_loss_fn`, given
    the normalised observations as inputs and the raw ones for its labels.

    The loss sees observations normalised with the same statistics the actor
    used, so the first epoch's ratio is exactly 1; the statistics absorb the
    rollout only after the update. `demos` (`ppo.update`'s) are normalised with
    the same statistics.
    """

    def learn(
        state: TrainState, rollout: Transition, last_value: jax.Array, demos: Demonstrations | None = None
    ) -> tuple[TrainState, dict]:
        advantages, returns = ppo.gae_from_transitions(rollout, last_value, cfg.gamma, cfg.gae_lambda)
        batch = ppo.make_batch(rollout, advantages, returns)
        key, update_key = jax.random.split(state.key)
        stats = state.obs_stats

        def normalized_apply(params, obs):
            return apply_fn(params, normalize(stats, obs))

        aux_loss_fn = None
        if auxiliary_loss is not None:
            def aux_loss_fn(params, obs):
                return auxiliary_loss(params, normalize(stats, obs), obs)

        params, opt_state, metrics = ppo.update(
            state.params, state.opt_state, batch, update_key, apply_fn=normalized_apply, optimizer=optimizer, cfg=cfg,
            trainable_mask=trainable_mask, minibatch_sharding=minibatch_sharding, aux_loss_fn=aux_loss_fn,
            demos=demos,
        )
        new_stats = None if stats is None else update_stats(stats, rollout.obs)
        metrics["staleness"] = jnp.mean(state.iteration - rollout.policy_version.astype(jnp.float32))
        metrics["advantage_mean"] = advantages.mean()
        metrics["value_mean"] = rollout.value.mean()
        num_steps = rollout.reward.size
        new_state = state.replace(
            params=params,
            opt_state=opt_state,
            obs_stats=new_stats,
            key=key,
            global_step=state.global_step + num_steps,
            iteration=state.iteration + 1,
        )
        return new_state, metrics

    return learn
