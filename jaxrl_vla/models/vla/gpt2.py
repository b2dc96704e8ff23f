"""A Flax twin of transformers' `GPT2Model` (torch), built to load its weights.

Module names mirror torch (`wte`, `wpe`, `h_3/attn/c_attn`, `h_3/mlp/c_fc`,
`ln_f`, ...). GPT-2's `Conv1D` stores its weight as [in, out], which is already
a Flax `Dense` kernel, so those weights load without a transpose; the fused
query/key/value projection `c_attn` stays fused ([E, 3E], split q|k|v along the
output axis, heads contiguous within each) so that one torch tensor is one Flax
leaf.

Conventions that matter for parity with torch:
- LayerNorm epsilon 1e-5 and the two-pass variance (`use_fast_variance=False`);
- "gelu_new" is the tanh approximation of GELU (torch's default GELU is exact);
- positions are 0..T-1 regardless of padding, as transformers does without a
  cache or explicit `position_ids`;
- masked attention logits are set to the dtype's most negative finite value
  (transformers' eager path); a query row with no visible key then attends
  uniformly. torch's SDPA path returns something else for such rows, so they are
  implementation-defined and should never be read (the VLA always has visible
  prefix tokens).
Dropout is not implemented: RL fine-tuning runs it off, and the torch twin is
built with all dropout probabilities at 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn


def gelu_new(x: jax.Array) -> jax.Array:
    """transformers' "gelu_new" (tanh approximation), written out to match its op order."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * jnp.power(x, 3.0))))


_ACTIVATIONS = {
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "relu": nn.relu,
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """The fields of transformers' `GPT2Config` that shape the network.

    `to_hf_kwargs()` gives the torch config's keyword arguments (dropout off,
    no special tokens), so both twins come from one description.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.activation_function not in _ACTIVATIONS:
            raise ValueError(
                f"activation_function must be one of {sorted(_ACTIVATIONS)}, got {self.activation_function!r}"
            )

    @property
    def inner_dim(self) -> int:
        """Width of the MLP hidden layer (4 * n_embd unless set)."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def to_hf_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `transformers.GPT2Config` describing the same network."""
        return dict(
            dataclasses.asdict(self),
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,
            eos_token_id=None,
            use_cache=False,
        )


GPT2_PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
    "tiny": GPT2Config(n_embd=64, n_layer=2, n_head=4),
}


def gpt2_config(name: str, **overrides: Any) -> GPT2Config:
    """A preset ("gpt2" | "gpt2-medium" | "tiny") with fields replaced by `overrides` (None = keep)."""
    if name not in GPT2_PRESETS:
        raise ValueError(f"unknown GPT-2 preset {name!r}; choose one of {sorted(GPT2_PRESETS)}")
    return dataclasses.replace(GPT2_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def _dense(features: int, name: str, dtype: Any, std: float = 0.02) -> nn.Dense:
    """A GPT-2 Conv1D as a Dense layer (same [in, out] weight layout), N(0, 0.02) init."""
    return nn.Dense(features, kernel_init=nn.initializers.normal(std), dtype=dtype, name=name)


def _layer_norm(config: GPT2Config, name: str | None, dtype: Any) -> nn.LayerNorm:
    """LayerNorm computed like torch's (eps from the config, two-pass variance)."""
    return nn.LayerNorm(epsilon=config.layer_norm_epsilon, use_fast_variance=False, dtype=dtype, name=name)


def attention_bias_mask(attention_mask: jax.Array | None, batch: int, length: int) -> jax.Array:
    """Boolean [B, 1, T, T]: query t may see key s iff s <= t and key s is not padding."""
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
    if attention_mask is None:
        return jnp.broadcast_to(causal, (batch, 1, length, length))
    keys = attention_mask.astype(bool)[:, None, None, :]
    return causal & keys


class GPT2Attention(nn.Module):
    """Causal multi-head self-attention with a fused qkv projection."""

    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        batch, length, embd = x.shape
        head_dim = embd // cfg.n_head
        qkv = _dense(3 * embd, "c_attn", self.dtype)(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        split_heads = lambda t: t.reshape(batch, length, cfg.n_head, head_dim).transpose(0, 2, 1, 3)
        q, k, v = split_heads(q), split_heads(k), split_heads(v)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) * (head_dim**-0.5)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bhkd->bhqd", weights, v).transpose(0, 2, 1, 3).reshape(batch, length, embd)
        std = 0.02 / math.sqrt(2 * cfg.n_layer)
        return _dense(embd, "c_proj", self.dtype, std)(out)


class GPT2MLP(nn.Module):
    """Position-wise feed-forward: c_fc -> activation -> c_proj."""

    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = _ACTIVATIONS[cfg.activation_function](_dense(cfg.inner_dim, "c_fc", self.dtype)(x))
        return _dense(cfg.n_embd, "c_proj", self.dtype, 0.02 / math.sqrt(2 * cfg.n_layer))(h)


class GPT2Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + GPT2Attention(self.config, self.dtype, name="attn")(
            _layer_norm(self.config, "ln_1", self.dtype)(x), mask
        )
        return x + GPT2MLP(self.config, self.dtype, name="mlp")(_layer_norm(self.config, "ln_2", self.dtype)(x))


class GPT2Model(nn.Module):
    """GPT-2 trunk: (input_ids | inputs_embeds, attention_mask) -> last hidden state [B, T, E].

    `inputs_embeds` lets a caller prepend non-text tokens (image and proprio
    embeddings in the VLA) and embed text itself with `embed_tokens`.
    `attention_mask` is [B, T] with 1/True for real tokens.
    """

    config: GPT2Config
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        init = nn.initializers.normal(0.02)
        self.wte = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=init, dtype=self.dtype)
        self.wpe = nn.Embed(cfg.n_positions, cfg.n_embd, embedding_init=init, dtype=self.dtype)
        self.h = [GPT2Block(cfg, self.dtype) for _ in range(cfg.n_layer)]
        self.ln_f = _layer_norm(cfg, None, self.dtype)  # setup names it from the attribute

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings [B, T, E] (the `wte` table), without positions."""
        return self.wte(input_ids.astype(jnp.int32))

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        inputs_embeds: jax.Array | None = None,
    ) -> jax.Array:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = x.shape[:2]
        if length > self.config.n_positions:
            raise ValueError(f"sequence length {length} exceeds n_positions={self.config.n_positions}")
        x = x + self.wpe(jnp.arange(length))[None]
        mask = attention_bias_mask(attention_mask, batch, length)
        for block in self.h:
            x = block(x, mask)
        return self.ln_f(x)
