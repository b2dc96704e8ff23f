"""Flax twins of transformers' `SmolVLMModel` / `SmolVLMForConditionalGeneration` (SmolVLM2, SmolVLA's VLM).

The same twins serve `Idefics3Model` / `Idefics3ForConditionalGeneration`, which
SmolVLM was derived from: identical modules and forward (model_type "idefics3").

Composition only, no copied blocks: the vision tower is `siglip.SiglipVisionModel`
with SmolVLM's NaViT-style positions (`navit_positions`), the connector a
pixel shuffle + one bias-free Linear, the text model `llama.DecoderLM`.
Module names mirror HF's state_dict:

    vision_model/{embeddings, encoder/layers_N, post_layernorm}
    connector/modality_projection/proj           Dense [D * s**2, H], no bias
    text_model/{embed_tokens, layers_N, norm}    (DecoderLM)
    lm_head                                      ForConditionalGeneration only, absent when tied

Forward, as transformers 5.25 computes it (eager attention):
1. `pixel_values` [B, N, H, W, C] (channels last; `channels_first=True` takes
   HF's [B, N, C, H, W]; [B, H, W, C] means N = 1). Images that are all zeros
   are padding images (HF drops them): they are run through the tower too
   (static shapes) but their features are never used.
   `pixel_attention_mask` [B, N, H, W] (True = real pixel, the processor's
   padding mask) becomes the patch mask (a patch is real if any pixel is).
2. The tower's last hidden state [n, P, D] goes through `pixel_shuffle`
   (scale_factor s: P -> P / s**2 tokens of D * s**2) and the projection.
3. Text embeddings of `input_ids`; the k-th `image_token_id` position of the
   batch (row-major) takes the k-th feature row of the real images, in order
   (torch's masked_scatter). The counts must agree: checked when the inputs are
   concrete (outside jit), as HF raises; inside jit a mismatch is not detected.
4. The decoder with `attention_mask` (causal + padding, left or right) and
   `position_ids` (default 0..T-1, HF's forward).

Options the twin does not implement are refused by name in `from_hf_dict`
(through SiglipVisionConfig / DecoderConfig for the towers): non-square image
sizes, rope scaling types, sliding windows, ...
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_vla.config import ConfigError
from jaxrl_vla.models.vla.layers import merge_image_features
from jaxrl_vla.models.vla.llama import DecoderConfig, DecoderLM
from jaxrl_vla.models.vla.siglip import SiglipVisionConfig, SiglipVisionModel


class VLMConfigError(ConfigError):
    """A vision-language config.json option the composite twins do not implement, or an inconsistent field."""


def sub_config(config: Mapping[str, Any], key: str, family: str) -> dict[str, Any]:
    """config[key] as a dict (`vision_config` / `text_config`), required: HF's defaults are multi-billion models."""
    sub = config.get(key)
    if not isinstance(sub, Mapping):
        raise VLMConfigError(f"{family} config.json needs a {key} mapping (got {type(sub).__name__})")
    return dict(sub)


def refuse_keys(config: Mapping[str, Any], refused: Mapping[str, str], where: str) -> None:
    """VLMConfigError for the first key of `refused` that is set (not None / False / empty) in `config`."""
    for key, why in refused.items():
        if config.get(key) not in (None, False, [], {}):
            raise VLMConfigError(f"{where}{key}={config[key]!r}: {why}")


def concrete_or_none(x: Any) -> np.ndarray | None:
    """`x` as numpy when it is a concrete value, None while tracing (inside jit/grad)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_image_token_count(input_ids: Any, image_token_id: int, n_features: int | None, family: str) -> None:
    """HF's placeholder check (image tokens == feature rows), when the inputs are concrete."""
    ids = concrete_or_none(input_ids)
    if ids is None or n_features is None:
        return
    n_tokens = int((ids == image_token_id).sum())
    if n_tokens != n_features:
        raise ValueError(
            f"{family}: input_ids hold {n_tokens} image tokens (id {image_token_id}) but the images give "
            f"{n_features} feature rows"
        )


