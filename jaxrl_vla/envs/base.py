"""The environment interface every JAX-native env implements.

An env is a plain Python object holding only static configuration; all changing
state lives in an explicit pytree that `reset` returns and `step` threads
through. Both functions are pure, so they jit, vmap and scan.

    state, obs = env.reset(key)
    state, ts  = env.step(state, action)     # ts: TimeStep

A single env is written for one instance (no batch axis). `VecEnv` in
`jaxrl_vla.envs.wrappers` vmaps it over N copies, auto-resets finished episodes
and keeps the final observation for truncation bootstrapping.

Stochastic envs keep their own PRNG key inside their state: `step` takes no key,
which keeps the interface identical for deterministic and stochastic envs.

Resetting to a given state (GRPO's groups of rollouts from one start): a
JAX-native env's `reset` is a pure function of its key, so equal keys give
equal initial states; `grpo.GroupVecEnv` gives every env of a group its group's
key. A host env (`jaxrl_vla.envs.host`) says it can by `seeded_reset = True`:
`reset(seed=s)` then reproduces the same initial states for the same s. An env
whose reset is not a function of its key or seed (it reads outside state) sets
`seeded_reset = False`; `supports_seeded_reset` reads the attribute, and GRPO
with such an env is a config error.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import struct

PyTree = Any

# Observation keys that start with this hold privileged simulator state (e.g. where the instructed
# object is): training-only labels for auxiliary losses (`policy.auxiliary_target`), never a policy
# input. Policies that consume every leaf of an observation drop them (`policy_inputs`); a deployed
# robot has no such key, so a policy that read one could not run there.
PRIVILEGED_PREFIX = "privileged_"


def supports_seeded_reset(env: Any) -> bool:
    """Whether `env` can reset to a given state (module docstring): its `seeded_reset` attribute,
    by default True for JAX-native envs (pure resets) and False for host envs."""
    return bool(getattr(env, "seeded_reset", not getattr(env, "is_host_env", False)))


def policy_inputs(obs: PyTree) -> PyTree:
    """`obs` without its privileged keys (dict observations; anything else is returned as is)."""
    if isinstance(obs, dict):
        return {k: v for k, v in obs.items() if not (isinstance(k, str) and k.startswith(PRIVILEGED_PREFIX))}
    return obs


@struct.dataclass
class Discrete:
    """A finite action set {0, ..., n-1}."""

    n: int = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return ()

    @property
    def dtype(self) -> Any:
        return jnp.int32

    def sample(self, key: jax.Array) -> jax.Array:
        return jax.random.randint(key, (), 0, self.n, dtype=jnp.int32)


@struct.dataclass
class Box:
    """A box of real (or integer) values; bounds are Python floats or tuples."""

    low: Any = struct.field(pytree_node=False)
    high: Any = struct.field(pytree_node=False)
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    dtype: Any = struct.field(pytree_node=False, default=jnp.float32)

    def sample(self, key: jax.Array) -> jax.Array:
        low = jnp.broadcast_to(jnp.asarray(self.low, jnp.float32), self.shape)
        high = jnp.broadcast_to(jnp.asarray(self.high, jnp.float32), self.shape)
        return jax.random.uniform(key, self.shape, minval=low, maxval=high).astype(self.dtype)


@struct.dataclass
class TimeStep:
    """What one `step` returns besides the new state.

    `terminated` (a true end of the MDP: no bootstrapping) and `truncated` (a time
    limit or other cut: bootstrap from the value of the final observation) are
    kept apart on purpose. `info` is a flat dict of arrays; envs that know about
    task success put a boolean under "success".
    """

    obs: PyTree
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    info: dict[str, Any]


@runtime_checkable
class Env(Protocol):
    """The single-instance env protocol (see module docstring)."""

    @property
    def observation_space(self) -> Any: ...

    @property
    def action_space(self) -> Discrete | Box: ...

    @property
    def max_episode_steps(self) -> int: ...

    def reset(self, key: jax.Array) -> tuple[PyTree, PyTree]: ...

    def step(self, state: PyTree, action: jax.Array) -> tuple[PyTree, TimeStep]: ...
