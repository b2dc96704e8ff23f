"""Running observation statistics kept in the training state (as Brax does),
not inside an env wrapper, so they are checkpointed and restored with it.

Only floating-point leaves are normalised; images (uint8) and token ids pass
through untouched.
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
