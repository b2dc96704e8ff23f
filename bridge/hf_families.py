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

The composite vision-language models (`HF_VLM_CLASSES`: SmolVLM, PaliGemma) are
table entries too: their twins (`jaxrl_vla.models.vla.smolvlm` / `paligemma`)
mirror HF's module tree, so the same rule table (plus the RMSNorm and
MultiheadAttention rules) converts them; a table entry names the class, the
twin factory (shared with `bridge.hf_dir`'s directory registry) and where the
embedding a tied `lm_head` repeats lives in the Flax tree. Tying follows the
top-level `tie_word_embeddings`, as transformers does for these classes.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

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

# class -> (modelling module, class name, Flax path of the embedding a tied lm_head repeats, or None)
HF_VLM_CLASSES: dict[str, tuple[str, str, tuple[str, ...] | None]] = {
    "SmolVLMModel": ("transformers.models.smolvlm.modeling_smolvlm", "SmolVLMModel", None),
    "SmolVLMForConditionalGeneration": (
        "transformers.models.smolvlm.modeling_smolvlm", "SmolVLMForConditionalGeneration",
        ("model", "text_model", "embed_tokens"),
    ),
    "Idefics3Model": ("transformers.models.idefics3.modeling_idefics3", "Idefics3Model", None),
    "Idefics3ForConditionalGeneration": (
        "transformers.models.idefics3.modeling_idefics3", "Idefics3ForConditionalGeneration",
        ("model", "text_model", "embed_tokens"),
    ),
    "PaliGemmaModel": ("transformers.models.paligemma.modeling_paligemma", "PaliGemmaModel", None),
    "PaliGemmaForConditionalGeneration": (
        "transformers.models.paligemma.modeling_paligemma", "PaliGemmaForConditionalGeneration",
        ("model", "language_model", "embed_tokens"),
    ),
}  # fmt: skip

_RMSNORM_RULE = (LeafRule("weight", "scale"),)
_TIED_HEAD_KEY = "lm_head.weight"
_DECODER_EMBEDDING = ("model", "embed_tokens")


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


def tied_head_export(embedding: tuple[str, ...]) -> Callable[[nn.Module, Variables], dict[str, torch.Tensor]]:
    """Rule-table export where a tied head is written from the embedding table at `embedding` (bit for bit)."""

    def export(model: nn.Module, variables: Variables) -> dict[str, torch.Tensor]:
        if not _is_tied(model):
            return flax_to_torch(model, variables)
        params = variables["params"]
        table = params
        for part in embedding:
            table = table[part]
        with_head = {**variables, "params": {**params, "lm_head": {"kernel": table["embedding"].T}}}
        return flax_to_torch(model, with_head)

    return export


causal_lm_to_torch = tied_head_export(_DECODER_EMBEDDING)


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


def register_hf_vlms() -> None:
    """Register the twins of every class in HF_VLM_CLASSES (transformers present); factories from bridge.hf_dir."""
    from bridge import hf_dir

    for arch_name, (module_name, cls_name, embedding) in HF_VLM_CLASSES.items():
        try:
            importlib.import_module(module_name)
        except ImportError:  # transformers missing, or too old for this family
            continue
        factory = hf_dir.architecture_of({"architectures": [arch_name]})[1].factory
        extra = {} if embedding is None else dict(convert_fn=causal_lm_to_flax, export_fn=tied_head_export(embedding))
        register_twin(f"{module_name}.{cls_name}", factory, torch_factory=_hf_torch_factory, **extra)


register_hf_decoders()
register_hf_vlms()
