"""The VLA-mode circular buffer: pure functions over a `CircularState`, plus `VLABuffer`.

    state = init(example_step, num_steps, example_obs)  # pre-allocated [T, N, ...]
    state = add(state, step, next_obs)                   # one step of N envs (jit, donate)
    state = add_batch(state, steps, next_obs)            # K steps [K, N, ...] at once
    data  = get(state, flatten=True)                     # oldest first, [T*N, ...]
    data, next_obs = snapshot(state)                     # fresh copies for a reader
    adv, ret = gae(state, last_value, gamma, lam)        # per env, across the wrap point
    full  = is_full(state);  state = clear(state)

Layout. The ring holds T = capacity / N steps of N envs as [T, N, ...]: each env
owns a column, so trajectories of different envs can never mix (the seed kept a
flat [capacity] ring and its GAE ran one env's steps into another's). A write
goes to row `write_index`; once the ring is full it overwrites the oldest row,
which is exactly the seed's example (capacity 4, N = 1):

    [T0,_,_,_] [T0,T1,_,_] [T0,T1,T2,_] [T0,T1,T2,T3] [T4,T1,T2,T3] [T4,T5,T2,T3]

Rows are addressed chronologically by `ring_order`: row k of the unrolled ring
(k = 0 oldest) is slot (write_index - count + k) mod T. `get` gathers in that
order, so a consumer never sees the wrap point. Shapes are static under jit, so
the pure `get` always returns T rows with the `count` valid ones first; the
`VLABuffer` object, which knows `count` on the host, returns only those.

The observation that FOLLOWS the newest step is kept in the state (`next_obs`):
GAE's last step bootstraps from V(next_obs), which no stored row contains.

`clear` forgets the contents (count = 0) but keeps `write_index`, so a writer
that continues after a consumer took the data needs no coordination beyond the
lock around the state.

`VLABuffer` is the seed's object API on top, safe for one writer thread and one
reader thread: every read and write of the state happens under one condition
lock; the jitted functions return new arrays, so what a reader got is never
changed by a later donated `add`. With `overwrite=False` (what the async
trainer uses) a full buffer makes `add` wait until the reader takes the data, so
an unconsumed rollout is never silently overwritten (the seed's defect).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxrl_vla.algo import ppo
from jaxrl_vla.types import Transition

PyTree = Any


@struct.dataclass
class CircularState:
    """The ring: data [T, N, ...], the observation after the newest step, two counters."""

    data: PyTree  # leaves [T, N, ...]
    next_obs: PyTree  # leaves [N, ...]: observation following the newest step (None if not tracked)
    write_index: jax.Array  # int32 slot the next add writes
    count: jax.Array  # int32 valid steps, 0..T

    @property
    def num_steps(self) -> int:
        return jax.tree_util.tree_leaves(self.data)[0].shape[0]

    @property
    def num_envs(self) -> int:
        return jax.tree_util.tree_leaves(self.data)[0].shape[1]


def steps_for_capacity(capacity: int, num_envs: int) -> int:
    """T = capacity / N, or a clear error naming the config fields when N does not divide it."""
    if capacity < num_envs or capacity % num_envs:
        raise ValueError(
            f"trainer.buffer_size ({capacity}) must be a positive multiple of trainer.num_envs "
            f"({num_envs}) in vla mode: the circular buffer is laid out [buffer_size / num_envs, num_envs]"
        )
    return capacity // num_envs


def init(example_step: PyTree, num_steps: int, example_obs: PyTree = None) -> CircularState:
    """Pre-allocate T = `num_steps` rows shaped like `example_step` (leaves [N, ...]).

    `example_obs` ([N, ...]) allocates the `next_obs` slot; leave it None when no
    GAE over the ring is needed.
    """
    if num_steps < 1:
        raise ValueError(f"circular buffer needs at least one step per env, got {num_steps}")
    data = jax.tree_util.tree_map(lambda x: jnp.zeros((num_steps,) + x.shape, x.dtype), example_step)
    next_obs = None if example_obs is None else jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), example_obs)
    # two distinct arrays: a donated state must not hold one buffer twice
    return CircularState(data, next_obs, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def _check_fields(expected: PyTree, got: PyTree, what: str, drop_expected: int, drop_got: int) -> None:
    """Trace-time shape/dtype check naming the offending field, e.g. `.reward`.

    Compares `expected` leaves without their first `drop_expected` axes with
    `got` leaves without their first `drop_got` axes.
    """
    expected_leaves = jax.tree_util.tree_leaves_with_path(expected)
    got_leaves, got_def = jax.tree_util.tree_flatten_with_path(got)
    if jax.tree_util.tree_structure(expected) != got_def:
        raise ValueError(f"{what}: expected a pytree like {jax.tree_util.tree_structure(expected)}, got {got_def}")
    for (path, e), (_, g) in zip(expected_leaves, got_leaves):
        g_shape, g_dtype = jnp.shape(g), jnp.result_type(g)
        if tuple(e.shape[drop_expected:]) != tuple(g_shape[drop_got:]) or e.dtype != g_dtype:
            raise ValueError(
                f"{what}: field {jax.tree_util.keystr(path)} has shape {tuple(g_shape)} {g_dtype}, expected "
                f"{'[K] + ' if drop_got else ''}{tuple(e.shape[drop_expected:])} {e.dtype}"
            )


def _check_next_obs(state: CircularState, next_obs: PyTree, what: str) -> None:
    if state.next_obs is None:
        if next_obs is not None:
            raise ValueError(f"{what}: next_obs given, but the buffer was made without example_obs")
        return
    if next_obs is None:
        raise ValueError(f"{what}: next_obs (the observation after this step) is required by this buffer")
    _check_fields(state.next_obs, next_obs, f"{what} next_obs", 0, 0)


def add(state: CircularState, step: PyTree, next_obs: PyTree = None) -> CircularState:
    """Write one step [N, ...] at `write_index`, overwriting the oldest row when full.

    O(one row): a dynamic-index update that, jitted with the state donated,
    happens in place.
    """
    _check_fields(state.data, step, "VLABuffer.add", 1, 0)
    _check_next_obs(state, next_obs, "VLABuffer.add")
    index = state.write_index
    data = jax.tree_util.tree_map(lambda buf, x: buf.at[index].set(x), state.data, step)
    return CircularState(
        data=data,
        next_obs=next_obs if state.next_obs is not None else None,
        write_index=(index + 1) % state.num_steps,
        count=jnp.minimum(state.count + 1, state.num_steps),
    )


def add_batch(state: CircularState, steps: PyTree, next_obs: PyTree = None) -> CircularState:
    """Write K time-ordered steps [K, N, ...]; the result equals K calls of `add`.

    When K > T only the last T steps can survive, so only they are written
    (a scatter with repeated indices would leave the winner unspecified).
    """
    _check_fields(state.data, steps, "VLABuffer.add_batch", 1, 1)
    _check_next_obs(state, next_obs, "VLABuffer.add_batch")
    num_new = jax.tree_util.tree_leaves(steps)[0].shape[0]
    kept = min(num_new, state.num_steps)
    skipped = num_new - kept
    rows = (state.write_index + skipped + jnp.arange(kept)) % state.num_steps
    data = jax.tree_util.tree_map(lambda buf, x: buf.at[rows].set(x[skipped:]), state.data, steps)
    return CircularState(
        data=data,
        next_obs=next_obs if state.next_obs is not None else None,
        write_index=(state.write_index + num_new) % state.num_steps,
        count=jnp.minimum(state.count + num_new, state.num_steps),
    )


def ring_order(state: CircularState) -> jax.Array:
    """Slots in chronological order: entry k (0 = oldest) is slot (write_index - count + k) mod T.

    Entries k >= count point at unfilled (or stale) rows.
    """
    return (state.write_index - state.count + jnp.arange(state.num_steps)) % state.num_steps


def unroll(state: CircularState, x: jax.Array) -> jax.Array:
    """Reorder any [T, ...] array laid out like the ring's slots oldest-first."""
    return jnp.take(x, ring_order(state), axis=0)


