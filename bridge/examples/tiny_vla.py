"""A VLA team's own torch policy and its Flax twin: the worked example of docs/bring_your_own_vla.md.

`TinyVLA` (torch) reads VLReach-style observations {"rgb" [B, H, W, 3] uint8, "proprio" [B, P],
"language" [B, L] int, "language_mask" [B, L]} and has the seed's VLA interface: `forward(obs)`
-> action mean, `get_value(obs)`, `evaluate_actions(obs, actions)`. `FlaxTinyVLA` is its twin:
the same maths, its parameters named so that the bridge's rule table converts the state_dict leaf
by leaf (torch `image_proj` Linear -> Flax `image_proj` Dense, `words` Embedding -> Embed, the
bare `log_std` Parameter copied as is). Importing this module registers the twin, so a config
naming `bridge.examples.tiny_vla.TinyVLA` as `policy.vla_config.model_class` trains it.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import torch

from bridge.vla_loading import register_twin
from jaxrl_vla.models.distributions import DiagGaussian


class TinyVLA(torch.nn.Module):
    """Pooled pixels + pooled instruction words + proprio -> a tanh MLP -> action mean and value."""

    def __init__(self, image_size: int = 64, proprio_dim: int = 2, vocab_size: int = 18, action_dim: int = 2,
                 hidden: int = 64, grid: int = 4):
        super().__init__()
        self.grid = grid
        self.image_proj = torch.nn.Linear(grid * grid * 3, hidden)
        self.words = torch.nn.Embedding(vocab_size, hidden)
        self.proprio_proj = torch.nn.Linear(proprio_dim, hidden)
        self.body = torch.nn.Linear(hidden, hidden)
        self.action_mean = torch.nn.Linear(hidden, action_dim)
        self.value = torch.nn.Linear(hidden, 1)
        self.log_std = torch.nn.Parameter(torch.full((action_dim,), -0.5))

    def features(self, obs: dict) -> torch.Tensor:
        rgb = obs["rgb"].float() / 255.0  # [B, H, W, 3]
        b, h, w, c = rgb.shape
        pooled = rgb.reshape(b, self.grid, h // self.grid, self.grid, w // self.grid, c).mean(dim=(2, 4))
        mask = obs["language_mask"].float()[..., None]  # mean of the real tokens' embeddings
        words = (self.words(obs["language"].long()) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        x = self.image_proj(pooled.reshape(b, -1)) + words + self.proprio_proj(obs["proprio"].float())
        return torch.tanh(self.body(torch.tanh(x)))

    def forward(self, obs: dict) -> torch.Tensor:
        return self.action_mean(self.features(obs))

    def get_value(self, obs: dict) -> torch.Tensor:
        return self.value(self.features(obs))[:, 0]

    def evaluate_actions(self, obs: dict, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.features(obs)
        dist = torch.distributions.Normal(self.action_mean(h), self.log_std.exp())
        return dist.log_prob(actions).sum(-1), dist.entropy().sum(-1), self.value(h)[:, 0]


class FlaxTinyVLA(nn.Module):
    """The twin: `__call__(obs) -> (DiagGaussian, value [B])`, the Flax VLA model protocol."""

    image_size: int = 64
    proprio_dim: int = 2
    vocab_size: int = 18
    action_dim: int = 2
    hidden: int = 64
    grid: int = 4

    def setup(self) -> None:
        self.image_proj = nn.Dense(self.hidden)
        self.words = nn.Embed(self.vocab_size, self.hidden)
        self.proprio_proj = nn.Dense(self.hidden)
        self.body = nn.Dense(self.hidden)
        self.action_mean = nn.Dense(self.action_dim)
        self.value = nn.Dense(1)
        self.log_std = self.param("log_std", nn.initializers.constant(-0.5), (self.action_dim,))

    def features(self, obs: dict) -> jnp.ndarray:
        rgb = jnp.asarray(obs["rgb"], jnp.float32) / 255.0
        b, h, w, c = rgb.shape
        pooled = rgb.reshape(b, self.grid, h // self.grid, self.grid, w // self.grid, c).mean(axis=(2, 4))
        mask = jnp.asarray(obs["language_mask"], jnp.float32)[..., None]
        words = (self.words(jnp.asarray(obs["language"], jnp.int32)) * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
        x = self.image_proj(pooled.reshape(b, -1)) + words + self.proprio_proj(jnp.asarray(obs["proprio"], jnp.float32))
        return jnp.tanh(self.body(jnp.tanh(x)))

    def __call__(self, obs: dict) -> tuple[DiagGaussian, jnp.ndarray]:
        h = self.features(obs)
        return DiagGaussian(self.action_mean(h), self.log_std), self.value(h)[:, 0]


def _twin(model_config: dict) -> tuple[FlaxTinyVLA, dict]:
    """(Flax twin, an example input for `init`) from the torch class's constructor arguments."""
    module = FlaxTinyVLA(**model_config)
    size, length = module.image_size, 8
    example = {"rgb": jnp.zeros((1, size, size, 3), jnp.uint8), "proprio": jnp.zeros((1, module.proprio_dim)),
               "language": jnp.zeros((1, length), jnp.int32), "language_mask": jnp.ones((1, length), bool)}
    return module, example


register_twin("bridge.examples.tiny_vla.TinyVLA", _twin, value_head=("value",))
