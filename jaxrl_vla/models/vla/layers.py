"""Transformer blocks shared by the decoder language-model twins (Llama, Qwen2, Gemma), written once.

Every block mirrors the maths of transformers' torch modules and names its
parameters after their state_dict entries (`q_proj`, `gate_proj`, `scale` for
an RMSNorm `weight`, ...), so `bridge.vla_loading`'s rule table converts
checkpoints leaf by leaf without code paths per family.

Masks. Attention takes a boolean mask broadcastable to [B, Tq, Tk] (True = the
query may see the key). `causal_mask(attention_mask)` builds one from a [B, T]
padding mask (1/True = real token; left or right padding); a query row that
sees no key at all (a left-padding position) attends uniformly over all keys,
as transformers' eager path does: such rows are junk and should never be read.

`block_causal_mask(attention_mask, ar_mask)` builds prefix-LM masks
(bidirectional image + instruction prefix, causal suffix) for `mask=`.

Positions. Rotary embeddings take explicit `position_ids` [B, T] (or [T]).
transformers' model forward uses 0..T-1 whatever the padding; its `generate`
derives them from the mask instead: `position_ids_from_mask` gives that
convention (cumsum - 1, padding positions set to 1).

Key/value prefix (for an action expert that attends to a VLM prefix, pi0
style). `Attention.__call__` returns `(out, (k, v))`, the keys after rotary
embedding and the values of its own tokens, each [B, T, num_kv_heads,
head_dim]. It accepts `kv_prefix=(k_p, v_p)` of shape [B, Tp, num_kv_heads,
head_dim]: keys and values are then `concat([k_p, k], axis=1)`, so the mask's
key axis is Tp + T, prefix first. The prefix must already carry its own rotary
phase (it is used as given).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

KV = tuple[jax.Array, jax.Array]  # (keys after rope, values), each [B, T, num_kv_heads, head_dim]


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU, tanh approximation (torch's gelu(approximate="tanh"), HF "gelu_pytorch_tanh")."""
    return nn.gelu(x, approximate=True)


def gelu_new(x: jax.Array) -> jax.Array:
    """HF "gelu_new": the tanh approximation written out in HF's op order."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * jnp.power(x, 3.0))))


# transformers' ACT2FN names -> JAX functions (only those the twins can match exactly).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_new": gelu_new,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "relu": nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation transformers calls `name`, or a ValueError naming the known ones."""
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not implemented; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ----------------------------------------------------------------------------- masks and positions


def causal_mask(attention_mask: jax.Array | None, batch: int, length: int) -> jax.Array:
    """Boolean [B, T, T]: query t sees key s iff s <= t and key s is a real token."""
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None]
    if attention_mask is None:
        return jnp.broadcast_to(causal, (batch, length, length))
    return causal & attention_mask.astype(bool)[:, None, :]


def block_causal_mask(attention_mask: jax.Array, ar_mask: jax.Array) -> jax.Array:
    """Boolean [B, T, T] for prefix-LM / block-causal attention (the pi0 / PaliGemma layout).

    `ar_mask` [B, T] or [T]: 1 where a token starts a new block, 0 where it joins
    the previous one. A query sees every real key whose block is not later than
    its own: all-zero `ar_mask` is bidirectional, all-one is causal, and
    [0]*P + [1]*S is a bidirectional prefix of P tokens followed by S causal ones.
    Query rows of padding see no key (junk rows, as in `causal_mask`).
    """
    valid = attention_mask.astype(bool)
    blocks = jnp.cumsum(jnp.broadcast_to(jnp.asarray(ar_mask).astype(jnp.int32), valid.shape), axis=-1)
    visible = blocks[:, None, :] <= blocks[:, :, None]
    return visible & valid[:, None, :] & valid[:, :, None]


def position_ids_from_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, T] positions counting real tokens only (transformers' `generate` convention; padding -> 1)."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.where(mask == 0, 1, jnp.cumsum(mask, axis=-1) - 1)


def rope_inv_freq(head_dim: int, theta: float) -> jax.Array:
    """Default rotary inverse frequencies [head_dim // 2] in float32, computed as transformers does."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / jnp.power(jnp.float32(theta), exponents)


def rope_cos_sin(position_ids: jax.Array, head_dim: int, theta: float, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [B, T, head_dim] for `position_ids` [B, T]; angles in float32, then cast to `dtype`."""
    freqs = position_ids.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    """[x1, x2] -> [-x2, x1] on the last axis (HF's convention: halves, not interleaved pairs)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding of x [B, T, heads, head_dim] with cos/sin [B, T, head_dim]."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis, statistics in float32 as transformers does.

    Llama/Qwen2: `scale * normed.astype(x.dtype)` (parameter initialised to 1).
    Gemma (`scale_plus_one`): `(normed * (1 + scale)).astype(x.dtype)` in float32
    (parameter initialised to 0) -- the order differs in bf16, hence the flag.
    """

    epsilon: float = 1e-6
    scale_plus_one: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.scale_plus_one else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        if self.scale_plus_one:
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
        return (scale.astype(self.dtype) * normed.astype(x.dtype).astype(self.dtype)).astype(self.dtype)


def _dense(features: int, use_bias: bool, name: str, dtype: Any, std: float) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, kernel_init=nn.initializers.normal(std), dtype=dtype, name=name)


