"""transformers' `SiglipVisionModel` as a bridge twin: one rule (nn.MultiheadAttention) and a registration.

The Flax twin (`jaxrl_vla.models.vla.siglip.SiglipVisionModel`) names its
modules after HF's state_dict, so the rule table converts Conv2d, Linear,
LayerNorm and Embedding as it does for every twin. The attention-pooling head
holds a `torch.nn.MultiheadAttention`, whose fused `in_proj_weight` [3D, D]
becomes the Dense-layout `in_proj_kernel` [D, 3D] (its `out_proj` is a Linear
subclass, which the table already knows).

`model_config` is the Hugging Face config dict (config.json or
`SiglipVisionConfig.to_dict()`): torch is built with
`cls.config_class.from_dict(model_config)` (eager attention, the twin's
reference maths), Flax with `SiglipVisionConfig.from_hf_dict` (which refuses
what the twin does not implement).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from bridge.vla_loading import LeafRule, _transpose_2d, register_rule, register_twin

SIGLIP_VISION_CLASS = "transformers.models.siglip.modeling_siglip.SiglipVisionModel"

_MHA_RULE = (
    LeafRule("in_proj_weight", "in_proj_kernel", to_flax=_transpose_2d, to_torch=_transpose_2d),
    LeafRule("in_proj_bias", "in_proj_bias"),
)


def _hf_torch_factory(cls: type, model_config: dict[str, Any]) -> nn.Module:
    """The HF model from its config dict, eager attention."""
    config = cls.config_class.from_dict(dict(model_config))
    config._attn_implementation = "eager"
    return cls(config)


def siglip_vision_twin(model_config: dict[str, Any]) -> tuple[Any, Any]:
    """(Flax SiglipVisionModel, example NHWC pixels) from an HF config dict."""
    from jaxrl_vla.models.vla.siglip import SiglipVisionConfig, SiglipVisionModel, dummy_pixels

    cfg = SiglipVisionConfig.from_hf_dict(model_config)
    return SiglipVisionModel(cfg), dummy_pixels(cfg)


def register_hf_siglip() -> None:
    """Register the MultiheadAttention rule and the SiglipVisionModel twin."""
    register_rule(nn.MultiheadAttention, _MHA_RULE)
    register_twin(SIGLIP_VISION_CLASS, siglip_vision_twin, torch_factory=_hf_torch_factory)


register_hf_siglip()
