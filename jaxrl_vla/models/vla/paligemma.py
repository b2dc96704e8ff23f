"""Flax twins of transformers' `PaliGemmaModel` / `PaliGemmaForConditionalGeneration` (pi0's VLM).

Composition only: `siglip.SiglipVisionModel` (the tower), one Linear
(`multi_modal_projector.linear`, vision hidden -> projection_dim) and the Gemma
configuration of `llama.DecoderLM`. Module names mirror HF's state_dict:

    vision_tower/{embeddings, encoder/layers_N, post_layernorm[, head]}
    multi_modal_projector/linear
    language_model/{embed_tokens, layers_N, norm}
    lm_head                                      ForConditionalGeneration only, absent when tied (the default)

Forward, as transformers 5.25 computes it (eager attention):
- `pixel_values` [B, H, W, C] (`channels_first=True`: HF's [B, C, H, W]), one
  image per sample, of the tower's `image_size` (other sizes are an error that
  names both). Image features = projector(tower's last hidden state), not
  rescaled: transformers 4 divided them by sqrt(hidden) because Gemma then
  multiplied every input embedding by it; transformers 5 scales inside the
  embedding module, so text tokens get sqrt(hidden) and image features enter as
  projected. Both give the same numbers.
- the k-th `image_token_index` position of the batch (row-major) takes the k-th
  feature row (masked_scatter; counts checked when concrete, as HF raises).
- mask (`prefix_lm_mask`): causal, OR bidirectional among the tokens with
  `token_type_ids == 0` (image + prefix prompt), AND the key is a real token of
  `attention_mask`. Without token_type_ids: causal + padding.
- `position_ids` default 1..T (PaliGemma's positions are 1-indexed).

The text config's `use_bidirectional_attention` (PaliGemmaConfig sets it True)
only changes transformers' SDPA fast path when no mask is materialised; the
eager maths above, which the twin matches, always uses the mask, so the flag is
dropped here rather than refused. Options the twin does not implement are
refused by name (a sliding window on the text model, Gemma 2's soft-capping via
its model_type, rope scaling types, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrl_vla.models.vla.layers import merge_image_features
from jaxrl_vla.models.vla.llama import DecoderConfig, DecoderLM
from jaxrl_vla.models.vla.siglip import SiglipVisionConfig, SiglipVisionModel
from jaxrl_vla.models.vla.smolvlm import VLMConfigError, check_image_token_count, refuse_keys, sub_config

# text_config options transformers' PaliGemma honours that the twin does not implement.
_TEXT_REFUSED = {
    "sliding_window": "a sliding-window text model (PaliGemma 2 style) is not implemented",
    "final_logit_softcapping": "logit soft-capping is not implemented",
    "attn_logit_softcapping": "attention soft-capping is not implemented",
}


@dataclasses.dataclass(frozen=True)
class PaliGemmaConfig:
    """The fields of transformers' `PaliGemmaConfig` that shape the network."""

    vision: SiglipVisionConfig
    text: DecoderConfig
    projection_dim: int = 2048
    image_token_index: int = 256000
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.projection_dim != self.text.hidden_size:
            raise VLMConfigError(
                f"projection_dim ({self.projection_dim}) must equal text_config.hidden_size ({self.text.hidden_size}): "
                f"image features replace token embeddings"
            )

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @classmethod
    def from_hf_dict(cls, config: Mapping[str, Any]) -> "PaliGemmaConfig":
        """From a PaliGemmaConfig dict (config.json or `to_dict()`); unimplemented options raise by name."""
        if config.get("model_type") != "paligemma":
            raise VLMConfigError(f"model_type {config.get('model_type')!r} is not a PaliGemma config ('paligemma')")
        vision = sub_config(config, "vision_config", "PaliGemma")
        vision.setdefault("model_type", "siglip_vision_model")
        text = sub_config(config, "text_config", "PaliGemma")
        text.setdefault("model_type", "gemma")
        refuse_keys(text, _TEXT_REFUSED, "text_config.")
        text.pop("use_bidirectional_attention", None)  # see the module docstring
        text_cfg = DecoderConfig.from_hf_dict(text)
        return cls(
            vision=SiglipVisionConfig.from_hf_dict(vision),
            text=text_cfg,
            projection_dim=int(config.get("projection_dim", text_cfg.hidden_size)),
            image_token_index=int(config.get("image_token_index", config.get("image_token_id", 256000))),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        )