@dataclasses.dataclass(frozen=True)
class SmolVLMConfig:
    """The fields of transformers' `SmolVLMConfig` that shape the network (towers as their twins' configs)."""

    vision: SiglipVisionConfig
    text: DecoderConfig
    scale_factor: int = 2
    image_token_id: int = 128257
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        grid = self.vision.image_size // self.vision.patch_size
        if self.scale_factor < 1 or grid % self.scale_factor:
            raise VLMConfigError(
                f"scale_factor={self.scale_factor} must divide the patch grid side {grid} "
                f"(image_size {self.vision.image_size} / patch_size {self.vision.patch_size})"
            )

    @property
    def image_seq_len(self) -> int:
        """Image tokens per image of `image_size` (HF's `image_seq_len`)."""
        return self.vision.num_patches // self.scale_factor**2

    @classmethod
    def from_hf_dict(cls, config: Mapping[str, Any]) -> "SmolVLMConfig":
        """From a SmolVLMConfig dict (config.json or `to_dict()`); unimplemented options raise by name."""
        vision_types = {"smolvlm": "smolvlm_vision", "idefics3": "idefics3_vision"}
        if config.get("model_type") not in vision_types:
            raise VLMConfigError(
                f"model_type {config.get('model_type')!r} is not a SmolVLM config (one of {sorted(vision_types)})"
            )
        vision = sub_config(config, "vision_config", "SmolVLM")
        vision.setdefault("model_type", vision_types[config["model_type"]])
        text = sub_config(config, "text_config", "SmolVLM")
        text.setdefault("model_type", "llama")
        text.setdefault("rms_norm_eps", 1e-5)  # HF's SmolVLM default for its text config
        return cls(
            vision=SiglipVisionConfig.from_hf_dict(vision),
            text=DecoderConfig.from_hf_dict(text),
            scale_factor=int(config.get("scale_factor", 2)),
            image_token_id=int(config.get("image_token_id", 128257)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


def pixel_shuffle(x: jax.Array, scale_factor: int) -> jax.Array:
    """SmolVLM's space-to-depth [n, P, D] -> [n, P / s**2, D * s**2] (HF's reshapes, in HF's order)."""
    n, seq, d = x.shape
    side = int(round(seq**0.5))
    s = scale_factor
    if side * side != seq or side % s:
        raise ValueError(
            f"SmolVLM pixel shuffle: {seq} patches per image are not a square grid whose side is divisible by "
            f"scale_factor {s}; use square images whose patch grid side is a multiple of {s}"
        )
    x = x.reshape(n, side, side // s, d * s)
    x = jnp.transpose(x, (0, 2, 1, 3))
    x = x.reshape(n, side // s, side // s, d * s * s)
    x = jnp.transpose(x, (0, 2, 1, 3))
    return x.reshape(n, seq // (s * s), d * s * s)


def _images_to_nhwc(pixel_values: jax.Array, channels_first: bool) -> jax.Array:
    """[B, N, H, W, C] (or [B, N, C, H, W]; [B, H, W, C] / [B, C, H, W] for one image each)."""
    if pixel_values.ndim == 4:
        pixel_values = pixel_values[:, None]
    if pixel_values.ndim != 5:
        raise ValueError(f"SmolVLM pixel_values must be [B, N, H, W, C], got shape {tuple(pixel_values.shape)}")
    if channels_first:
        pixel_values = jnp.transpose(pixel_values, (0, 1, 3, 4, 2))
    return pixel_values


class SmolVLMModel(nn.Module):
    """Twin of HF `SmolVLMModel` -> final normed text hidden states [B, T, H] (module docstring).

    __call__(input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None, *,
             position_ids=None, channels_first=False)
    """

    config: SmolVLMConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.vision_model = SiglipVisionModel(cfg.vision, self.dtype)
        self.connector = SmolVLMConnector(cfg, self.dtype)
        self.text_model = DecoderLM(cfg.text, self.dtype)

    def image_features(
        self, pixel_values: jax.Array, pixel_attention_mask: jax.Array | None = None, *, channels_first: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """(features [B * N * P', H] with the real images' rows first, in order; real-image flags [B * N])."""
        cfg = self.config
        images = _images_to_nhwc(jnp.asarray(pixel_values), channels_first)
        b, n, h, w, c = images.shape
        flat = images.reshape(b * n, h, w, c).astype(self.dtype)
        real = jnp.any(flat != 0, axis=(1, 2, 3))
        real = real.at[0].set(real[0] | ~jnp.any(real))  # HF keeps one image when all are padding
        p = cfg.vision.patch_size
        if pixel_attention_mask is None:
            patch_mask = None
        else:
            pm = jnp.asarray(pixel_attention_mask).astype(bool).reshape(b * n, h, w)
            patch_mask = pm[:, : h // p * p, : w // p * p].reshape(b * n, h // p, p, w // p, p).any(axis=(2, 4))
        hidden, _ = self.vision_model(flat, patch_attention_mask=patch_mask)
        feats = self.connector(hidden)  # [b * n, P', H]
        order = jnp.argsort(~real, stable=True)  # real images first, in their order (HF drops the others)
        return feats[order].reshape(-1, feats.shape[-1]), real

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        pixel_attention_mask: jax.Array | None = None,
        *,
        position_ids: jax.Array | None = None,
        channels_first: bool = False,
        return_kv: bool = False,
        extra_embeds: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, tuple]:
        """`return_kv`: also the text model's per-layer (k, v) of the whole prompt (an action head's prefix).
        `extra_embeds` [B, K, H]: embeddings placed after the ids' (a VLA's proprio token; `attention_mask`
        then covers T + K)."""
        cfg = self.config
        input_ids = jnp.asarray(input_ids).astype(jnp.int32)
        if pixel_values is None and self.is_initializing():  # create the tower's parameters too
            v = cfg.vision
            pixel_values = jnp.ones((1, 1, v.image_size, v.image_size, v.num_channels), jnp.float32)
            channels_first = False
        is_image = input_ids == cfg.image_token_id
        # with images, the image-token rows are replaced (embed id 0 there); without, HF embeds the ids as given
        embeds = self.text_model.embed(input_ids if pixel_values is None else jnp.where(is_image, 0, input_ids))
        if pixel_values is not None:
            feats, real = self.image_features(pixel_values, pixel_attention_mask, channels_first=channels_first)
            n_real = concrete_or_none(real)
            if not self.is_initializing():
                rows = None if n_real is None else int(n_real.sum()) * (feats.shape[0] // real.shape[0])
                check_image_token_count(input_ids, cfg.image_token_id, rows, "SmolVLM")
            embeds = merge_image_features(embeds, is_image, feats)
        if extra_embeds is not None:
            embeds = jnp.concatenate([embeds, extra_embeds.astype(embeds.dtype)], axis=1)
        return self.text_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, return_kv=return_kv
        )


class SmolVLMConnector(nn.Module):
    """HF `SmolVLMConnector`: pixel_shuffle, then `modality_projection.proj` (Linear, no bias)."""

    config: SmolVLMConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.modality_projection = _Projection(self.config.text.hidden_size, self.dtype)

    def __call__(self, image_hidden: jax.Array) -> jax.Array:
        return self.modality_projection(pixel_shuffle(image_hidden, self.config.scale_factor))


class _Projection(nn.Module):
    """HF `SmolVLMSimpleMLP`: one bias-free Linear named `proj`."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.features, use_bias=False, dtype=self.dtype, name="proj")(x)


class SmolVLMForConditionalGeneration(nn.Module):
    """Twin of HF `SmolVLMForConditionalGeneration`: `model` (SmolVLMModel) + `lm_head` (absent when tied).

    __call__ takes SmolVLMModel's arguments and returns logits [B, T, vocab];
    `hidden` gives the trunk's output alone.
    """

    config: SmolVLMConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.model = SmolVLMModel(cfg, self.dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.text.vocab_size, use_bias=False, dtype=self.dtype)

    def hidden(self, *args: Any, **kwargs: Any) -> jax.Array:
        return self.model(*args, **kwargs)

    def head(self, hidden: jax.Array) -> jax.Array:
        if self.config.tie_word_embeddings:
            return self.model.text_model.logits(hidden)
        return self.lm_head(hidden)

    def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
        return self.head(self.model(*args, **kwargs))

