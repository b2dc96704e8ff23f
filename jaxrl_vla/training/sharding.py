"""Multi-device placement: one 1-D mesh over all devices, env batch sharded.

Parameters, optimiser state and scalars are replicated; every leaf of the env
state and current observation (leading axis = env) is split over the 'data'
axis. jit propagates these shardings through the rollout (GSPMD); the PPO
update's shuffled minibatches are split over the same axis explicitly
(`minibatch_sharding`), because a global shuffle's gather would otherwise
leave them replicated. So the same code runs on 1 CPU, 8 GPUs or a TPU slice.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_device_count(requested: int, num_envs: int, batch_size: int, cores: int) -> int:
    """How many JAX devices to split the host CPU into (`trainer.cpu_devices`).

    `requested` > 0 is used as given; 0 (auto) is the largest count <= `cores`
    that divides both `num_envs` and `batch_size`, the two axes the mesh
    splits, so auto never turns a valid config into an invalid one.
    """
    if requested > 0:
        return requested
    common = math.gcd(num_envs, batch_size)
    return max(d for d in range(1, max(1, cores) + 1) if common % d == 0)


def split_host_cpu(count: int) -> bool:
    """Make the CPU platform `count` JAX devices, so that the mesh (and with it the
    rollout's env batch and every PPO minibatch) spans the cores.

    Why: one XLA:CPU program per core keeps the cores busier than one program's
    intra-op threads on the small ops of a VLA's rollout and update (the VLA
    example's iteration 1.14 s -> 0.87 s on 2 cores). It only affects the CPU
    platform (GPU/TPU devices are unchanged) and only before JAX has created its
    backends; returns whether it took effect. A device count the user chose
    (JAX_NUM_CPU_DEVICES, or --xla_force_host_platform_device_count in XLA_FLAGS)
    is left alone.
    """
    if count <= 1 or jax.config.jax_num_cpu_devices != -1:
        return False
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return False
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # backends already initialised (e.g. JAX used earlier in this process)
        return False
    return True


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


def env_batch_constraint(mesh: Mesh, num_envs: int) -> Callable[[Any], Any] | None:
    """Inside jit: pin a tree of env-batched leaves (env state, observations) to `batch_sharded`,
    for programs that create their env batch themselves (evaluation resets inside jit, so
    nothing would otherwise split it and every device would run every episode). None on one
    device or when `num_envs` does not split evenly (then it stays replicated)."""
    if mesh.size == 1 or num_envs % mesh.size:
        return None
    return lambda tree: jax.lax.with_sharding_constraint(tree, batch_sharded(mesh, tree, num_envs))


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
