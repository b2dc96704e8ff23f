"""Pendulum-v1 in pure JAX, matching gymnasium 1.4's Pendulum-v1 step for step.

The smallest continuous-control task: a quick check that the Gaussian-policy
PPO path works before spending time on robot envs. Dynamics, cost and reset
follow gymnasium/envs/classic_control/pendulum.py:
  * torque clipped to [-2, 2]; cost = angle_normalize(th)^2 + 0.1 thdot^2 + 0.001 u^2,
    evaluated on the state *before* the step; reward = -cost;
  * thdot += (3 g / (2 l) sin th + 3 / (m l^2) u) dt, clipped to [-8, 8];
    th += thdot_new dt (semi-implicit Euler), th is not wrapped;
  * reset th ~ U(-pi, pi), thdot ~ U(-1, 1);
  * never terminates; the TimeLimit(200) of `gymnasium.make` is part of the env.
State is float32 here (gymnasium uses float64), so trajectories agree to
float32 rounding, not bit for bit.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from jaxrl_vla.envs.base import Box, TimeStep

MAX_SPEED = 8.0
MAX_TORQUE = 2.0
DT = 0.05
MASS = 1.0
LENGTH = 1.0


@struct.dataclass
class PendulumState:
    """Angle (0 = upright, unwrapped), angular velocity and the episode's step count."""

    th: jax.Array
    thdot: jax.Array
    time: jax.Array  # int32


def angle_normalize(x: jax.Array) -> jax.Array:
    """Wrap an angle to [-pi, pi) so the cost sees the distance to upright."""
    return ((x + jnp.pi) % (2 * jnp.pi)) - jnp.pi


def observe(state: PendulumState) -> jax.Array:
    """[cos th, sin th, thdot]: continuous in th, unlike the raw angle."""
    return jnp.stack([jnp.cos(state.th), jnp.sin(state.th), state.thdot]).astype(jnp.float32)


def torque(action: jax.Array) -> jax.Array:
    """The scalar torque actually applied: the action's first entry, clipped like gymnasium."""
    u = jnp.asarray(action, jnp.float32).reshape(-1)[0]
    return jnp.clip(u, -MAX_TORQUE, MAX_TORQUE)


def cost(state: PendulumState, u: jax.Array) -> jax.Array:
    """Quadratic cost of being away from upright, spinning, and pushing."""
    return angle_normalize(state.th) ** 2 + 0.1 * state.thdot**2 + 0.001 * u**2


class Pendulum:
    """JAX-native Pendulum-v1 (see module docstring for the exact semantics)."""

    def __init__(self, max_episode_steps: int = 200, g: float = 10.0):
        if max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        self._max_episode_steps = int(max_episode_steps)
        self.g = float(g)

    @property
    def observation_space(self) -> Box:
        return Box(low=(-1.0, -1.0, -MAX_SPEED), high=(1.0, 1.0, MAX_SPEED), shape=(3,))

    @property
    def action_space(self) -> Box:
        return Box(low=-MAX_TORQUE, high=MAX_TORQUE, shape=(1,))

    @property
    def max_episode_steps(self) -> int:
        return self._max_episode_steps

    def reset(self, key: jax.Array) -> tuple[PendulumState, jax.Array]:
        """Start at a uniformly random angle with a small random spin."""
        k_th, k_dot = jax.random.split(key)
        th = jax.random.uniform(k_th, (), jnp.float32, -math.pi, math.pi)
        thdot = jax.random.uniform(k_dot, (), jnp.float32, -1.0, 1.0)
        state = PendulumState(th=th, thdot=thdot, time=jnp.int32(0))
        return state, observe(state)

    def step(self, state: PendulumState, action: jax.Array) -> tuple[PendulumState, TimeStep]:
        """Apply a torque for 0.05 s; reward is minus the cost of the pre-step state."""
        u = torque(action)
        reward = -cost(state, u)
        gravity_term = 3 * self.g / (2 * LENGTH) * jnp.sin(state.th)
        thdot = state.thdot + (gravity_term + 3.0 / (MASS * LENGTH**2) * u) * DT
        thdot = jnp.clip(thdot, -MAX_SPEED, MAX_SPEED)
        new_state = PendulumState(th=state.th + thdot * DT, thdot=thdot, time=state.time + 1)
        truncated = new_state.time >= self._max_episode_steps
        terminated = jnp.zeros((), bool)
        ts = TimeStep(observe(new_state), reward.astype(jnp.float32), terminated, truncated, {})
        return new_state, ts
