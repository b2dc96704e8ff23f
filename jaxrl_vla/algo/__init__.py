"""Algorithms. `from jaxrl_vla.algo import ppo` gives PPO's pure functions, `grpo` GRPO's."""

from jaxrl_vla.algo import grpo, ppo
from jaxrl_vla.algo.grpo import GRPOConfig
from jaxrl_vla.algo.ppo import PPOConfig

ALGORITHMS = {"ppo": ppo, "grpo": grpo}

__all__ = ["ppo", "grpo", "PPOConfig", "GRPOConfig", "ALGORITHMS"]
