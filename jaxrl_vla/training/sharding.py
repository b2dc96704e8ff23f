"""Multi-device placement: a 2-D mesh ('data', 'fsdp') over all devices.

`trainer.mesh: {data: D, fsdp: F}` (default: all devices along 'data', F = 1).

  - Batches (every leaf of the env state and current observation, leading axis =
    env, and the PPO update's minibatches) are split over BOTH axes, D x F ways:
    FSDP is data parallelism whose parameters are stored sharded (ZeRO-3; openpi's
    mesh does the same), so no device ever computes another's samples.
  - Parameters and optimiser state are split along 'fsdp' by a rule per leaf
    (`fsdp_spec`: the largest axis divisible by F; leaves under MIN_SHARD_SIZE
    elements and LoRA adapters replicated). XLA all-gathers a sharded weight where
    a matmul needs it and reduce-scatters its gradient, so one device holds 1/F of
    the weights and of Adam's moments. With F = 1 (the default) everything but
    the batch is replicated, as a 1-D data mesh.

jit propagates these shardings through the rollout (GSPMD); the PPO update's
shuffled minibatches are pinned explicitly (`minibatch_sharding`), because a
global shuffle's gather would otherwise leave them replicated. The same code runs
on 1 CPU, 8 GPUs, a TPU slice or several processes (`training.distributed`),
where the mesh spans every process's devices.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
# the env / sample axis of every batch is split over the whole mesh (see the module docstring)
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
# leaves with fewer elements stay replicated under fsdp: sharding a bias or a LayerNorm scale saves
# nothing worth an all-gather per use (openpi replicates below 4 MiB; this is 64 KiB of float32)
MIN_SHARD_SIZE = 2**14
# a parameter path containing this dict key is a LoRA adapter (`models.vla.lora`: {"base": ..., "lora": ...}):
# replicated, so the few weights that train are never gathered, while the frozen base stays sharded
LORA_KEY = "lora"


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


def mesh_shape(data: int, fsdp: int, device_count: int) -> tuple[int, int]:
    """(D, F) for `trainer.mesh` on `device_count` devices; `data` 0 means all the devices fsdp leaves.

    ValueError naming the field when the product is not the device count: a mesh must
    use every device exactly once (a smaller one would silently idle the rest)."""
    for name, value, low in (("data", data, 0), ("fsdp", fsdp, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"trainer.mesh.{name} must be an integer >= {low}, got {value!r}")
    if data == 0:
        if device_count % fsdp:
            raise ValueError(f"trainer.mesh.fsdp ({fsdp}) must divide the number of devices ({device_count})")
        data = device_count // fsdp
    if data * fsdp != device_count:
        raise ValueError(f"trainer.mesh: data ({data}) x fsdp ({fsdp}) = {data * fsdp} must equal the number of "
                         f"devices ({device_count}); set trainer.mesh.data to 0 to take all that fsdp leaves")
    return data, fsdp


def make_mesh(devices: list | None = None, data: int = 0, fsdp: int = 1) -> Mesh:
    """The ('data', 'fsdp') mesh over `devices` (default: every device of every process).

    Devices are laid out process-major (jax.devices()' order), so an fsdp group, whose
    all-gathers run on every use of a weight, lies within one host where it can."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(data, fsdp, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), (DATA_AXIS, FSDP_AXIS))


def fsdp_size(mesh: Mesh) -> int:
    return int(mesh.shape.get(FSDP_AXIS, 1))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = MIN_SHARD_SIZE) -> P:
    """The rule per parameter: split its largest axis that `fsdp` divides (the later axis on a tie);
    replicate it when it is smaller than `min_size` elements, has no such axis, or fsdp is 1."""
    if fsdp <= 1 or math.prod(shape) < min_size:
        return P()
    candidates = [i for i, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda i: (shape[i], i))
    return P(*[FSDP_AXIS if i == axis else None for i in range(len(shape))])


def _is_lora(path: tuple) -> bool:
    return any(getattr(entry, "key", None) == LORA_KEY for entry in path)


def param_specs(tree: Any, fsdp: int, min_size: int = MIN_SHARD_SIZE) -> Any:
    """`fsdp_spec` of every array leaf of `tree` (parameters, or optimiser state whose moments have the
    parameters' shapes and so get the same specs); LoRA adapters (a "lora" key on the path) replicated."""

    def spec(path: tuple, leaf: Any) -> P:
        shape = tuple(getattr(leaf, "shape", ()))
        return P() if _is_lora(path) else fsdp_spec(shape, fsdp, min_size)

    return jax.tree_util.tree_map_with_path(spec, tree)


def param_shardings(mesh: Mesh, tree: Any, min_size: int = MIN_SHARD_SIZE) -> Any:
    """NamedShardings of `param_specs` on `mesh` (all replicated when its fsdp axis is 1)."""
    specs = param_specs(tree, fsdp_size(mesh), min_size)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def check_shardable(params: Any, fsdp: int, min_size: int = MIN_SHARD_SIZE) -> None:
    """ValueError naming trainer.mesh.fsdp when F > 1 splits no parameter at all: the user asked for
    sharded weights and would get replicated ones, F times the memory they planned for."""
    if fsdp <= 1:
        return
    specs = jax.tree_util.tree_leaves(param_specs(params, fsdp, min_size), is_leaf=lambda x: isinstance(x, P))
    if any(FSDP_AXIS in tuple(s) for s in specs):
        return
    shapes = sorted({tuple(x.shape) for x in jax.tree_util.tree_leaves(params)}, key=math.prod, reverse=True)[:3]
    raise ValueError(f"trainer.mesh.fsdp ({fsdp}) leaves no shardable axis: no parameter of >= {min_size} elements "
                     f"has an axis divisible by {fsdp} (largest shapes {shapes}); use a divisor of a weight's axis "
                     "or fsdp 1")


def describe_params(mesh: Mesh, params: Any, min_size: int = MIN_SHARD_SIZE) -> str:
    """'N of M parameter elements sharded F ways': what the run line says about fsdp."""
    leaves = jax.tree_util.tree_leaves(params)
    specs = jax.tree_util.tree_leaves(param_specs(params, fsdp_size(mesh), min_size), is_leaf=lambda x: isinstance(x, P))
    total = sum(math.prod(x.shape) for x in leaves)
    split = sum(math.prod(x.shape) for x, s in zip(leaves, specs) if FSDP_AXIS in tuple(s))
    return f"{split:,} of {total:,} parameter elements sharded {fsdp_size(mesh)} ways"


def batch_sharded(mesh: Mesh, tree: Any, num_envs: int) -> Any:
    """Shard leaves whose leading axis is the env axis over the whole mesh; replicate the rest."""
    if num_envs % mesh.size:
        raise ValueError(f"trainer.num_envs ({num_envs}) must be divisible by the number of devices ({mesh.size})")

    def spec(x: Any) -> NamedSharding:
        if getattr(x, "ndim", 0) >= 1 and x.shape[0] == num_envs:
            return NamedSharding(mesh, P(BATCH_AXES))
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
    the whole mesh (None on one device: nothing to split)."""
    if mesh.size == 1:
        return None
    if batch_size % mesh.size:
        raise ValueError(
            f"algorithm.cfg.batch_size ({batch_size}) must be divisible by the number of devices ({mesh.size})"
        )
    return NamedSharding(mesh, P(None, BATCH_AXES))
