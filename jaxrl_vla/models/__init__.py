"""Policies: ActorCritic (from scratch) and VLAPolicy (pretrained VLA models)."""

from jaxrl_vla.models.actor_critic import ActorCritic
from jaxrl_vla.models.distributions import Categorical, DiagGaussian
from jaxrl_vla.models.vla_policy import VLAPolicy

__all__ = ["ActorCritic", "VLAPolicy", "Categorical", "DiagGaussian"]