def prefix_lm_mask(attention_mask: jax.Array | None, token_type_ids: jax.Array | None, batch: int,
                   length: int) -> jax.Array:
    """Boolean [B, T, T]: (k <= q  OR  both are prefix tokens, token_type 0)  AND  key k is real.

    transformers' `create_causal_mask(block_sequence_ids=where(token_type_ids == 0, 0, -1))`
    with eager attention; padding masks keys only (padded query rows are junk).
    """
    visible = jnp.tril(jnp.ones((length, length), bool))[None]
    if token_type_ids is not None:
        prefix = jnp.asarray(token_type_ids) == 0
        visible = visible | (prefix[:, :, None] & prefix[:, None, :])
    visible = jnp.broadcast_to(visible, (batch, length, length))
    if attention_mask is not None:
        visible = visible & jnp.asarray(attention_mask).astype(bool)[:, None, :]
    return visible


class PaliGemmaModel(nn.Module):
    """Twin of HF `PaliGemmaModel` -> final normed text hidden states [B, T, H] (module docstring).

    __call__(input_ids, attention_mask=None, pixel_values=None, token_type_ids=None, *,
             position_ids=None, channels_first=False)
    """

    config: PaliGemmaConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.vision_tower = SiglipVisionModel(cfg.vision, self.dtype)
        self.multi_modal_projector = _Projector(cfg.projection_dim, self.dtype)
        self.language_model = DecoderLM(cfg.text, self.dtype)

    def image_features(self, pixel_values: jax.Array, *, channels_first: bool = False) -> jax.Array:
        """Projected image features [B, num_image_tokens, H]."""
        hidden, _ = self.vision_tower(jnp.asarray(pixel_values), channels_first=channels_first)
        return self.multi_modal_projector(hidden)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        position_ids: jax.Array | None = None,
        channels_first: bool = False,
        return_kv: bool = False,
        extra_embeds: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, tuple]:
        """`return_kv`: also the language model's per-layer (k, v) of the whole prompt (an action head's prefix).
        `extra_embeds` [B, K, H]: embeddings placed after the ids' (a VLA's proprio token; `attention_mask`
        and `token_type_ids` then cover T + K)."""
        cfg = self.config
        input_ids = jnp.asarray(input_ids).astype(jnp.int32)
        if pixel_values is None and self.is_initializing():  # create the tower's parameters too
            v = cfg.vision
            pixel_values = jnp.ones((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
            channels_first = False
        batch, length = input_ids.shape
        is_image = input_ids == cfg.image_token_index
        # HF embeds id 0 at image tokens outside the vocabulary; inside it, their rows are replaced (with images)
        replace = pixel_values is not None or cfg.image_token_index >= cfg.text.vocab_size
        embeds = self.language_model.embed(jnp.where(is_image, 0, input_ids) if replace else input_ids)
        if pixel_values is not None:
            feats = self.image_features(pixel_values, channels_first=channels_first)
            if not self.is_initializing():
                check_image_token_count(input_ids, cfg.image_token_index, feats.shape[0] * feats.shape[1],
                                        "PaliGemma")
            embeds = merge_image_features(embeds, is_image, feats.reshape(-1, feats.shape[-1]))
        if extra_embeds is not None:
            embeds = jnp.concatenate([embeds, extra_embeds.astype(embeds.dtype)], axis=1)
            length = embeds.shape[1]
        if position_ids is None:
            position_ids = jnp.arange(length) + 1
        mask = prefix_lm_mask(attention_mask, token_type_ids, batch, length)
        return self.language_model(inputs_embeds=embeds, position_ids=position_ids, mask=mask, return_kv=return_kv)


class _Projector(nn.Module):
    """HF `PaliGemmaMultiModalProjector`: one biased Linear named `linear`."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.features, dtype=self.dtype, name="linear")(x)


class PaliGemmaForConditionalGeneration(nn.Module):
    """Twin of HF `PaliGemmaForConditionalGeneration`: `model` + `lm_head` (absent when tied, the default).

    __call__ takes PaliGemmaModel's arguments and returns logits [B, T, vocab];
    `hidden` gives the trunk's output alone.
    """

    config: PaliGemmaConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.model = PaliGemmaModel(cfg, self.dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.text.vocab_size, use_bias=False, dtype=self.dtype)

    def hidden(self, *args: Any, **kwargs: Any) -> jax.Array:
        return self.model(*args, **kwargs)

    def head(self, hidden: jax.Array) -> jax.Array:
        if self.config.tie_word_embeddings:
            return self.model.language_model.logits(hidden)
        return self.lm_head(hidden)

    def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
        return self.head(self.model(*args, **kwargs))
