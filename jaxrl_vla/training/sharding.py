"""Multi-device placement: one 1-D mesh over all devices, env batch sharded.

Parameters, optimiser state and scalars are replicated; every leaf of the env
state and current observation (leading axis = env) is split over the 'data'
axis. jit propagates these shardings through the rollout and the update (GSPMD),
so the same code runs on 1 CPU, 8 GPUs or a TPU slice.
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