def get(state: CircularState, flatten: bool = True) -> PyTree:
    """The ring unrolled oldest first: [T*N, ...] when `flatten`, else [T, N, ...].

    Always T rows (static shapes); the first `count` are the stored steps.
    """
    data = jax.tree_util.tree_map(lambda x: unroll(state, x), state.data)
    if not flatten:
        return data
    return jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:]), data)


def snapshot(state: CircularState) -> tuple[PyTree, PyTree]:
    """(rows oldest first [T, N, ...], next_obs) as fresh arrays: nothing shares memory
    with the state, so a later donated `add` cannot delete what a reader holds."""
    return get(state, flatten=False), jax.tree_util.tree_map(jnp.copy, state.next_obs)


def is_full(state: CircularState) -> jax.Array:
    return state.count >= state.num_steps


def clear(state: CircularState) -> CircularState:
    """Forget the contents (storage and write position stay)."""
    return state.replace(count=jnp.zeros((), jnp.int32))  # a fresh array, never shared


def gae(
    state: CircularState, last_value: jax.Array, gamma: float | jax.Array, gae_lambda: float | jax.Array
) -> tuple[jax.Array, jax.Array]:
    """GAE per env over the ring's stored steps; (advantages, returns) [T, N] aligned with
    `get(state, flatten=False)` (oldest first; rows >= count are 0).

    The ring must hold `Transition`s. The successor of row k is row k+1 of the
    unrolled ring, which is how an episode that spans the wrap point stays
    whole; the newest stored step bootstraps from `last_value` = V(next_obs)
    (and a truncated step from its own `final_value`). Terminated/truncated and
    the per-env columns are handled by `ppo.compute_gae`, shared with standard mode.
    """
    data: Transition = get(state, flatten=False)
    steps = jnp.arange(state.num_steps)[:, None]
    valid = steps < state.count
    newest = steps == state.count - 1
    following = jnp.concatenate([data.value[1:], jnp.zeros_like(data.value[:1])], axis=0)
    next_values = jnp.where(newest, last_value[None].astype(data.value.dtype), following)
    next_values = jnp.where(data.truncated, data.final_value, next_values)
    # unfilled rows contribute nothing and pass nothing back (advantage 0)
    zero = jnp.zeros_like(data.value)
    rewards = jnp.where(valid, data.reward.astype(data.value.dtype), zero)
    values = jnp.where(valid, data.value, zero)
    next_values = jnp.where(valid, next_values, zero)
    terminated = jnp.where(valid, data.terminated, False)
    dones = jnp.where(valid, jnp.logical_or(data.terminated, data.truncated), True)
    advantages, returns = ppo.compute_gae(rewards, values, next_values, terminated, dones, gamma, gae_lambda)
    return advantages, jnp.where(valid, returns, zero)


