"""transformers' decoder language models (Llama, Qwen2, Gemma) as bridge twins: rules and a name map.

The Flax twin (`jaxrl_vla.models.vla.llama.DecoderLM`) names its modules after
HF's state_dict, so the default rule table converts every tensor; this file only
teaches it the RMSNorm types (weight -> scale) and maps each HF class to the
twin. Gemma's scaled embedding is an `nn.Embedding` subclass (the table's rule
applies; its `embed_scale` buffer is not persistent), and rotary `inv_freq`
buffers are not persistent either, so nothing else needs a rule.

`model_config` for these classes is the Hugging Face config dict (config.json,
or `PretrainedConfig.to_dict()`): the torch side is built with
`cls.config_class.from_dict(model_config)`, the Flax side with
`DecoderConfig.from_hf_dict(model_config)` (which refuses what it does not
implement). Tied `*ForCausalLM` heads: the state_dict repeats the embedding
as `lm_head.weight`; the twin holds it once and export writes it back.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

import jax.numpy as jnp
import torch
from torch import nn

from bridge.vla_loading import LeafRule, Variables, flax_to_torch, register_rule, register_twin, torch_to_flax

# family -> (modelling module, RMSNorm class, base model class, causal-LM class)
HF_DECODER_FAMILIES: dict[str, tuple[str, str, str, str]] = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaRMSNorm", "LlamaModel", "LlamaForCausalLM"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm", "Qwen2Model", "Qwen2ForCausalLM"),
    "gemma": ("transformers.models.gemma.modeling_gemma", "GemmaRMSNorm", "GemmaModel", "GemmaForCausalLM"),
}

_RMSNORM_RULE = (LeafRule("weight", "scale"),)
_TIED_HEAD_KEY = "lm_head.weight"


def _hf_torch_factory(cls: type, model_config: dict[str, Any]) -> nn.Module:
    """The HF model from its config dict (eager attention: the twin's reference maths)."""
    config = cls.config_class.from_dict(dict(model_config))
    config._attn_implementation = "eager"
    return cls(config)


def _decoder_twin(model_config: dict[str, Any]) -> tuple[Any, Any]:
    from jaxrl_vla.models.vla.llama import DecoderConfig, DecoderLM

    return DecoderLM(DecoderConfig.from_hf_dict(model_config)), jnp.zeros((1, 1), jnp.int32)


def _causal_lm_twin(model_config: dict[str, Any]) -> tuple[Any, Any]:
    from jaxrl_vla.models.vla.llama import DecoderConfig, DecoderForCausalLM

    return DecoderForCausalLM(DecoderConfig.from_hf_dict(model_config)), jnp.zeros((1, 1), jnp.int32)


def _is_tied(model: nn.Module) -> bool:
    """From the config, not tensor identity: `load_state_dict(assign=True)` unties the tensors themselves."""
    return hasattr(model, "lm_head") and bool(getattr(model.config, "tie_word_embeddings", False))


def causal_lm_to_flax(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> Variables:
    """Rule-table conversion, holding a tied head once (as the embedding)."""
    if _is_tied(model):
        tensors = {k: v for k, v in tensors.items() if k != _TIED_HEAD_KEY}
    return torch_to_flax(model, tensors)


def causal_lm_to_torch(model: nn.Module, variables: Variables) -> dict[str, torch.Tensor]:
    """Rule-table export; a tied head is written from the embedding table (bit for bit)."""
    if not _is_tied(model):
        return flax_to_torch(model, variables)
    params = variables["params"]
    head = {"kernel": params["model"]["embed_tokens"]["embedding"].T}
    with_head = {**variables, "params": {**params, "lm_head": head}}
    return flax_to_torch(model, with_head)


def register_hf_decoders() -> None:
    """Register the RMSNorm rules and the twins of every family in HF_DECODER_FAMILIES (transformers present)."""
    for module_name, norm, base, causal in HF_DECODER_FAMILIES.values():
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # transformers missing, or too old for this family
            continue
        register_rule(getattr(module, norm), _RMSNORM_RULE)
        register_twin(f"{module_name}.{base}", _decoder_twin, torch_factory=_hf_torch_factory)
        register_twin(
            f"{module_name}.{causal}",
            _causal_lm_twin,
            causal_lm_to_flax,
            export_fn=causal_lm_to_torch,
            torch_factory=_hf_torch_factory,
        )


register_hf_decoders()
