"""A size check before allocating: the rollout and evaluation arrays a config asks for must fit.

`trainer.num_envs: 100000000` otherwise ends, after a silent minute, in an XLA
out-of-memory traceback (or the host swapping). The estimate counts what is sure to
be allocated — one row per (step, env) of observation, action and the handful of
scalars a transition carries, kept twice (the rollout and the shuffled minibatch
copy PPO makes) — so a refusal is never a false alarm; models and activations come
on top and are not estimated.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np

# reward, done flags, value, log-prob, advantage, return: float32 each
_SCALARS_PER_TRANSITION = 7 * 4


def space_bytes(space: Any) -> int:
    """Bytes of one sample of an observation/action space (a Box, Discrete or a dict/tuple of them)."""
    if isinstance(space, dict):
        return sum(space_bytes(s) for s in space.values())
    if isinstance(space, (tuple, list)):
        return sum(space_bytes(s) for s in space)
    shape = tuple(getattr(space, "shape", ()) or ())
    dtype = getattr(space, "dtype", np.float32)
    try:
        itemsize = np.dtype(dtype).itemsize
    except TypeError:
        itemsize = 4
    return int(math.prod(shape)) * itemsize


def transition_bytes(observation_space: Any, action_space: Any) -> int:
    """Bytes of one stored transition: observation, action and the scalars beside them."""
    return space_bytes(observation_space) + space_bytes(action_space) + _SCALARS_PER_TRANSITION


def available_bytes() -> int:
    """Memory of the default device: its allocator limit on accelerators, physical RAM on the CPU."""
    device = jax.devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # the CPU backend has no memory_stats
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_arrays_fit(env: Any, trainer_cfg: dict, limit: int | None = None) -> None:
    """Raise ValueError naming the fields when the rollout or evaluation arrays exceed the device's memory.

    `trainer_cfg` is the resolved `trainer` section. Standard mode holds buffer_size steps
    of num_envs envs; vla mode a circular buffer of buffer_size transitions; evaluation
    steps num_eval_episodes envs at once, keeping each one's observation.
    """
    limit = available_bytes() if limit is None else limit
    if limit <= 0:
        return
    row = transition_bytes(env.observation_space, env.action_space)
    num_envs, buffer_size = int(trainer_cfg["num_envs"]), int(trainer_cfg["buffer_size"])
    if trainer_cfg.get("buffer_type", "standard") == "vla":
        rows, fields = max(buffer_size, num_envs), "trainer.buffer_size / trainer.num_envs"
    else:
        rows, fields = buffer_size * num_envs, "trainer.buffer_size x trainer.num_envs"
    needed = 2 * rows * row
    if needed > limit:
        raise ValueError(f"{fields}: the rollout needs about {_gib(needed)} ({rows:,} transitions of {row:,} bytes, "
                         f"twice) but the device has {_gib(limit)}; use fewer envs or steps")
    episodes = int(trainer_cfg.get("num_eval_episodes", 0))
    eval_needed = 2 * episodes * row
    if eval_needed > limit:
        raise ValueError(f"trainer.num_eval_episodes: evaluating {episodes:,} episodes at once needs about "
                         f"{_gib(eval_needed)} but the device has {_gib(limit)}; use fewer episodes")
