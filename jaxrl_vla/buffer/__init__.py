"""Buffers: RolloutBuffer (standard mode) and VLABuffer (async, circular)."""

from jaxrl_vla.buffer.circular import BufferClosed, CircularState, VLABuffer
from jaxrl_vla.buffer.rollout import RolloutBuffer, RolloutState

__all__ = ["BufferClosed", "CircularState", "RolloutBuffer", "RolloutState", "VLABuffer"]
