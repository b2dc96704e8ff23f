"""A Flax twin of transformers' `SiglipVisionModel` (the vision tower of PaliGemma, pi0, SigLIP).

Module and parameter paths mirror the torch state_dict, so `bridge`'s rule
table converts it tensor by tensor (Conv2d -> Conv, Linear -> Dense,
LayerNorm -> LayerNorm, Embedding -> Embed):

    embeddings/patch_embedding          Conv, kernel [P, P, C, D], "VALID", stride P
    embeddings/position_embedding       Embed [num_patches, D]
    encoder/layers_N/layer_norm1, self_attn/{q,k,v,out}_proj, layer_norm2, mlp/{fc1,fc2}
    post_layernorm
    head/probe [1, 1, D]                the attention-pooling ("MAP") head, if vision_use_head
    head/attention/in_proj_kernel [D, 3D], in_proj_bias [3D], out_proj   (torch nn.MultiheadAttention)
    head/layernorm, head/mlp/{fc1,fc2}

Input. `pixel_values` hold what the HF image processor gives (rescaled and
normalised floats), but channels last, [B, H, W, C], the layout XLA's
convolutions prefer; pass `channels_first=True` for HF's [B, C, H, W]. An image
whose patch grid differs from the one the position embeddings were trained for
is an error naming both sizes (position interpolation is not implemented).

SmolVLM / Idefics3 towers (`model_type` "smolvlm_vision" / "idefics3_vision",
`navit_positions`): the same blocks without the head, but any patch grid is
taken, its position ids bucketed onto the trained grid (`navit_position_ids`,
bit-exact with transformers), and an optional `patch_attention_mask` marks
padding patches, which no query attends to.

Conventions for parity with torch: LayerNorm with two-pass variance and the
config's `layer_norm_eps`; attention softmax in float32 (transformers' eager
path, `layers.attend`, shared with the decoders), scores scaled by
head_dim ** -0.5; `hidden_act` "gelu_pytorch_tanh" is the tanh approximation. `dtype` is the compute dtype (float32 or bfloat16); params
stay float32 unless `param_dtype` says otherwise. Dropout is not implemented
(`attention_dropout` only acts in torch's training mode, which RL fine-tuning
and the parity tests run without).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_vla.config import ConfigError
from jaxrl_vla.models.vla.layers import ACTIVATIONS, attend


class SiglipConfigError(ConfigError):
    """A SigLIP config.json option the twin does not implement, or an inconsistent field."""


# config.json keys that shape the network (the rest: bookkeeping such as id2label, dtype, architectures).
_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
    "image_size", "patch_size", "hidden_act", "layer_norm_eps", "vision_use_head",
)  # fmt: skip
# Options some SigLIP-like configs carry that this twin does not implement: refused by name.
_REFUSED = {
    "num_patches": "a NaViT-style variable patch count (SigLIP2) is not implemented",
    "interpolate_pos_encoding": "position-embedding interpolation is not implemented",
}
# model_type -> what the type implies: SmolVLM's / Idefics3's tower is SigLIP with NaViT-style positions, no head.
_MODEL_TYPES: dict[str, dict[str, bool]] = {
    "siglip_vision_model": {},
    "smolvlm_vision": {"vision_use_head": False, "navit_positions": True},
    "idefics3_vision": {"vision_use_head": False, "navit_positions": True},
}


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
    """The fields of transformers' `SiglipVisionConfig` that shape the network (its defaults)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True
    # SmolVLM / Idefics3: position ids bucketed from each image's (unpadded) patch grid, see `navit_position_ids`.
    navit_positions: bool = False

    def __post_init__(self) -> None:
        for key in ("image_size", "patch_size"):
            if isinstance(getattr(self, key), bool) or not isinstance(getattr(self, key), int):
                raise SiglipConfigError(
                    f"{key}={getattr(self, key)!r}: only a single int (square images) is implemented"
                )
        if self.hidden_size % self.num_attention_heads:
            raise SiglipConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise SiglipConfigError(f"hidden_act={self.hidden_act!r} is not implemented (one of {sorted(ACTIVATIONS)})")
        if self.image_size < self.patch_size:
            raise SiglipConfigError(f"image_size ({self.image_size}) is smaller than patch_size ({self.patch_size})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        """Patches per image: the rows of the position-embedding table."""
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf_dict(cls, config: Mapping[str, Any]) -> "SiglipVisionConfig":
        """From a SiglipVisionConfig dict (config.json); a full SigLIP config's `vision_config` is taken.

        Unknown bookkeeping keys are ignored; options the twin does not implement
        raise SiglipConfigError naming them.
        """
        if "vision_config" in config and config.get("model_type") != "siglip_vision_model":
            config = config["vision_config"]
        model_type = config.get("model_type", "siglip_vision_model")
        if model_type not in _MODEL_TYPES:
            raise SiglipConfigError(
                f"model_type {model_type!r} is not a SigLIP vision config (expected one of {sorted(_MODEL_TYPES)})"
            )
        for key, why in _REFUSED.items():
            if config.get(key) not in (None, False):
                raise SiglipConfigError(f"{key}={config[key]!r}: {why}")
        return cls(**{**{k: config[k] for k in _FIELDS if k in config}, **_MODEL_TYPES[model_type]})


def _layer_norm(cfg: SiglipVisionConfig, name: str, dtype: Any, param_dtype: Any) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name
    )


class SiglipMLP(nn.Module):
    config: SiglipVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = nn.Dense(cfg.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
        h = ACTIVATIONS[cfg.hidden_act](h)
        return nn.Dense(cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(h)


class SiglipAttention(nn.Module):
    """Bidirectional self-attention with separate biased q/k/v/out projections."""

    config: SiglipVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        b, t, _ = x.shape

        def proj(name: str) -> jax.Array:
            y = nn.Dense(cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)
            return y.reshape(b, t, cfg.num_attention_heads, cfg.head_dim)

        out = attend(proj("q_proj"), proj("k_proj"), proj("v_proj"), mask)
        return nn.Dense(cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="out_proj")(out)


class SiglipEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    config: SiglipVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        x = x + SiglipAttention(cfg, dt, pdt, name="self_attn")(_layer_norm(cfg, "layer_norm1", dt, pdt)(x), mask)
        return x + SiglipMLP(cfg, dt, pdt, name="mlp")(_layer_norm(cfg, "layer_norm2", dt, pdt)(x))


class SiglipEncoder(nn.Module):
    config: SiglipVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        self.layers = [
            SiglipEncoderLayer(self.config, self.dtype, self.param_dtype) for _ in range(self.config.num_hidden_layers)
        ]

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        for layer in self.layers:  # depth, not time: a handful of distinct layers, unrolled once at trace
            x = layer(x, mask)
        return x


_TORCH_VEC = 8  # floats per vector in torch's x86 CPU arange kernel (AVX2 / AVX512 builds)


def _torch_arange_f32(start: float, end: float, step: float) -> np.ndarray:
    """torch.arange(start, end, step) in float32, rounded as torch's CPU kernel rounds it.

    The size is ceil((end - start) / step) in double. Values: the kernel fills two
    vectors of `_TORCH_VEC` lanes per loop step, each lane as float(float(start + step * i0)
    + step * j) with i0 the vector's first index, and the tail as float(start + step * i).
    The last bit matters: SmolVLM buckets patch coordinates that fall exactly on
    these boundaries. (A torch whose vectors are narrower, e.g. NEON, rounds a few
    boundaries differently; this matches x86.)
    """
    size = int(math.ceil((end - start) / step))
    out = np.empty(size, np.float32)
    i = 0
    while i + 2 * _TORCH_VEC <= size:
        for _ in range(2):
            base = np.float64(np.float32(start + step * i))
            out[i : i + _TORCH_VEC] = (base + step * np.arange(_TORCH_VEC, dtype=np.float64)).astype(np.float32)
            i += _TORCH_VEC
    out[i:] = (start + step * np.arange(i, size, dtype=np.float64)).astype(np.float32)
    return out


def navit_position_ids(patch_mask: jax.Array, side: int) -> jax.Array:
    """[B, gh * gw] position ids of SmolVLM's / Idefics3's `VisionEmbeddings` for a patch mask [B, gh, gw].

    Each image's real patch grid (rows/columns of True) is mapped onto the
    side x side table by bucketing fractional coordinates, exactly as transformers
    does in float32 (`torch.bucketize(..., right=True)`); padding patches get 0.
    A full grid of side x side patches gives 0..side**2 - 1.
    """
    mask = patch_mask.astype(bool)
    b, gh, gw = mask.shape
    boundaries = jnp.asarray(_torch_arange_f32(1.0 / side, 1.0, 1.0 / side))

    def buckets(count: jax.Array, length: int) -> jax.Array:
        step = jnp.float32(1.0) / count.astype(jnp.float32)
        coords = jnp.arange(length, dtype=jnp.float32)[None, :] * step[:, None]
        coords = jnp.minimum(coords, jnp.float32(1.0 - 1e-6))
        return jnp.searchsorted(boundaries, coords, side="right").astype(jnp.int32)

    rows = buckets(mask[:, :, 0].sum(axis=1), gh)
    cols = buckets(mask[:, 0, :].sum(axis=1), gw)
    ids = (rows[:, :, None] * side + cols[:, None, :]).reshape(b, gh * gw)
    return jnp.where(mask.reshape(b, gh * gw), ids, 0)


class SiglipVisionEmbeddings(nn.Module):
    config: SiglipVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, patch_mask: jax.Array | None = None) -> jax.Array:
        """[B, H, W, C] pixels -> [B, num_patches, D] patch tokens plus position embeddings."""
        cfg = self.config
        p = cfg.patch_size
        patches = nn.Conv(
            cfg.hidden_size, (p, p), strides=(p, p), padding="VALID",
            dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embedding",
        )(pixel_values.astype(self.dtype))  # fmt: skip
        b, gh, gw, d = patches.shape
        table = nn.Embed(
            cfg.num_patches, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="position_embedding"
        )
        if cfg.navit_positions:
            if patch_mask is None:
                patch_mask = jnp.ones((b, gh, gw), bool)
            return patches.reshape(b, gh * gw, d) + table(navit_position_ids(patch_mask, cfg.image_size // p))
        if gh * gw != cfg.num_patches:
            h, w = pixel_values.shape[1:3]
            raise ValueError(
                f"SigLIP image size {h}x{w} gives {gh}x{gw} patches of {p} pixels, but the position embeddings "
                f"hold {cfg.num_patches} (image_size {cfg.image_size}x{cfg.image_size}); resize the images to "
                f"{cfg.image_size}x{cfg.image_size} (position interpolation is not implemented)"
            )
        return patches.reshape(b, gh * gw, d) + table(jnp.arange(cfg.num_patches))[None]


class SiglipMultiheadAttentionPoolingHead(nn.Module):
    """MAP head: a learned probe attends over the tokens (torch nn.MultiheadAttention), then LN + MLP residual."""

    config: SiglipVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        b, t, d = x.shape
        probe = self.param("probe", nn.initializers.normal(1.0), (1, 1, d), pdt)
        attn = _PoolingAttention(cfg, dt, pdt, name="attention")
        h = attn(jnp.broadcast_to(probe.astype(dt), (b, 1, d)), x)
        h = h + SiglipMLP(cfg, dt, pdt, name="mlp")(_layer_norm(cfg, "layernorm", dt, pdt)(h))
        return h[:, 0]


class _PoolingAttention(nn.Module):
    """torch.nn.MultiheadAttention (batch_first, kdim = vdim = embed_dim): a fused in_proj, biased out_proj.

    `in_proj_kernel` is torch's `in_proj_weight` transposed ([D, 3D], q|k|v along the output axis).
    """

    config: SiglipVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, query: jax.Array, kv: jax.Array) -> jax.Array:
        cfg = self.config
        d, nh, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        kernel = self.param("in_proj_kernel", nn.initializers.xavier_uniform(), (d, 3 * d), self.param_dtype)
        bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * d,), self.param_dtype)
        kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
        b, tq, tk = query.shape[0], query.shape[1], kv.shape[1]
        q = (query @ kernel[:, :d] + bias[:d]).reshape(b, tq, nh, hd)
        k = (kv @ kernel[:, d : 2 * d] + bias[d : 2 * d]).reshape(b, tk, nh, hd)
        v = (kv @ kernel[:, 2 * d :] + bias[2 * d :]).reshape(b, tk, nh, hd)
        out = attend(q, k, v)
        return nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name="out_proj")(out)


class SiglipVisionModel(nn.Module):
    """SigLIP vision tower: returns (last_hidden_state [B, N, D], pooler_output [B, D] or None).

    With `navit_positions` (SmolVLM / Idefics3 towers) any patch grid is taken and
    `patch_attention_mask` [B, gh, gw] (True = real patch) marks padding patches:
    they get position 0 and no query attends to them (their own rows are still
    computed, as in transformers).
    """

    config: SiglipVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, pixel_values: jax.Array, *, channels_first: bool = False, patch_attention_mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        if pixel_values.ndim != 4:
            raise ValueError(f"SigLIP pixel_values must be [B, H, W, C], got shape {pixel_values.shape}")
        channels = pixel_values.shape[1 if channels_first else -1]
        if channels != cfg.num_channels:
            layout = "[B, C, H, W]" if channels_first else "[B, H, W, C]"
            raise ValueError(
                f"SigLIP pixel_values {layout} of shape {tuple(pixel_values.shape)} have "
                f"{channels} channels, config num_channels is {cfg.num_channels}"
            )
        if channels_first:
            pixel_values = jnp.transpose(pixel_values, (0, 2, 3, 1))
        if patch_attention_mask is not None and not cfg.navit_positions:
            raise ValueError("patch_attention_mask needs a SmolVLM/Idefics3-style tower (navit_positions)")
        x = SiglipVisionEmbeddings(cfg, dt, pdt, name="embeddings")(pixel_values, patch_attention_mask)
        mask = None
        if patch_attention_mask is not None:
            mask = patch_attention_mask.reshape(x.shape[0], 1, -1).astype(bool)
        x = SiglipEncoder(cfg, dt, pdt, name="encoder")(x, mask)
        x = _layer_norm(cfg, "post_layernorm", dt, pdt)(x)
        pooled = SiglipMultiheadAttentionPoolingHead(cfg, dt, pdt, name="head")(x) if cfg.vision_use_head else None
        return x, pooled


def dummy_pixels(config: SiglipVisionConfig, batch: int = 1) -> jax.Array:
    """An example NHWC input for `init`."""
    return jnp.zeros((batch, config.image_size, config.image_size, config.num_channels), jnp.float32)
