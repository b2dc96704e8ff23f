"""Multi-device placement: one 1-D mesh over all devices, env batch sharded.

Parameters, optimiser state and scalars are replicated; every leaf of the env
state and current observation (leading axis = env) is split over the 'data'
axis. jit propagates these shardings through the rollout (GSPMD); the PPO
update's shuffled minibatches are split over the same axis explicitly
(`minibatch_sharding`), because a global shuffle's gather would otherwise
leave them replicated. So the same code runs on 1 CPU, 8 GPUs or a TPU slice.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, tree: Any, num_envs: int) -> Any:
    """Shard leaves whose leading axis is the env axis; replicate the rest."""
    if num_envs % mesh.size:
        raise ValueError(f"trainer.num_envs ({num_envs}) must be divisible by the number of devices ({mesh.size})")

    def spec(x: Any) -> NamedSharding:
        if getattr(x, "ndim", 0) >= 1 and x.shape[0] == num_envs:
            return NamedSharding(mesh, P(DATA_AXIS))
        return replicated(mesh)

    return jax.tree_util.tree_map(spec, tree)


def minibatch_sharding(mesh: Mesh, batch_size: int) -> NamedSharding | None:
    """How `ppo.update` splits its [num_minibatches, batch_size, ...] minibatches: the batch axis over
    'data' (None on one device: nothing to split)."""
    if mesh.size == 1:
        return None
    if batch_size % mesh.size:
        raise ValueError(
            f"algorithm.cfg.batch_size ({batch_size}) must be divisible by the number of devices ({mesh.size})"
        )
    return NamedSharding(mesh, P(None, DATA_AXIS))