class Attention(nn.Module):
    """Multi-head self-attention with grouped-query heads and rotary embeddings (HF `q/k/v/o_proj`).

    Call: `(x [B, T, E], cos, sin, mask [B, Tq, Tk] bool, kv_prefix=None) -> (out [B, T, E], (k, v))`,
    see the module docstring for the key/value prefix. Query head h uses
    key/value head h // (num_heads // num_kv_heads), as HF's `repeat_kv`.
    """

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False
    dtype: Any = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, kv_prefix: KV | None = None
    ) -> tuple[jax.Array, KV]:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        batch, length, _ = x.shape
        d, std = self.head_dim, self.init_std
        q = _dense(self.num_heads * d, self.qkv_bias, "q_proj", self.dtype, std)(x).reshape(batch, length, -1, d)
        k = _dense(self.num_kv_heads * d, self.qkv_bias, "k_proj", self.dtype, std)(x).reshape(batch, length, -1, d)
        v = _dense(self.num_kv_heads * d, self.qkv_bias, "v_proj", self.dtype, std)(x).reshape(batch, length, -1, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        own = (k, v)
        if kv_prefix is not None:
            k_p, v_p = kv_prefix
            if k_p.shape[0] != batch or k_p.shape[2:] != k.shape[2:] or v_p.shape != k_p.shape:
                raise ValueError(
                    f"kv_prefix keys {tuple(k_p.shape)} / values {tuple(v_p.shape)} must be "
                    f"[{batch}, Tp, {self.num_kv_heads}, {d}]"
                )
            k = jnp.concatenate([k_p.astype(k.dtype), k], axis=1)
            v = jnp.concatenate([v_p.astype(v.dtype), v], axis=1)
        mask = jnp.asarray(mask)
        if mask.ndim != 3 or mask.shape[1:] != (length, k.shape[1]) or mask.shape[0] not in (1, batch):
            raise ValueError(
                f"attention mask has shape {tuple(mask.shape)}; expected [{batch}, {length}, {k.shape[1]}]"
            )
        out = attend(q, k, v, mask)
        return _dense(self.hidden_size, self.o_bias, "o_proj", self.dtype, std)(out), own


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Scaled dot-product attention as transformers' eager path computes it -> [B, Tq, Hq * D].

    q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D] with Hq a multiple of Hkv (query head h
    uses kv head h // (Hq // Hkv), HF's `repeat_kv`); scores scaled by D ** -0.5 in
    the compute dtype, softmax in float32. `mask` (bool, broadcastable to
    [B, Tq, Tk], True = visible) or None for full bidirectional attention (the
    vision towers). Shared by the decoder and SigLIP attention.
    """
    batch, length, num_heads, d = q.shape
    num_kv = k.shape[2]
    qg = q.reshape(batch, length, num_kv, num_heads // num_kv, d)
    scores = (jnp.einsum("bqhgd,bkhd->bhgqk", qg, k) * jnp.asarray(d**-0.5, q.dtype)).astype(jnp.float32)
    if mask is not None:
        scores = jnp.where(jnp.asarray(mask)[:, None, None], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhgqk,bkhd->bqhgd", weights, v).reshape(batch, length, num_heads * d)


def merge_image_features(embeds: jax.Array, is_image: jax.Array, features: jax.Array) -> jax.Array:
    """`embeds` [B, T, H] with its image-token positions replaced by `features` [N, H], in order.

    The static-shape form of torch's `inputs_embeds.masked_scatter(is_image, features)`
    as the VLMs use it: the k-th True of `is_image` [B, T] (row-major over the whole
    batch) takes row k of `features`. The caller makes the counts agree (HF raises
    when they differ); surplus feature rows are unused.
    """
    flat = is_image.reshape(-1)
    index = jnp.clip(jnp.cumsum(flat.astype(jnp.int32)) - 1, 0, features.shape[0] - 1)
    picked = features.astype(embeds.dtype)[index].reshape(embeds.shape)
    return jnp.where(is_image[..., None], picked, embeds)


class GatedMLP(nn.Module):
    """`down_proj(act(gate_proj(x)) * up_proj(x))`: SwiGLU with "silu", GeGLU with "gelu_pytorch_tanh"."""

    hidden_size: int
    intermediate_size: int
    hidden_act: str = "silu"
    use_bias: bool = False
    dtype: Any = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = activation(self.hidden_act)
        gate = _dense(self.intermediate_size, self.use_bias, "gate_proj", self.dtype, self.init_std)(x)
        up = _dense(self.intermediate_size, self.use_bias, "up_proj", self.dtype, self.init_std)(x)
        return _dense(self.hidden_size, self.use_bias, "down_proj", self.dtype, self.init_std)(act(gate) * up)
