"""torch VLA models with Flax twins in `jaxrl_vla.models.vla` (torch side of the bridge)."""

from bridge.vla_models.gpt_vla import GPTVLAModel

__all__ = ["GPTVLAModel"]
