"""CartPole-v1 in pure JAX, step-for-step equal to gymnasium 1.4's CartPole-v1.

Why reimplement instead of wrapping gymnasium: a jitted, vmapped env lets a
whole PPO rollout run on the accelerator with no host round trips. Parity with
gymnasium matters because published CartPole numbers come from it; the tests
in tests/test_envs.py compare both step by step.

Faithful to gymnasium (read from gymnasium/envs/classic_control/cartpole.py):
  * explicit Euler integration with tau = 0.02, force +-10 N;
  * termination when |x| > 2.4 or |theta| > 12 degrees (strict inequalities);
  * reward 1.0 on every step, the terminating one included (gymnasium's default
    `sutton_barto_reward=False`; True gives 0 per step and -1 on termination);
  * reset state uniform in (-0.05, 0.05) for all four dims;
  * the `TimeLimit(500)` wrapper that `gymnasium.make` adds lives in the env:
    `truncated` is true on the 500th step, also when that step terminates
    (gymnasium reports both flags then; learners should let `terminated` win).

Differences: gymnasium keeps its state in float64, this env in float32 (JAX's
default), so long trajectories drift apart at the rounding level; stepping
after `terminated` is undefined here as in gymnasium (VecEnv resets instead).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from jaxrl_vla.envs.base import Box, Discrete, TimeStep

GRAVITY = 9.8
MASS_CART = 1.0
MASS_POLE = 0.1
TOTAL_MASS = MASS_POLE + MASS_CART
HALF_POLE_LENGTH = 0.5
POLE_MASS_LENGTH = MASS_POLE * HALF_POLE_LENGTH
FORCE_MAG = 10.0
TAU = 0.02
THETA_THRESHOLD = 12 * 2 * math.pi / 360
X_THRESHOLD = 2.4
RESET_BOUND = 0.05


@struct.dataclass
class CartPoleState:
    """Physical state plus the step count the time limit needs."""

    x: jax.Array
    x_dot: jax.Array
    theta: jax.Array
    theta_dot: jax.Array
    time: jax.Array  # int32 steps taken in the current episode


def observe(state: CartPoleState) -> jax.Array:
    """The observation is the physical state, as float32 [x, x_dot, theta, theta_dot]."""
    return jnp.stack([state.x, state.x_dot, state.theta, state.theta_dot]).astype(jnp.float32)


def euler_step(state: CartPoleState, action: jax.Array) -> CartPoleState:
    """One explicit-Euler step of the cart-pole ODE (Florian 2005), as gymnasium does.

    Positions are advanced with the *old* velocities; that is gymnasium's "euler"
    integrator, not its "semi-implicit euler" option.
    """
    force = jnp.where(action == 1, FORCE_MAG, -FORCE_MAG)
    cos_t = jnp.cos(state.theta)
    sin_t = jnp.sin(state.theta)
    temp = (force + POLE_MASS_LENGTH * jnp.square(state.theta_dot) * sin_t) / TOTAL_MASS
    theta_acc = (GRAVITY * sin_t - cos_t * temp) / (
        HALF_POLE_LENGTH * (4.0 / 3.0 - MASS_POLE * jnp.square(cos_t) / TOTAL_MASS)
    )
    x_acc = temp - POLE_MASS_LENGTH * theta_acc * cos_t / TOTAL_MASS
    return CartPoleState(
        x=state.x + TAU * state.x_dot,
        x_dot=state.x_dot + TAU * x_acc,
        theta=state.theta + TAU * state.theta_dot,
        theta_dot=state.theta_dot + TAU * theta_acc,
        time=state.time + 1,
    )


def is_terminated(state: CartPoleState) -> jax.Array:
    """The pole fell past 12 degrees or the cart left the track."""
    out_x = (state.x < -X_THRESHOLD) | (state.x > X_THRESHOLD)
    out_theta = (state.theta < -THETA_THRESHOLD) | (state.theta > THETA_THRESHOLD)
    return out_x | out_theta


class CartPole:
    """JAX-native CartPole-v1 (see module docstring for the exact semantics)."""

    def __init__(self, max_episode_steps: int = 500, sutton_barto_reward: bool = False):
        if max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        self._max_episode_steps = int(max_episode_steps)
        self.sutton_barto_reward = bool(sutton_barto_reward)

    @property
    def observation_space(self) -> Box:
        high = (X_THRESHOLD * 2, math.inf, THETA_THRESHOLD * 2, math.inf)
        return Box(low=tuple(-h for h in high), high=high, shape=(4,))

    @property
    def action_space(self) -> Discrete:
        return Discrete(2)

    @property
    def max_episode_steps(self) -> int:
        return self._max_episode_steps

    def reset(self, key: jax.Array) -> tuple[CartPoleState, jax.Array]:
        """Start an episode from a uniform(-0.05, 0.05) state; the env needs no key after this."""
        s = jax.random.uniform(key, (4,), jnp.float32, -RESET_BOUND, RESET_BOUND)
        state = CartPoleState(x=s[0], x_dot=s[1], theta=s[2], theta_dot=s[3], time=jnp.int32(0))
        return state, observe(state)

    def step(self, state: CartPoleState, action: jax.Array) -> tuple[CartPoleState, TimeStep]:
        """Push the cart left (0) or right (1) for one 0.02 s tick."""
        state = euler_step(state, jnp.asarray(action))
        terminated = is_terminated(state)
        if self.sutton_barto_reward:
            reward = jnp.where(terminated, -1.0, 0.0)
        else:
            reward = jnp.float32(1.0)
        reward = jnp.asarray(reward, jnp.float32)
        truncated = state.time >= self._max_episode_steps
        return state, TimeStep(observe(state), reward, terminated, truncated, {})
