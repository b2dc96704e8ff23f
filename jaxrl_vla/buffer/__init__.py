"""Buffers: RolloutBuffer (standard mode) and VLABuffer (async, circular)."""

from jaxrl_vla.buffer.rollout import RolloutBuffer, RolloutState

__all__ = ["RolloutBuffer", "RolloutState"]
