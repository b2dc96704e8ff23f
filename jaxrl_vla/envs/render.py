"""Pictures of the JAX classic-control envs, drawn from their state: CartPole-v1 and Pendulum-v1.

Why here and not in gymnasium: the JAX envs have no pygame window, and a video
of a trained policy (`python -m jaxrl_vla.eval --video`) needs frames. These
draw the same scene as gymnasium's renderers (its geometry and colours, at a
smaller size) straight from a batch of env states, as pure jnp functions over
a pixel grid: one jitted, vmapped program draws every frame of an episode.

    frames = render_cartpole(states)   # states [..., ] -> uint8 [..., H, W, 3]
    renderer = renderer_for(env)       # a Renderer, or None when the env cannot be drawn
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_vla.envs import cartpole, pendulum

WHITE = (255, 255, 255)

# CartPole: gymnasium's 600 x 400 scene at 0.4 scale (its sizes in pixels x 0.4)
CARTPOLE_HEIGHT, CARTPOLE_WIDTH = 160, 240
CARTPOLE_SCALE = CARTPOLE_WIDTH / (2 * cartpole.X_THRESHOLD)  # pixels per metre: the track fills the width
CART_HALF_WIDTH, CART_HALF_HEIGHT = 10.0, 6.0
CART_Y = CARTPOLE_HEIGHT - 40.0  # the track's row (gymnasium: 100 px above the bottom)
AXLE_OFFSET = CART_HALF_HEIGHT / 2  # the pole's pivot sits a quarter of the cart's height above its centre
POLE_LENGTH = 2 * cartpole.HALF_POLE_LENGTH * CARTPOLE_SCALE
POLE_HALF_WIDTH = 2.0
CART_RGB, POLE_RGB, AXLE_RGB, TRACK_RGB = (0, 0, 0), (202, 152, 101), (129, 132, 203), (0, 0, 0)

# Pendulum: gymnasium's scene (the view spans +-2.2 m), 160 x 160
PENDULUM_SIZE = 160
PENDULUM_SCALE = PENDULUM_SIZE / 4.4
ROD_LENGTH = pendulum.LENGTH * PENDULUM_SCALE
ROD_HALF_WIDTH = 0.1 * PENDULUM_SCALE
AXLE_RADIUS = max(0.05 * PENDULUM_SCALE, 2.0)
ROD_RGB, PENDULUM_AXLE_RGB = (204, 77, 77), (0, 0, 0)


def pixel_grid(height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """(x [H, W], y [H, W]) of the pixel centres, y growing downwards as in an image."""
    y, x = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) + 0.5, jnp.arange(width, dtype=jnp.float32) + 0.5,
                        indexing="ij")
    return x, y


def segment_distance(x: jax.Array, y: jax.Array, start: tuple[jax.Array, jax.Array],
                     direction: tuple[jax.Array, jax.Array], length: float) -> jax.Array:
    """Distance of every pixel to the segment start + t * direction, t in [0, length] (`direction` a unit vector):
    a rod of half-width w is `distance <= w`, with round ends."""
    dx, dy = x - start[0], y - start[1]
    t = jnp.clip(dx * direction[0] + dy * direction[1], 0.0, length)
    return jnp.hypot(dx - t * direction[0], dy - t * direction[1])


def paint(image: jax.Array, mask: jax.Array, rgb: tuple[int, int, int]) -> jax.Array:
    """`image` with the pixels of `mask` set to `rgb` (painter's order: later calls on top)."""
    return jnp.where(mask[..., None], jnp.asarray(rgb, jnp.uint8), image)


def cartpole_frame(x_pos: jax.Array, theta: jax.Array) -> jax.Array:
    """uint8 [H, W, 3]: the track, the cart at `x_pos` and the pole leaning by `theta` (right for theta > 0)."""
    x, y = pixel_grid(CARTPOLE_HEIGHT, CARTPOLE_WIDTH)
    cart_x = x_pos * CARTPOLE_SCALE + CARTPOLE_WIDTH / 2
    image = jnp.full((CARTPOLE_HEIGHT, CARTPOLE_WIDTH, 3), jnp.asarray(WHITE, jnp.uint8))
    image = paint(image, jnp.abs(y - CART_Y) <= 0.5, TRACK_RGB)
    image = paint(image, (jnp.abs(x - cart_x) <= CART_HALF_WIDTH) & (jnp.abs(y - CART_Y) <= CART_HALF_HEIGHT), CART_RGB)
    axle = (cart_x, jnp.float32(CART_Y - AXLE_OFFSET))
    pole = segment_distance(x, y, axle, (jnp.sin(theta), -jnp.cos(theta)), POLE_LENGTH)
    image = paint(image, pole <= POLE_HALF_WIDTH, POLE_RGB)
    return paint(image, jnp.hypot(x - axle[0], y - axle[1]) <= POLE_HALF_WIDTH, AXLE_RGB)


def pendulum_frame(th: jax.Array) -> jax.Array:
    """uint8 [S, S, 3]: the rod from the centre at angle `th` (0 upright, counter-clockwise for th > 0, as
    gymnasium draws it) and its axle."""
    x, y = pixel_grid(PENDULUM_SIZE, PENDULUM_SIZE)
    centre = (jnp.float32(PENDULUM_SIZE / 2), jnp.float32(PENDULUM_SIZE / 2))
    image = jnp.full((PENDULUM_SIZE, PENDULUM_SIZE, 3), jnp.asarray(WHITE, jnp.uint8))
    rod = segment_distance(x, y, centre, (-jnp.sin(th), -jnp.cos(th)), ROD_LENGTH)
    image = paint(image, rod <= ROD_HALF_WIDTH, ROD_RGB)
    return paint(image, jnp.hypot(x - centre[0], y - centre[1]) <= AXLE_RADIUS, PENDULUM_AXLE_RGB)


def _batched(frame_fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """`frame_fn` over arrays of any leading shape (flattened, vmapped, jitted once per shape)."""
    flat = jax.jit(jax.vmap(frame_fn))

    def draw(*fields: Any) -> jax.Array:
        fields = [jnp.asarray(f, jnp.float32) for f in fields]
        lead = fields[0].shape
        frames = flat(*[f.reshape(-1) for f in fields])
        return frames.reshape(lead + frames.shape[1:])

    return draw


_cartpole_frames = _batched(cartpole_frame)
_pendulum_frames = _batched(pendulum_frame)


def render_cartpole(state: cartpole.CartPoleState) -> jax.Array:
    """uint8 [..., 160, 240, 3] of CartPole states with any leading shape (episodes x steps)."""
    return _cartpole_frames(state.x, state.theta)


def render_pendulum(state: pendulum.PendulumState) -> jax.Array:
    """uint8 [..., 160, 160, 3] of Pendulum states with any leading shape."""
    return _pendulum_frames(state.th)


@dataclass(frozen=True)
class Renderer:
    """How to draw an env: `draw(states) -> uint8 [..., H, W, 3]`, and the frame rate of real time."""

    draw: Callable[[Any], jax.Array]
    fps: int


def renderer_for(env: Any) -> Renderer | None:
    """The renderer of a JAX env drawn from its state, or None (it may still have image observations)."""
    if isinstance(env, cartpole.CartPole):
        return Renderer(render_cartpole, round(1 / cartpole.TAU))
    if isinstance(env, pendulum.Pendulum):
        return Renderer(render_pendulum, round(1 / pendulum.DT))
    return None


def to_rgb_uint8(image: Any) -> np.ndarray:
    """An image observation or render as uint8 [..., H, W, 3]: channel-first [..., 3, H, W] is moved last,
    floats in [0, 1] (TorchRL's ToTensorImage) scaled to 0..255, one channel repeated to three."""
    image = np.asarray(image)
    if image.shape[-1] not in (1, 3) and image.ndim >= 3 and image.shape[-3] in (1, 3):
        image = np.moveaxis(image, -3, -1)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    if np.issubdtype(image.dtype, np.floating):
        scale = 255.0 if image.size and float(np.nanmax(image)) <= 1.0 else 1.0
        image = np.clip(np.nan_to_num(image) * scale, 0, 255).round()
    return image.astype(np.uint8)
