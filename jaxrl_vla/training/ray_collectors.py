"""Remote collectors on Ray: `trainer.collectors: {backend: "ray", num, address, max_restarts}`.

Why: VLA simulators are CPU-bound, so one host's cores cap env steps/s. Here each
collector's host envs and an inference copy of the policy live in a Ray actor
(on any node of the cluster); the learner stays where it is. Ray is the engine:
no home-made process protocol.

    learner process                                      Ray actor c (any node)
    ---------------                                      ----------------------
    RayCollector c (a thread, as the thread Collector)   CollectorActor: envs + jitted act/value
      snap = store.snapshot()
      box  = ParamsCache.ref(snap)   ray.put once per version, shared by all collectors
      actor.collect_chunk(version, [box], counter)  ->   fetch params if version is new (ray.get)
                                                    <-   one inference + H env steps, numpy
      buffer.add(Transition(..., policy_version=version)) for each of the H steps

* The driver side subclasses `Collector`, so the trainer's buffers, staleness
  metrics, episode stats, `_check_collectors`, stop / Ctrl-C and join logic are
  the thread backend's, unchanged. The params box is passed inside a list so Ray
  does not resolve it per call: an actor fetches the object only when the
  version changes.
* Faults: a dead actor (crash, `ray.kill`, lost node) fails the pending call
  with RayActorError; with restarts left (`max_restarts`) a fresh actor replaces
  it (new envs, reset: the chunk in flight is lost, the trajectory restarts),
  else the collector's thread ends with the error, which the learner re-raises
  as CollectorError within its poll interval. `trainer.env_step_timeout` bounds
  one remote call (an inference plus H env steps).
* Actors import jaxrl_vla, jax and numpy (and the env's own modules), not torch.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import numpy as np

from jaxrl_vla.config import ConfigError
from jaxrl_vla.training.acting import act_chunk_with_info, value_where
from jaxrl_vla.training.async_trainer import Collector, PolicySnapshot, PolicyStore
from jaxrl_vla.types import Transition

BACKENDS = ("threads", "ray")
WAIT_S = 0.05  # how often a driver thread looks at its stop flag while a remote call runs
CONNECT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class RaySettings:
    num: int
    address: str | None
    max_restarts: int


def settings(collectors: dict | None, num_collectors: int, async_mode: bool) -> RaySettings | None:
    """The validated `trainer.collectors` section: None for the thread backend."""
    collectors = dict(collectors or {})
    unknown = set(collectors) - {"backend", "num", "address", "max_restarts"}
    if unknown:
        raise ConfigError(f"trainer.collectors: unknown key(s) {sorted(unknown)}; known: backend, num, address, max_restarts")
    backend = collectors.get("backend") or "threads"
    if backend not in BACKENDS:
        raise ConfigError(f"trainer.collectors.backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "threads":
        return None
    if not async_mode:
        raise ConfigError("trainer.collectors.backend 'ray' needs trainer.buffer_type 'vla' (remote collectors act "
                          "while the learner trains)")
    num = collectors.get("num")
    num = int(num_collectors if num is None else num)
    if num < 1:
        raise ConfigError(f"trainer.collectors.num must be > 0, got {num}")
    restarts = int(collectors.get("max_restarts") or 0)
    if restarts < 0:
        raise ConfigError(f"trainer.collectors.max_restarts must be >= 0, got {restarts}")
    return RaySettings(num, collectors.get("address"), restarts)


def connect(remote: RaySettings) -> Any:
    """Join the Ray cluster at `address` (or the one this process already joined, or a local one
    for a null address); an address nobody answers is a ConfigError naming the field."""
    try:
        import ray
    except ImportError as err:
        raise ConfigError("trainer.collectors.backend 'ray' needs Ray: pip install 'jaxrl_vla[ray]'") from err
    address = remote.address
    if address not in (None, "", "auto", "local"):
        host, _, port = str(address).rpartition(":")
        if address.startswith("ray://"):
            host, _, port = address[len("ray://"):].rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as err:
            raise ConfigError(f"trainer.collectors.address {address!r}: no Ray cluster reachable within "
                              f"{CONNECT_TIMEOUT_S:.0f} s ({err}); start one with `ray start --head` and give its "
                              "host:port") from err
    if ray.is_initialized():
        return ray
    try:
        if address in (None, "", "local"):
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError) as err:
        raise ConfigError(f"trainer.collectors.address {address!r}: could not join the Ray cluster: {err}") from err
    return ray


class ParamsCache:
    """One object-store copy per published version, shared by every collector."""

    def __init__(self, store: PolicyStore):
        self.store = store
        self._lock = threading.Lock()
        self._version: int | None = None
        self._ref: Any = None

    def ref(self, snap: PolicySnapshot) -> Any:
        import ray

        with self._lock:
            if self._version != snap.version:
                self._ref = ray.put(jax.device_get((snap.params, snap.obs_stats)))
                self._version = snap.version
            return self._ref


def _act(apply_fn, params, obs_stats, obs, key, counter):
    return act_chunk_with_info(apply_fn, params, obs_stats, obs, jax.random.fold_in(key, counter), False)


class CollectorActor:
    """Runs in a Ray worker: the collector's host envs and an inference copy of the policy."""

    def __init__(self, env_spec: Any, num_envs: int, seed: int, policy: Any, key: np.ndarray):
        self.env = env_spec.make(num_envs, seed)
        self.num_envs = num_envs
        self._act = jax.jit(partial(_act, policy.apply))
        self._value = jax.jit(partial(value_where, policy.apply))
        self.key = np.asarray(key)
        self.version: int | None = None
        self.params: Any = None
        self.obs: Any = None

    def _fetch(self, version: int, box: list) -> None:
        import ray

        if version != self.version:
            self.params, self.obs_stats = ray.get(box[0])
            self.version = version

    def reset(self, version: int, box: list) -> Any:
        """Reset the envs and compile inference (so the first chunk is not a compile)."""
        self._fetch(version, box)
        self.obs = self.env.reset()
        jax.block_until_ready(self._act(self.params, self.obs_stats, self.obs, self.key, np.uint32(0)))
        jax.block_until_ready(self._value(self.params, self.obs_stats, self.obs, np.zeros(self.num_envs, bool)))
        return self.obs

    def collect_chunk(self, version: int, box: list, counter: int) -> tuple:
        """One inference with `version`'s parameters, then its H actions; numpy out."""
        self._fetch(version, box)
        chunk_obs = self.obs
        out = self._act(self.params, self.obs_stats, chunk_obs, self.key, np.uint32(counter))
        actions, log_probs, values, sample_info = jax.device_get(out)
        steps = []
        for j in range(actions.shape[1]):  # host env steps: inherently one call per step
            obs, reward, terminated, truncated, info = self.env.step(actions[:, j])
            terminated, truncated = np.asarray(terminated, bool), np.asarray(truncated, bool)
            final_value = None
            if truncated.any():
                final_value = np.asarray(jax.device_get(self._value(self.params, self.obs_stats, info["final_obs"], truncated)))
            success = info.get("success")
            steps.append((obs, np.asarray(reward, np.float32), terminated, truncated, final_value,
                          None if success is None else np.asarray(success)))
            self.obs = obs
        return chunk_obs, actions, log_probs, values, sample_info, steps

    def modules(self) -> list[str]:
        """The modules this worker has imported (tests check that torch is not one)."""
        return sorted(sys.modules)

    def close(self) -> None:
        self.env.close()


