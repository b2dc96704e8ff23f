"""Flax twins of torch VLA building blocks (ResNet, GPT-2) and the GPT-VLA policy.

Weights come from torch checkpoints via `bridge.load_vla_model`; nothing here
imports torch.
"""

from jaxrl_vla.models.vla.gemma import GemmaLM, gemma_config
from jaxrl_vla.models.vla.gpt2 import GPT2_PRESETS, GPT2Config, GPT2Model, gelu_new, gpt2_config
from jaxrl_vla.models.vla.gpt_vla import (
    IMAGE_FEATURES_KEY,
    GPTVLAModel,
    VLAConfigError,
    VLAModelConfig,
    dummy_obs,
    last_valid_index,
    pixels_from_obs,
)
from jaxrl_vla.models.vla.layers import (
    Attention,
    GatedMLP,
    RMSNorm,
    block_causal_mask,
    causal_mask,
    position_ids_from_mask,
)
from jaxrl_vla.models.vla.llama import (
    DecoderConfig,
    DecoderConfigError,
    DecoderForCausalLM,
    DecoderLM,
)
from jaxrl_vla.models.vla.resnet import RESNET_PRESETS, ResNetConfig, ResNetModel, resnet_config

__all__ = [
    "Attention",
    "DecoderConfig",
    "DecoderConfigError",
    "DecoderForCausalLM",
    "DecoderLM",
    "GatedMLP",
    "GemmaLM",
    "RMSNorm",
    "block_causal_mask",
    "causal_mask",
    "gemma_config",
    "position_ids_from_mask",
    "IMAGE_FEATURES_KEY",
    "GPT2Config",
    "GPT2Model",
    "GPT2_PRESETS",
    "GPTVLAModel",
    "RESNET_PRESETS",
    "ResNetConfig",
    "ResNetModel",
    "VLAConfigError",
    "VLAModelConfig",
    "dummy_obs",
    "gelu_new",
    "gpt2_config",
    "last_valid_index",
    "pixels_from_obs",
    "resnet_config",
]
