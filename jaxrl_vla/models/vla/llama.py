"""A Flax twin of transformers' decoder language models: `LlamaModel`, `Qwen2Model` (and `GemmaModel`).

One module, `DecoderLM`, covers the families; what differs between them is
configuration (`DecoderConfig`), filled from a Hugging Face config.json dict by
`DecoderConfig.from_hf_dict`, which dispatches on `model_type` through the
family table `FAMILIES` (Llama and Qwen2 here, Gemma in gemma.py). Qwen2 is
Llama with q/k/v biases; Gemma adds (1 + w) RMSNorm, embeddings scaled by
sqrt(hidden) and GeGLU.

Module names mirror HF's state_dict (`embed_tokens`, `layers_3/self_attn/q_proj`,
`layers_3/mlp/gate_proj`, `layers_3/input_layernorm`, `norm`), so the bridge's
rule table converts checkpoints without per-family code.

Options a family's HF class honours but the twin does not implement are refused
by name in `from_hf_dict` (a `rope_scaling` type, sliding-window or bidirectional
attention, quantisation, ...), never silently dropped. Dropout is not implemented
(the forward is deterministic, as in RL fine-tuning with dropout off).

Positions default to 0..T-1 whatever the padding, as HF's model forward does;
pass `position_ids` (e.g. `layers.position_ids_from_mask(attention_mask)`, the
`generate` convention) for left-padded batches that should count real tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrl_vla.config import ConfigError
from jaxrl_vla.models.vla.layers import ACTIVATIONS, KV, Attention, GatedMLP, RMSNorm, causal_mask, rope_cos_sin


class DecoderConfigError(ConfigError):
    """A config.json option the decoder twin does not implement, or an inconsistent field (a ConfigError)."""


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The fields that shape a Llama-family decoder (names follow HF's config.json).

    attention_bias: biases on q/k/v_proj; attention_out_bias: on o_proj (Llama's
    `attention_bias` sets both, Qwen2 has q/k/v only). norm_scale_plus_one and
    scale_embeddings are Gemma's (1 + w) RMSNorm and sqrt(hidden) embedding scale.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    norm_scale_plus_one: bool = False
    scale_embeddings: bool = False
    initializer_range: float = 0.02
    model_type: str = "llama"

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise DecoderConfigError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}); set head_dim"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise DecoderConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise DecoderConfigError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.hidden_act not in ACTIVATIONS:
            raise DecoderConfigError(
                f"hidden_act {self.hidden_act!r} is not implemented; choose one of {sorted(ACTIVATIONS)}"
            )

    @classmethod
    def from_hf_dict(cls, config: Mapping[str, Any]) -> "DecoderConfig":
        """The twin's config for a Hugging Face config.json dict (or `PretrainedConfig.to_dict()`).

        `model_type` picks the family mapping in `FAMILIES`; options the twin
        does not implement raise DecoderConfigError naming the option.
        """
        model_type = config.get("model_type")
        _load_families()
        if model_type not in FAMILIES:
            raise DecoderConfigError(
                f"model_type {model_type!r} has no decoder twin; supported: {sorted(FAMILIES)}"
            )
        return cls(**FAMILIES[model_type](config))


# model_type -> (config.json dict -> DecoderConfig keyword arguments)
FAMILIES: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {}


def _load_families() -> None:
    """Import the family files that register themselves in FAMILIES (gemma.py imports this file)."""
    from jaxrl_vla.models.vla import gemma  # noqa: F401


def rope_theta_of(config: Mapping[str, Any]) -> float:
    """`rope_theta`, from transformers 5's `rope_parameters` or the older top-level keys.

    Any rope type other than default (linear, dynamic, yarn, llama3, longrope, ...)
    and a partial rotary factor are refused by name.
    """
    params = config.get("rope_parameters") or {}
    legacy = config.get("rope_scaling") or {}
    for source, entry in (("rope_parameters", params), ("rope_scaling", legacy)):
        if not isinstance(entry, Mapping):
            raise DecoderConfigError(f"{source} must be a mapping, got {entry!r}")
        if any(isinstance(v, Mapping) for v in entry.values()):
            raise DecoderConfigError(f"{source}: per-layer-type rope parameters are not implemented")
        rope_type = entry.get("rope_type", entry.get("type", "default"))
        if rope_type not in (None, "default"):
            raise DecoderConfigError(
                f"{source} rope_type {rope_type!r} is not implemented by the decoder twin (only 'default' rotary "
                f"embeddings are)"
            )
        factor = entry.get("partial_rotary_factor", 1.0)
        if factor not in (None, 1, 1.0):
            raise DecoderConfigError(f"{source} partial_rotary_factor={factor} is not implemented (only 1.0)")
    if config.get("partial_rotary_factor", 1.0) not in (None, 1, 1.0):
        raise DecoderConfigError(f"partial_rotary_factor={config['partial_rotary_factor']} is not implemented")
    theta = params.get("rope_theta", config.get("rope_theta", legacy.get("rope_theta", 10000.0)))
    return float(theta)


def refuse_options(config: Mapping[str, Any], refused: Mapping[str, Callable[[Any], bool]]) -> None:
    """Raise DecoderConfigError for the first option whose value the predicate calls unsupported."""
    for key, unsupported in refused.items():
        if key in config and unsupported(config[key]):
            raise DecoderConfigError(f"{key}={config[key]!r} is not implemented by the decoder twin")


# Options refused for every family: the twin computes full-precision, unquantised, causal attention.
COMMON_REFUSED: dict[str, Callable[[Any], bool]] = {
    "quantization_config": lambda v: bool(v),
    "use_bidirectional_attention": lambda v: bool(v),
}


def common_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """The fields every Llama-like config.json spells the same way."""
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
               if k not in config]
    if missing:
        raise DecoderConfigError(f"config.json lacks {missing} (model_type {config.get('model_type')!r})")
    refuse_options(config, COMMON_REFUSED)
    return dict(
        vocab_size=int(config["vocab_size"]),
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]),
        num_hidden_layers=int(config["num_hidden_layers"]),
        num_attention_heads=int(config["num_attention_heads"]),
        num_key_value_heads=config.get("num_key_value_heads"),
        head_dim=config.get("head_dim"),
        hidden_act=str(config.get("hidden_act", "silu")),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta_of(config),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        initializer_range=float(config.get("initializer_range", 0.02)),
        model_type=str(config.get("model_type")),
    )


def llama_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """LlamaConfig: `attention_bias` on q/k/v/o, `mlp_bias` on the MLP."""
    bias = bool(config.get("attention_bias", False))
    return dict(common_fields(config), attention_bias=bias, attention_out_bias=bias,
                mlp_bias=bool(config.get("mlp_bias", False)))


def _sliding_layers(config: Mapping[str, Any]) -> bool:
    return any(t != "full_attention" for t in (config.get("layer_types") or []))


def qwen2_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """Qwen2Config: Llama with biases on q/k/v (not o, not the MLP); sliding windows refused."""
    refuse_options(config, {"use_sliding_window": bool})
    if _sliding_layers(config):
        raise DecoderConfigError(
            f"layer_types {config['layer_types']!r}: sliding_attention layers are not implemented by the decoder twin"
        )
    return dict(common_fields(config), attention_bias=True, attention_out_bias=False, mlp_bias=False)


FAMILIES.update(llama=llama_fields, qwen2=qwen2_fields)


# ----------------------------------------------------------------------------- modules


class DecoderLayer(nn.Module):
    """Pre-norm block: x + self_attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x))."""

    config: DecoderConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, kv_prefix: KV | None = None
    ) -> tuple[jax.Array, KV]:
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.norm_scale_plus_one, self.dtype, name=name)
        attn = Attention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.attention_bias, cfg.attention_out_bias, self.dtype, cfg.initializer_range, name="self_attn",
        )
        h, kv = attn(norm("input_layernorm")(x), cos, sin, mask, kv_prefix)
        x = x + h
        mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias, self.dtype,
                       cfg.initializer_range, name="mlp")
        return x + mlp(norm("post_attention_layernorm")(x)), kv


class DecoderLM(nn.Module):
    """Decoder trunk (twin of HF `LlamaModel` / `Qwen2Model` / `GemmaModel`) -> final normed hidden [B, T, H].

    __call__(input_ids=None, attention_mask=None, *, inputs_embeds=None,
             position_ids=None, mask=None, kv_prefix=None, return_kv=False)

    - exactly one of `input_ids` [B, T] or `inputs_embeds` [B, T, H]
      (`inputs_embeds` is used as given: for Gemma, `embed_tokens` applies the
      sqrt(hidden) scale, as HF 5's scaled embedding module does);
    - `attention_mask` [B, T] (1 = real token) builds a causal + padding mask;
      `mask` (bool [B, T, Tk], True = visible) replaces it, e.g. a prefix-LM
      mask; Tk = T, or Tp + T with `kv_prefix`;
    - `position_ids` [B, T] or [T]; default 0..T-1;
    - `kv_prefix`: one (k, v) per layer, each [B, Tp, kv_heads, head_dim],
      prepended to that layer's keys/values (see layers.py); without `mask`
      the prefix is fully visible and the own tokens causal;
    - `return_kv`: also return this call's per-layer (k, v), e.g. a VLM
      prefix for an action expert: `(hidden, kv_tuple)`.
    """

    config: DecoderConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, embedding_init=nn.initializers.normal(cfg.initializer_range),
            dtype=self.dtype,
        )
        self.layers = [DecoderLayer(cfg, self.dtype) for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.norm_scale_plus_one, self.dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings [B, T, H], with Gemma's sqrt(hidden) scale in the compute dtype."""
        x = self.embed_tokens(input_ids.astype(jnp.int32))
        if self.config.scale_embeddings:
            x = x * jnp.asarray(self.config.hidden_size**0.5, dtype=x.dtype)
        return x

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Logits [B, T, vocab] from the tied embedding table (untied heads live in DecoderForCausalLM)."""
        return self.embed_tokens.attend(hidden.astype(self.dtype))

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        mask: jax.Array | None = None,
        kv_prefix: tuple[KV, ...] | None = None,
        return_kv: bool = False,
    ) -> jax.Array | tuple[jax.Array, tuple[KV, ...]]:
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        batch, length = x.shape[:2]
        if position_ids is None:
            position_ids = jnp.arange(length)
        position_ids = jnp.broadcast_to(jnp.asarray(position_ids), (batch, length))
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, self.dtype)
        if kv_prefix is not None and len(kv_prefix) != cfg.num_hidden_layers:
            raise ValueError(f"kv_prefix has {len(kv_prefix)} layers; the model has {cfg.num_hidden_layers}")
        if mask is None:
            mask = causal_mask(attention_mask, batch, length)
            if kv_prefix is not None:
                prefix_len = kv_prefix[0][0].shape[1]
                mask = jnp.concatenate([jnp.ones((batch, length, prefix_len), bool), mask], axis=-1)
        kvs = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, mask, None if kv_prefix is None else kv_prefix[i])
            kvs.append(kv)
        hidden = self.norm(x)
        return (hidden, tuple(kvs)) if return_kv else hidden


class DecoderForCausalLM(nn.Module):
    """Twin of HF `*ForCausalLM`: `model` (DecoderLM) + `lm_head` (absent when embeddings are tied).

    __call__ takes DecoderLM's arguments and returns logits [B, T, vocab]
    (`(logits, kv)` with return_kv); `hidden` gives the trunk's output alone.
    """

    config: DecoderConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.model = DecoderLM(cfg, self.dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=self.dtype,
                                    kernel_init=nn.initializers.normal(cfg.initializer_range))

    def hidden(self, *args: Any, **kwargs: Any) -> Any:
        """DecoderLM's output (final normed hidden states)."""
        return self.model(*args, **kwargs)

    def head(self, hidden: jax.Array) -> jax.Array:
        """Logits from hidden states (tied: the embedding table transposed)."""
        if self.config.tie_word_embeddings:
            return self.model.logits(hidden)
        return self.lm_head(hidden)

    def __call__(self, *args: Any, return_kv: bool = False, **kwargs: Any) -> Any:
        out = self.model(*args, return_kv=return_kv, **kwargs)
        if return_kv:
            return self.head(out[0]), out[1]
        return self.head(out)
