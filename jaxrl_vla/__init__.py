"""jaxrl_vla: JAX/Flax PPO for robot policies and pretrained torch VLA models.

`from jaxrl_vla import Trainer` is the seed's entry point: one class for both
buffer types and every env (docs/python_api.md). Importing this package never
imports torch (the `bridge` package holds all torch code).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Trainer", "PPOConfig", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import jaxrl_vla` stays light (the CLI validates config first).
    if name == "Trainer":
        from jaxrl_vla.training.trainer import Trainer

        return Trainer
    if name == "PPOConfig":
        from jaxrl_vla.algo.ppo import PPOConfig

        return PPOConfig
    raise AttributeError(f"module 'jaxrl_vla' has no attribute {name!r}")
