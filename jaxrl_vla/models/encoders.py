"""Image torsos for the from-scratch actor-critic (`policy.encoder`).

Why two: they are what image-based RL baselines reach for first, and what
users compare against (SB3's CnnPolicy and cleanrl's Atari PPO use the first,
PureJaxRL/cleanrl's Procgen PPO the second):

* "nature_cnn": the DQN torso of Mnih et al. (2015), three VALID convolutions
  (32 8x8 /4, 64 4x4 /2, 64 3x3 /1) and a 512-unit dense layer, all ReLU.
  Cheap; needs images of at least 36 x 36 pixels.
* "impala": the IMPALA ResNet of Espeholt et al. (2018), three stages of
  (3x3 conv, 3x3 max-pool /2, two residual blocks) with 16, 32, 32 channels,
  then a 256-unit dense layer. Deeper and better on varied scenes; any size.

Both take a float batch [B, H, W, C] already scaled (uint8 images to [0, 1]:
`image_inputs`) and return features [B, F]. Initialisation is orthogonal with
gain sqrt(2) (ReLU), as in cleanrl.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ENCODERS = ("mlp", "nature_cnn", "impala")
NATURE_CNN_MIN_SIZE = 36  # 8x8 /4 -> 4x4 /2 -> 3x3 /1 leaves at least one pixel from 36 on

_RELU_INIT = nn.initializers.orthogonal(np.sqrt(2.0))


def is_image(x: Any) -> bool:
    """A batched leaf [B, H, W, C] with a few channels: an image (uint8 pixels or a float map such as depth)."""
    return getattr(x, "ndim", 0) == 4 and x.shape[-1] <= 4


def image_inputs(leaves: Sequence[jax.Array]) -> jax.Array:
    """Image leaves -> one float32 [B, H, W, sum C]: uint8 scaled to [0, 1], float maps kept, channels
    concatenated (rgb + depth is one RGB-D image). Every image must have the same height and width."""
    sizes = {tuple(x.shape[1:3]) for x in leaves}
    if len(sizes) > 1:
        raise ValueError(f"policy.encoder: image observations of different sizes {sorted(sizes)}; "
                         "the CNN reads them stacked along channels, so they must share height and width")
    scaled = [x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32) for x in leaves]
    return jnp.concatenate(scaled, axis=-1)


class NatureCNN(nn.Module):
    """Mnih et al. (2015)'s DQN torso: [B, H, W, C] -> [B, features]."""

    features: int = 512

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if min(x.shape[1:3]) < NATURE_CNN_MIN_SIZE:
            raise ValueError(f"policy.encoder 'nature_cnn' needs images of at least {NATURE_CNN_MIN_SIZE} x "
                             f"{NATURE_CNN_MIN_SIZE} pixels, got {x.shape[1]} x {x.shape[2]}; use 'impala' "
                             "for smaller images")
        for channels, kernel, stride in ((32, 8, 4), (64, 4, 2), (64, 3, 1)):
            x = nn.relu(nn.Conv(channels, (kernel, kernel), (stride, stride), padding="VALID", kernel_init=_RELU_INIT)(x))
        x = x.reshape(x.shape[0], -1)
        return nn.relu(nn.Dense(self.features, kernel_init=_RELU_INIT)(x))


class ResidualBlock(nn.Module):
    """relu -> conv -> relu -> conv, plus the input (IMPALA's pre-activation block)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        y = nn.Conv(channels, (3, 3), padding="SAME", kernel_init=_RELU_INIT)(nn.relu(x))
        y = nn.Conv(channels, (3, 3), padding="SAME", kernel_init=_RELU_INIT)(nn.relu(y))
        return x + y


class ImpalaCNN(nn.Module):
    """Espeholt et al. (2018)'s IMPALA ResNet torso: [B, H, W, C] -> [B, features]."""

    channels: Sequence[int] = (16, 32, 32)
    features: int = 256

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.channels:
            x = nn.Conv(width, (3, 3), padding="SAME", kernel_init=_RELU_INIT)(x)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
            x = ResidualBlock()(x)
            x = ResidualBlock()(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        return nn.relu(nn.Dense(self.features, kernel_init=_RELU_INIT)(x))


def make_encoder(kind: str, **kwargs: Any) -> nn.Module:
    """The torso `policy.encoder` names ('nature_cnn' or 'impala'); ValueError names the choices."""
    if kind == "nature_cnn":
        return NatureCNN(**kwargs)
    if kind == "impala":
        return ImpalaCNN(**kwargs)
    raise ValueError(f"policy.encoder must be one of {ENCODERS}, got {kind!r}")
