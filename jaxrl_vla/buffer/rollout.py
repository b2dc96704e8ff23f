"""RolloutBuffer: one complete on-policy rollout [T, N, ...], used once.

Pure functions over a `RolloutState` pytree (jit them, donate the state):

    state = init(example_transition, num_steps)      # pre-allocated [T, N, ...]
    state = add(state, rollout)                      # a whole [T, N, ...] rollout
    state = add_step(state, transition)              # or one step [N, ...] at a time
    data  = get(state, flatten=True)                 # [T*N, ...] (or [T, N, ...])
    full  = is_full(state);  state = clear(state)

`RolloutBuffer` wraps them in the seed's object API (`buffer.add(rollout)`,
`buffer.get(flatten=True)`, `buffer.is_full()`, `buffer.clear()`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

PyTree = Any


@struct.dataclass
class RolloutState:
    data: PyTree  # leaves [T, N, ...]
    num_written: jax.Array  # steps written since the last clear (0..T)

    @property
    def num_steps(self) -> int:
        return jax.tree_util.tree_leaves(self.data)[0].shape[0]


def init(example_step: PyTree, num_steps: int) -> RolloutState:
    """Pre-allocate room for `num_steps` steps shaped like `example_step` ([N, ...])."""
    if num_steps < 1:
        raise ValueError(f"trainer.buffer_size must be >= 1, got {num_steps}")
    data = jax.tree_util.tree_map(lambda x: jnp.zeros((num_steps,) + x.shape, x.dtype), example_step)
    return RolloutState(data, jnp.zeros((), jnp.int32))


def _check_like(expected: PyTree, got: PyTree, what: str, leading: int) -> None:
    """Shape/dtype check at trace time, naming the offending leaf.

    `leading` axes of the stored data are not in `got` (1 for a single step).
    """
    exp_leaves = jax.tree_util.tree_leaves_with_path(expected)
    got_leaves = jax.tree_util.tree_leaves_with_path(got)
    if len(exp_leaves) != len(got_leaves):
        raise ValueError(f"{what}: expected {len(exp_leaves)} fields, got {len(got_leaves)}")
    for (path, e), (_, g) in zip(exp_leaves, got_leaves):
        name = jax.tree_util.keystr(path)
        if e.shape[leading:] != g.shape or e.dtype != g.dtype:
            raise ValueError(f"{what}: field {name} has shape {g.shape} {g.dtype}, expected {e.shape[leading:]} {e.dtype}")


def add(state: RolloutState, rollout: PyTree) -> RolloutState:
    """Store a complete rollout of exactly T steps (the buffer must be empty)."""
    _check_like(state.data, rollout, "RolloutBuffer.add", 0)
    return RolloutState(rollout, jnp.asarray(state.num_steps, jnp.int32))


def add_step(state: RolloutState, step: PyTree) -> RolloutState:
    """Write one step [N, ...] at the next free row (a no-op once full)."""
    _check_like(state.data, step, "RolloutBuffer.add_step", 1)
    # Once full, the index points past the end and mode="drop" discards the write
    # (O(1), no copy of the whole buffer as a `where` would make).
    index = state.num_written
    data = jax.tree_util.tree_map(lambda buf, x: buf.at[index].set(x, mode="drop"), state.data, step)
    return RolloutState(data, jnp.minimum(state.num_written + 1, state.num_steps))


def get(state: RolloutState, flatten: bool = True) -> PyTree:
    """The stored rollout, [T*N, ...] when `flatten`, else [T, N, ...]."""
    if not flatten:
        return state.data
    return jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:]), state.data)


def is_full(state: RolloutState) -> jax.Array:
    return state.num_written >= state.num_steps


def clear(state: RolloutState) -> RolloutState:
    """Forget the rollout; storage stays allocated for the next one."""
    return RolloutState(state.data, jnp.zeros((), jnp.int32))


class RolloutBuffer:
    """The seed's object API over the pure functions (state held on the object).

    Training code that needs speed calls the pure functions inside its own jit;
    this class is the convenient host-side handle.
    """

    def __init__(self, example_step: PyTree, num_steps: int):
        self.state = init(example_step, num_steps)
        self._add = jax.jit(add, donate_argnums=0)
        self._add_step = jax.jit(add_step, donate_argnums=0)
        self._get = jax.jit(get, static_argnames="flatten")

    def add(self, data: PyTree) -> None:
        """A complete rollout [T, N, ...], or a single step [N, ...]."""
        leaf = jax.tree_util.tree_leaves(data)[0]
        ref = jax.tree_util.tree_leaves(self.state.data)[0]
        if leaf.ndim == ref.ndim:
            self.state = self._add(self.state, data)
        else:
            self.state = self._add_step(self.state, data)

    def get(self, flatten: bool = True) -> PyTree:
        return self._get(self.state, flatten=flatten)

    def is_full(self) -> bool:
        return bool(is_full(self.state))

    def clear(self) -> None:
        self.state = clear(self.state)

    def __len__(self) -> int:
        return int(self.state.num_written)
