"""Algorithms. `from jaxrl_vla.algo import ppo` gives PPO's pure functions."""

from jaxrl_vla.algo import ppo
from jaxrl_vla.algo.ppo import PPOConfig

ALGORITHMS = {"ppo": ppo}

__all__ = ["ppo", "PPOConfig", "ALGORITHMS"]
