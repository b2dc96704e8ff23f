"""Several processes (one per host, or several per host) training one run: JAX's multi-controller runtime.

    trainer.distributed: {coordinator: "host0:1234", num_processes: 2, process_id: 0}

or the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (a config
field wins over its variable). Every process runs the same program (`python -m jaxrl_vla.train` with the
same config); `jax.distributed.initialize` joins their devices into one set, the mesh
(`training.sharding`) spans them all, and jit runs each compiled step SPMD: every process computes on
its own devices, XLA's collectives (gloo on CPU, NCCL on GPU) all-reduce the gradients and gather the
fsdp shards. So the env batch is split by process without any code of ours: each process's devices
hold and step num_envs / processes of the envs.

What differs by process: only process 0 (`is_primary`) creates the run directory, writes config.json,
metrics.jsonl and TensorBoard events and prints; the evaluation program runs on every process (it is
one SPMD program over the mesh) and process 0 reports it. Every process writes its own shards of each
orbax checkpoint into the same directory (a shared filesystem across hosts), orbax's primary host its
metadata. Launch commands: docs/scaling.md.

Why a coordinator probe before `initialize`: jax 0.10's client aborts the whole process (a C++ CHECK,
no Python exception) when the coordinator does not answer in time, so an unreachable address would be
a core dump instead of a named error; the probe turns it into a ConfigError within `timeout`.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxrl_vla.config import ConfigError

ENV_VARS = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
            "process_id": "JAX_PROCESS_ID"}
# how long the run directory's name may be when process 0 sends it to the others
MAX_RUN_DIR_BYTES = 4096


@dataclass(frozen=True)
class DistributedSpec:
    """What `initialize` needs; from `resolve_spec`."""

    coordinator: str
    num_processes: int
    process_id: int
    timeout: float

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.coordinator.rpartition(":")
        return host.strip("[]"), int(port)


def _from_env(name: str, cast: type) -> Any:
    var = ENV_VARS[name]
    text = os.environ.get(var)
    if text is None or text == "":
        return None
    try:
        return cast(text)
    except ValueError:
        raise ConfigError(f"trainer.distributed.{name}: ${var}={text!r} is not {'an integer' if cast is int else 'valid'}") from None


def resolve_spec(distributed: dict) -> DistributedSpec | None:
    """`trainer.distributed` (with the environment's defaults) -> a checked DistributedSpec, or None for
    one process. ConfigError naming the field: a coordinator that is not host:port, a process id out
    of range, a count or id without the rest."""
    coordinator = distributed.get("coordinator") or _from_env("coordinator", str)
    num = distributed.get("num_processes")
    num = _from_env("num_processes", int) if num is None else num
    pid = distributed.get("process_id")
    pid = _from_env("process_id", int) if pid is None else pid
    timeout = float(distributed.get("timeout", 60))
    if coordinator is None:
        if (num or 1) > 1 or pid not in (None, 0):
            raise ConfigError("trainer.distributed.coordinator: required (host:port of process 0) when "
                              f"num_processes ({num}) > 1 or process_id ({pid}) is set")
        return None
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"trainer.distributed.coordinator: {coordinator!r} must be host:port (e.g. 10.0.0.1:1234)")
    if num is None:
        raise ConfigError("trainer.distributed.num_processes: required with a coordinator (or $JAX_NUM_PROCESSES)")
    if num < 1:
        raise ConfigError(f"trainer.distributed.num_processes: {num} must be >= 1")
    if pid is None:
        raise ConfigError("trainer.distributed.process_id: required with a coordinator (or $JAX_PROCESS_ID)")
    if not 0 <= pid < num:
        raise ConfigError(f"trainer.distributed.process_id: {pid} is out of range; must be in [0, {num}) "
                          f"for num_processes {num}")
    if timeout <= 0:
        raise ConfigError(f"trainer.distributed.timeout: {timeout} must be > 0")
    return DistributedSpec(coordinator, int(num), int(pid), timeout)


def wait_for_coordinator(spec: DistributedSpec) -> None:
    """Until `spec.timeout`: retry a TCP connection to the coordinator (process 0 may start later);
    ConfigError naming the field if it never answers. Process 0 hosts the service, so it skips this."""
    host, port = spec.host_port
    deadline = time.monotonic() + spec.timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, spec.timeout)):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise ConfigError(f"trainer.distributed.coordinator: {spec.coordinator} cannot be reached within "
                                  f"trainer.distributed.timeout ({spec.timeout:g} s): {err.strerror or err}; is "
                                  "process 0 running, and the address and port right?") from None
            time.sleep(0.2)


def initialize(distributed: dict) -> DistributedSpec | None:
    """Join the run's processes (`jax.distributed.initialize`) before JAX creates its backends; no-op
    for one process. On CPU the cross-process collectives are gloo's (XLA:CPU has no others)."""
    spec = resolve_spec(distributed)
    if spec is None:
        return None
    import jax

    if spec.process_id != 0:
        wait_for_coordinator(spec)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(spec.coordinator, num_processes=spec.num_processes, process_id=spec.process_id,
                               initialization_timeout=max(1, int(round(spec.timeout))))
    return spec


def is_primary() -> bool:
    """Whether this process logs, writes metrics and the run's config (process 0; True with one process)."""
    import jax

    return jax.process_index() == 0


def agree_on_run_dir(run_dir: Path | None) -> Path:
    """Process 0's run directory, on every process (each creating its own would name a different
    timestamp): process 0 passes the one it made, the others anything (None); one broadcast."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        assert run_dir is not None
        return Path(run_dir)
    from jax.experimental import multihost_utils

    buffer = np.zeros(MAX_RUN_DIR_BYTES, np.uint8)
    if is_primary():
        encoded = str(Path(run_dir).absolute()).encode()
        if len(encoded) > MAX_RUN_DIR_BYTES:
            raise ValueError(f"trainer.output_dir: the run directory's path is longer than {MAX_RUN_DIR_BYTES} bytes")
        buffer[: len(encoded)] = np.frombuffer(encoded, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return Path(bytes(received[received != 0]).decode())


class _SilentConsole:
    def print(self, *args: Any, **kwargs: Any) -> None:
        pass


class SilentLogger:
    """The logger of processes other than 0: the same calls as `RunLogger`, nothing written or printed."""

    console = _SilentConsole()

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- host collectors on several processes
# (vla mode, host envs: `async_trainer.AsyncTrainer`): every process steps its own share of the envs on the host
# and acts with a process-local copy of the params; the learner's update is one SPMD program over the global mesh.


def gather_rows(values: Any) -> Any:
    """Every process's `values` (a short vector; float32), stacked into [process_count, k] on every process.

    One tiny collective that every process must reach: the async trainer's once-per-iteration agreement
    (stop / failure flags and the episode sums, so all stop at the same iteration and process 0 logs the
    global numbers)."""
    import numpy as np
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(values, np.float32)))


_GATHERS: dict = {}


def local_copy(tree: Any, mesh: Any) -> Any:
    """A process-local copy of the global arrays `tree`, each leaf whole on this process's first device:
    what host code that runs jitted functions in one process only (the collectors' inference, evaluation)
    can read without a collective.

    Fully replicated leaves give their addressable shard (no copy). If any leaf is sharded (fsdp), the
    tree is first gathered to replicated by one jitted identity; that is a collective, so every process
    must call this at the same point of the program (the trainer publishes on every process after each
    update)."""
    import jax

    leaves = [x for x in jax.tree_util.tree_leaves(tree) if isinstance(x, jax.Array)]
    if any(not x.is_fully_replicated for x in leaves):
        from jaxrl_vla.training import sharding

        gather = _GATHERS.get(id(mesh))
        if gather is None:
            gather = _GATHERS[id(mesh)] = jax.jit(lambda t: t, out_shardings=sharding.replicated(mesh))
        tree = gather(tree)
    return jax.tree_util.tree_map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)


def global_env_batch(mesh: Any, tree: Any, env_axis: int, num_envs: int) -> Any:
    """This process's rows of an env-batched tree (numpy, `num_envs / process_count` envs along `env_axis`:
    1 for [T, N, ...] rollouts, 0 for [N, ...] observations) -> global arrays of `num_envs` envs, the env axis
    split over the whole mesh as `sharding.batch_sharded` splits it. On the process-major mesh process p's
    rows become envs [p * n, (p + 1) * n): the order one process with all the collectors concatenates."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxrl_vla.training import sharding

    placed = NamedSharding(mesh, PartitionSpec(*([None] * env_axis), sharding.BATCH_AXES))

    def put(x: Any) -> Any:
        x = np.asarray(x)
        shape = x.shape[:env_axis] + (num_envs,) + x.shape[env_axis + 1:]
        return jax.make_array_from_process_local_data(placed, x, shape)

    return jax.tree_util.tree_map(put, tree)
