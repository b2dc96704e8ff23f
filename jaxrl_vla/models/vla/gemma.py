"""Gemma as configuration of the shared decoder twin (`llama.DecoderLM`), not a copy of its code.

Gemma (1, as in PaliGemma and pi0) differs from Llama only in:
- RMSNorm scaled by (1 + w), computed in float32 before the cast back
  (`norm_scale_plus_one`);
- token embeddings multiplied by sqrt(hidden_size) in the compute dtype, as
  HF 5's `GemmaTextScaledWordEmbedding` does (`scale_embeddings`; applied by
  `DecoderLM.embed`, not to `inputs_embeds`, exactly as HF);
- GeGLU with the tanh GELU: HF rewrites a legacy `hidden_act: "gelu"` to
  "gelu_pytorch_tanh", and so does this mapping;
- `head_dim` independent of hidden_size (e.g. 256 with hidden 2048), which the
  shared attention takes as a field anyway;
- tied embeddings by default.
Gemma 2/3 (soft-capping, sliding windows, q/k norms) are other model_types and
are refused by `DecoderConfig.from_hf_dict`.
"""

from __future__ import annotations

from typing import Any, Mapping

from jaxrl_vla.models.vla.llama import FAMILIES, DecoderConfig, DecoderLM, common_fields

GemmaLM = DecoderLM  # the same module; GemmaConfig-shaped DecoderConfig makes it Gemma


def gemma_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """GemmaConfig -> DecoderConfig keyword arguments."""
    config = dict(config)
    config.setdefault("tie_word_embeddings", True)
    config.setdefault("hidden_act", "gelu_pytorch_tanh")
    config.setdefault("head_dim", 256)  # GemmaConfig's default, not hidden_size // heads
    if config["hidden_act"] == "gelu":  # HF's GemmaConfig does the same rewrite
        config["hidden_act"] = "gelu_pytorch_tanh"
    bias = bool(config.get("attention_bias", False))
    return dict(
        common_fields(config),
        attention_bias=bias,
        attention_out_bias=bias,
        mlp_bias=False,
        norm_scale_plus_one=True,
        scale_embeddings=True,
    )


def gemma_config(**fields: Any) -> DecoderConfig:
    """A Gemma-shaped DecoderConfig from GemmaConfig-named fields (model_type set for you)."""
    return DecoderConfig.from_hf_dict({**fields, "model_type": "gemma"})


FAMILIES.update(gemma=gemma_fields)