# --------------------------------------------------------------------------- object API


class BufferClosed(RuntimeError):
    """Raised in a thread waiting on a VLABuffer that was closed (the run is stopping)."""


def _leading_ndim(tree: PyTree) -> int:
    return jax.tree_util.tree_leaves(tree)[0].ndim


class VLABuffer:
    """The seed's circular buffer object, safe for one writer and one reader thread.

        buffer = VLABuffer(example_step, capacity=2048, example_obs=obs)   # N from example_step
        buffer.add(transition, next_obs)      # one step [N, ...] (or K steps [K, N, ...])
        data = buffer.get(flatten=True)       # stored steps, oldest first
        if buffer.is_full(): ...
        data, next_obs = buffer.take()        # get + clear in one atomic hand-off

    `capacity` counts transitions (the seed's `buffer_size` in vla mode) and must
    be a multiple of N. `overwrite=True` is the seed's behaviour (the oldest row
    is replaced); `overwrite=False` makes a writer wait while the buffer is full
    and untaken, so no transition is lost. `close()` wakes every waiter with
    `BufferClosed`.
    """

    def __init__(self, example_step: PyTree, capacity: int, example_obs: PyTree = None, overwrite: bool = True):
        num_envs = jax.tree_util.tree_leaves(example_step)[0].shape[0]
        self.num_steps = steps_for_capacity(int(capacity), num_envs)
        self.num_envs = num_envs
        self.overwrite = overwrite
        self.state = init(example_step, self.num_steps, example_obs)
        self._step_ndim = _leading_ndim(example_step)
        self._count = 0  # host mirror of state.count: is_full/len never wait for the device
        self._closed = False
        self._cond = threading.Condition()
        self._add = jax.jit(add, donate_argnums=0)
        self._add_batch = jax.jit(add_batch, donate_argnums=0)
        self._get = jax.jit(get, static_argnames="flatten")
        self._snapshot = jax.jit(snapshot)
        self._gae = jax.jit(gae)

    @property
    def capacity(self) -> int:
        return self.num_steps * self.num_envs

    # ------------------------------------------------------------------ writer

    def add(self, data: PyTree, next_obs: PyTree = None, timeout: float | None = None) -> None:
        """Append one step [N, ...] or K steps [K, N, ...].

        Without overwrite, waits while the buffer is full (up to `timeout`
        seconds in all, then TimeoutError) and raises BufferClosed once closed.
        K steps that do not fit the room left are written in pieces: what fits,
        then (the buffer now full, a reader's `take` can have it) the rest as
        room appears. Waiting for room for all K at once would deadlock with a
        `take` that waits for a full buffer. Steps written before a timeout or
        a close stay written.
        """
        single = _leading_ndim(data) == self._step_ndim
        num_new = 1 if single else jax.tree_util.tree_leaves(data)[0].shape[0]
        if self.overwrite or single:
            with self._cond:
                if not self.overwrite:
                    self._wait_for(lambda: self._count < self.num_steps, timeout, "room in the buffer")
                if self._closed:
                    raise BufferClosed("VLABuffer is closed")
                self.state = self._add(self.state, data, next_obs) if single else self._add_batch(self.state, data, next_obs)
                self._count = min(self._count + num_new, self.num_steps)
                self._cond.notify_all()
            return
        self._add_in_pieces(data, num_new, next_obs, timeout)

    def _add_in_pieces(self, data: PyTree, num_new: int, next_obs: PyTree, timeout: float | None) -> None:
        """Without overwrite: K rows written as room appears, each piece as large as the room left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        start, ends = 0, None
        with self._cond:
            while start < num_new:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                self._wait_for(lambda: self._count < self.num_steps, left, "room in the buffer")
                if ends is None:  # the pieces' ends are known now: a full buffer is only ever emptied whole
                    first = self.num_steps - self._count
                    ends = list(range(first, num_new, self.num_steps)) + [num_new]
                    # the observation after each piece, all checked before the first row is written
                    nexts = [self._obs_after(data, end) for end in ends[:-1]] + [next_obs]
                end = min(num_new, start + self.num_steps - self._count)
                piece = jax.tree_util.tree_map(lambda x, a=start, b=end: x[a:b], data)
                following = nexts[ends.index(end)] if end in ends else self._obs_after(data, end)
                self.state = self._add_batch(self.state, piece, following)
                self._count += end - start
                start = end
                self._cond.notify_all()

    def _obs_after(self, data: PyTree, row: int) -> PyTree:
        """The observation after row `row - 1` of K steps: row `row`'s own `obs` (None if the buffer keeps no
        next_obs). For rows inside an action chunk `obs` is the chunk's first observation, not that step's, so
        such a split is refused rather than stored with the wrong next_obs."""
        if self.state.next_obs is None:
            return None
        obs = data.get("obs") if isinstance(data, dict) else getattr(data, "obs", None)
        chunk_index = data.get("chunk_index") if isinstance(data, dict) else getattr(data, "chunk_index", None)
        if obs is None or (chunk_index is not None and bool(jnp.any(jnp.asarray(chunk_index)[row] != 0))):
            raise ValueError(
                f"VLABuffer.add: the {jax.tree_util.tree_leaves(data)[0].shape[0]} steps do not fit the room left "
                f"and the observation after step {row - 1} is unknown (it is not step {row}'s obs: "
                + ("the steps have no obs field)" if obs is None else f"step {row} is inside an action chunk)")
                + "; add fewer steps at a time"
            )
        return jax.tree_util.tree_map(lambda x: x[row], obs)

    # ------------------------------------------------------------------ reader

    def get(self, flatten: bool = True) -> PyTree:
        """The stored steps oldest first: [count*N, ...] when `flatten`, else [count, N, ...]."""
        with self._cond:
            data, count = self._get(self.state, flatten=False), self._count
        return self._trim(data, count, flatten)

    def take(self, flatten: bool = False, timeout: float | None = None) -> tuple[PyTree, PyTree]:
        """Wait until full, then (data, next_obs) and clear, atomically: the hand-off
        that lets the writer go on while the reader trains on what it took."""
        with self._cond:
            self._wait_for(lambda: self._count >= self.num_steps, timeout, "a full buffer")
            (data, next_obs), count = self._snapshot(self.state), self._count
            self.state = clear(self.state)
            self._count = 0
            self._cond.notify_all()
        return self._trim(data, count, flatten), next_obs

    def wait_full(self, timeout: float) -> bool:
        """True once full; False after `timeout` seconds (lets callers poll for faults)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._closed or self._count >= self.num_steps, timeout) and not self._closed

    def gae(self, last_value: jax.Array, gamma: float, gae_lambda: float) -> tuple[jax.Array, jax.Array]:
        """`gae` over the stored steps: (advantages, returns) [count, N], oldest first."""
        with self._cond:
            state, count = self.state, self._count
            advantages, returns = self._gae(state, last_value, gamma, gae_lambda)
        return advantages[:count], returns[:count]

    def is_full(self) -> bool:
        return self._count >= self.num_steps

    def clear(self) -> None:
        with self._cond:
            self.state = clear(self.state)
            self._count = 0
            self._cond.notify_all()

    def close(self) -> None:
        """Wake every waiting thread with BufferClosed (used on stop)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        """Transitions stored (steps x N)."""
        return self._count * self.num_envs

    # ------------------------------------------------------------------ helpers

    def _wait_for(self, predicate, timeout: float | None, what: str) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not predicate():
            if self._closed:
                raise BufferClosed("VLABuffer is closed")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"VLABuffer: waited {timeout} s for {what}")
            self._cond.wait(remaining)
        if self._closed:
            raise BufferClosed("VLABuffer is closed")

    def _trim(self, data: PyTree, count: int, flatten: bool) -> PyTree:
        if count < self.num_steps:
            data = jax.tree_util.tree_map(lambda x: x[:count], data)
        if not flatten:
            return data
        return jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:]), data)