class _ActorEnv:
    """What the trainer sees as the collector's env: closing it ends the actor."""

    def __init__(self, collector: "RayCollector"):
        self.collector = collector
        self.num_envs = collector.per_collector

    def close(self) -> None:
        self.collector.kill()


class RayCollector(Collector):
    """The driver side of one remote collector: a thread that asks its actor for chunks and fills
    the local buffer, so the trainer treats it as a thread Collector."""

    def __init__(self, index: int, trainer: Any, per_collector: int, env_seed: int, buffer: Any, cache: ParamsCache,
                 key: jax.Array, value_dtype: Any, max_restarts: int):
        self.per_collector = per_collector
        self.trainer = trainer
        self.env_seed = env_seed
        self.cache = cache
        self.max_restarts = max_restarts
        self.restarts = 0
        self.actor: Any = None
        super().__init__(index, _ActorEnv(self), buffer, trainer.store, None, None, key, value_dtype)

    def _spawn(self) -> None:
        import ray

        cls = ray.remote(num_cpus=1)(CollectorActor)
        self.actor = cls.remote(self.trainer.host_env, self.per_collector, self.env_seed + 7919 * self.restarts,
                                self.trainer.policy, np.asarray(jax.device_get(self.key)))

    def kill(self) -> None:
        import ray

        if self.actor is not None:
            ray.kill(self.actor)
            self.actor = None

    def _call(self, what: str, method: str, *args: Any, stop: threading.Event | None = None) -> Any:
        """A remote call, waited for in WAIT_S slices (so a stop is seen); None when stopped."""
        import ray

        ref = getattr(self.actor, method).remote(*args)
        self.busy = (what, time.monotonic())
        try:
            while not ray.wait([ref], timeout=WAIT_S)[0]:
                if stop is not None and stop.is_set():
                    return None
            return ray.get(ref)
        finally:
            self.busy = None

    def _with_restarts(self, fn: Any) -> Any:
        from ray.exceptions import RayActorError

        while True:
            try:
                return fn()
            except RayActorError as err:
                if self.restarts >= self.max_restarts:
                    raise RuntimeError(f"Ray actor of collector {self.index} died ({self.restarts} of "
                                       f"trainer.collectors.max_restarts = {self.max_restarts} restarts used): "
                                       f"{err}") from err
                self.restarts += 1
                warnings.warn(f"collector {self.index}: its Ray actor died; starting a new one (restart "
                              f"{self.restarts} of {self.max_restarts}); its envs restart from reset", RuntimeWarning,
                              stacklevel=2)
                self._spawn()
                self.obs = None
                self._return[:] = 0.0
                self._length[:] = 0
                self._reset_remote()

    def _reset_remote(self) -> None:
        snap = self.store.snapshot()
        self.obs = self._call("remote env.reset (and compile)", "reset", snap.version, [self.cache.ref(snap)])

    def reset(self) -> None:
        if self.actor is None:
            self._spawn()
        self._with_restarts(self._reset_remote)

    def collect_chunk(self, stop: threading.Event | None = None) -> int:
        snap = self.store.snapshot()
        counter = self.inferences
        out = self._with_restarts(lambda: self._call(
            "remote chunk (an inference and its env steps)", "collect_chunk", snap.version, [self.cache.ref(snap)],
            counter, stop=stop))
        if out is None or self.obs is None:
            return 0
        self.inferences += 1
        chunk_obs, actions, log_probs, values, sample_info, steps = out
        n = self.num_envs
        version = np.full(n, snap.version, np.int32)
        for j, (obs, reward, terminated, truncated, final_value, success) in enumerate(steps):
            if final_value is None:
                final_value = np.zeros(n, self.value_dtype)
            transition = Transition(
                obs=chunk_obs, action=actions[:, j], log_prob=log_probs[:, j], value=values[:, j], reward=reward,
                terminated=terminated, truncated=truncated, final_value=np.asarray(final_value, self.value_dtype),
                chunk_index=np.full(n, j, np.int32), policy_version=version, sample_info=sample_info,
            )
            self.buffer.add(transition, obs)  # waits while the learner has not taken a full buffer
            self.steps_written += 1
            self._track_episodes(reward, np.logical_or(terminated, truncated), {} if success is None else {"success": success})
            self.obs = obs
        return len(steps)
