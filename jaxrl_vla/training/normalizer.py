"""Running observation and reward statistics kept in the training state (as Brax
does), not inside an env wrapper, so they are checkpointed and restored with it.

Only floating-point observation leaves are normalised; images (uint8) and token
ids pass through untouched. Rewards are scaled as SB3's VecNormalize does
(`scale_rewards`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


@struct.dataclass
class RunningStats:
    """Per-feature mean and variance by Chan's parallel merge of batches."""

    count: jax.Array
    mean: Any  # pytree like one observation (None for non-float leaves)
    var: Any


def init_stats(obs_example: Any) -> RunningStats:
    """Stats for observations shaped like one unbatched `obs_example`."""
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32) if _is_float(x) else None, obs_example)
    ones = jax.tree_util.tree_map(lambda x: jnp.ones(x.shape, jnp.float32) if _is_float(x) else None, obs_example)
    return RunningStats(jnp.zeros((), jnp.float32), zeros, ones)


def update_stats(stats: RunningStats, batch: Any) -> RunningStats:
    """Merge a batch whose leaves carry any number of leading batch axes."""
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    mean_leaves = treedef.flatten_up_to(stats.mean)
    var_leaves = treedef.flatten_up_to(stats.var)
    batch_count = None
    new_mean, new_var = [], []
    for x, mean, var in zip(leaves, mean_leaves, var_leaves):
        if mean is None:
            new_mean.append(None)
            new_var.append(None)
            continue
        flat = x.reshape((-1,) + mean.shape).astype(jnp.float32)
        batch_count = jnp.asarray(flat.shape[0], jnp.float32)
        b_mean, b_var = flat.mean(0), flat.var(0)
        total = stats.count + batch_count
        delta = b_mean - mean
        new_mean.append(mean + delta * batch_count / total)
        m2 = var * stats.count + b_var * batch_count + delta**2 * stats.count * batch_count / total
        new_var.append(m2 / total)
    if batch_count is None:
        return stats
    return RunningStats(
        stats.count + batch_count,
        jax.tree_util.tree_unflatten(treedef, new_mean),
        jax.tree_util.tree_unflatten(treedef, new_var),
    )


def normalize(stats: RunningStats | None, obs: Any, clip: float = 10.0) -> Any:
    """(obs - mean) / std, clipped; identity where `stats` is None."""
    if stats is None:
        return obs
    leaves, treedef = jax.tree_util.tree_flatten(obs)
    means = treedef.flatten_up_to(stats.mean)
    variances = treedef.flatten_up_to(stats.var)
    out = [
        x if m is None else jnp.clip((x - m) / jnp.sqrt(v + 1e-8), -clip, clip)
        for x, m, v in zip(leaves, means, variances)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


# VecNormalize's constants: RunningMeanStd(epsilon=1e-4) starts its count there, and rewards are
# divided by sqrt(var + 1e-8) and clipped to +-10.
REWARD_COUNT_INIT = 1e-4
REWARD_EPSILON = 1e-8
REWARD_CLIP = 10.0


@struct.dataclass
class RewardStats:
    """Reward scaling state: each env's running discounted return and the running moments of those returns.

    Why the return and not the reward: the value targets are returns, and their scale is what the
    critic's regression and the advantages see; dividing rewards by the return's std brings it near 1
    whatever the env's reward units (SB3's VecNormalize, Engstrom et al. 2020's "reward scaling")."""

    returns: jax.Array  # [N] float32 discounted return so far in each env's current episode
    count: jax.Array
    mean: jax.Array
    var: jax.Array


def init_reward_stats(num_envs: int) -> RewardStats:
    """VecNormalize's starting point: zero returns, mean 0, var 1, count 1e-4."""
    return RewardStats(jnp.zeros((num_envs,), jnp.float32), jnp.asarray(REWARD_COUNT_INIT, jnp.float32),
                       jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32))


def scale_rewards(stats: RewardStats, rewards: jax.Array, dones: jax.Array, gamma: float,
                  clip: float = REWARD_CLIP) -> tuple[RewardStats, jax.Array]:
    """Scale a rollout's rewards [T, N] step by step as VecNormalize does, by `lax.scan` over T:

        returns = returns * gamma + reward;  merge the N returns into (count, mean, var)
        reward' = clip(reward / sqrt(var + 1e-8), -clip, clip);  returns = 0 where done

    `dones` [T, N]: the episode ended at that step (terminated or truncated). The mean is tracked
    but not subtracted (a shifted reward would change what the agent optimises). Scaling after the
    rollout gives what scaling inside each env step would: the actions never see it."""

    def step(s: RewardStats, inputs: tuple[jax.Array, jax.Array]) -> tuple[RewardStats, jax.Array]:
        reward, done = inputs
        returns = s.returns * gamma + reward
        batch_count = jnp.asarray(returns.shape[0], jnp.float32)
        total = s.count + batch_count
        delta = returns.mean() - s.mean
        mean = s.mean + delta * batch_count / total
        m2 = s.var * s.count + returns.var() * batch_count + delta**2 * s.count * batch_count / total
        var = m2 / total
        scaled = jnp.clip(reward / jnp.sqrt(var + REWARD_EPSILON), -clip, clip)
        return RewardStats(jnp.where(done, 0.0, returns), total, mean, var), scaled

    return jax.lax.scan(step, stats, (rewards.astype(jnp.float32), dones))
