"""A flow-matching action expert (pi0 / SmolVLA style) reading a VLM prefix's keys and values.

The expert is a small transformer over the H action-chunk tokens (one token per
step of the chunk, A action dims projected in and out). It predicts the flow's
velocity v(x_t, t) [B, H, A] for the noisy chunk x_t at flow time t [B].

Time convention (pi0's): t = 1 is pure Gaussian noise, t = 0 the data; the
interpolant is x_t = t * noise + (1 - t) * actions, the target velocity
noise - actions, and sampling integrates from t = 1 down to t = 0
(see heads/flow.py).

Time embedding (pi0 / SmolVLA): sin/cos of t with periods geometrically spaced in
[min_period, max_period], concatenated with the projected action token and mixed
by `action_time_mlp_in` -> swish -> `action_time_mlp_out`.

Modes (`FlowExpertConfig.mode`):
- "joint" (pi0): every expert layer i is a DecoderLM layer whose queries attend
  jointly to the VLM layer i's prefix keys/values and the expert's own tokens
  (`kv_prefix`), so the expert keeps the VLM's head layout (num_kv_heads,
  head_dim) at a narrower width.
- "cross" (SmolVLA): layers with index % self_attn_every == 0 are self-attention
  over the action tokens; the others are cross-attention whose keys/values are
  the VLM prefix's, linearly mapped from the VLM head layout to the expert's
  (`k_cross`/`v_cross`, only when the layouts differ). Cross-attention reuses the
  shared `Attention` block: the prefix is passed as `kv_prefix` and the mask hides
  the expert's own keys. (SmolVLA's self-attention layers also see the prefix;
  here they do not: the prefix enters through the cross layers only. Mode
  "smolvla" is LeRobot's layout exactly.)
- "smolvla" (LeRobot's SmolVLA, `smolvlm_with_expert.py`): the expert keeps the
  VLM's head layout. Layers with index % self_attn_every == 0 attend to the
  prefix's keys/values of that layer *and* the chunk's own keys, causally among
  the action tokens, queries and own keys at rotary positions n + 0..H-1 (n =
  the number of real prefix tokens); the others are cross-attention whose
  `self_attn.k_proj` / `v_proj` map the layer's (rotary-phased) prefix keys and
  values [kv_heads * head_dim] -> [kv_heads * head_dim], no rotary on them,
  queries at positions 0..H-1. Parameter names follow LeRobot's lm_expert
  (`layers_i/self_attn/{q,k,v,o}_proj`, `mlp`, the two norms, `norm`).

The prefix is one (k, v) per expert layer, each [B, Tp, kv_heads, head_dim]
with rotary phase applied (DecoderLM(..., return_kv=True)); keep the first L VLM
layers by slicing that tuple. The expert's tokens take positions Tp .. Tp+H-1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrl_vla.config import ConfigError
from jaxrl_vla.models.vla.layers import KV, Attention, GatedMLP, RMSNorm, apply_rope, attend, rope_cos_sin
from jaxrl_vla.models.vla.llama import DecoderConfig, DecoderLM

MODES = ("joint", "cross", "smolvla")


@dataclasses.dataclass(frozen=True)
class FlowExpertConfig:
    """Shape of the action expert; `prefix_*` describe the VLM's key/value head layout."""

    chunk: int = 4  # H, steps per action chunk
    action_dim: int = 2  # A
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2  # must equal the number of prefix layers passed
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    prefix_num_kv_heads: int = 2
    prefix_head_dim: int = 16
    mode: str = "joint"
    self_attn_every: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    min_period: float = 4e-3
    max_period: float = 4.0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"flow expert mode {self.mode!r} is unknown; choose one of {list(MODES)}")
        if self.mode in ("joint", "smolvla") and (self.num_kv_heads, self.head_dim) != (self.prefix_num_kv_heads,
                                                                          self.prefix_head_dim):
            raise ConfigError(
                f"{self.mode} flow expert needs the VLM's head layout: num_kv_heads/head_dim "
                f"({self.num_kv_heads}, {self.head_dim}) != prefix ({self.prefix_num_kv_heads}, "
                f"{self.prefix_head_dim}); use mode 'cross' for other layouts"
            )
        if self.self_attn_every < 1:
            raise ConfigError(f"flow expert self_attn_every must be >= 1, got {self.self_attn_every}")
        if self.chunk < 1 or self.action_dim < 1:
            raise ConfigError(f"flow expert chunk ({self.chunk}) and action_dim ({self.action_dim}) must be >= 1")

    def decoder_config(self) -> DecoderConfig:
        """The DecoderLM shape of the joint expert (no vocabulary: it is fed embeddings)."""
        return DecoderConfig(
            vocab_size=1, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim, hidden_act=self.hidden_act,
            rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta, initializer_range=self.initializer_range,
        )


def time_embedding(t: jax.Array, width: int, min_period: float, max_period: float) -> jax.Array:
    """[B] -> [B, width]: sin/cos of 2*pi*t/period, periods geometric in [min_period, max_period] (pi0)."""
    if width % 2:
        raise ValueError(f"time embedding width must be even, got {width}")
    fraction = jnp.linspace(0.0, 1.0, width // 2, dtype=jnp.float32)
    period = min_period * (max_period / min_period) ** fraction
    angle = t.astype(jnp.float32)[:, None] * (2.0 * math.pi / period)[None, :]
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


def _prefix_visibility(prefix_mask: jax.Array | None, batch: int, prefix_len: int) -> jax.Array:
    """Bool [B, Tp]: which prefix keys are real tokens (all when no mask is given)."""
    if prefix_mask is None:
        return jnp.ones((batch, prefix_len), bool)
    return jnp.broadcast_to(prefix_mask.astype(bool), (batch, prefix_len))


class CrossExpertLayer(nn.Module):
    """Pre-norm block: attention (self over the chunk, or cross to the prefix) then a gated MLP."""

    config: FlowExpertConfig
    cross: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, prefix: KV, prefix_vis: jax.Array) -> jax.Array:
        cfg = self.config
        batch, length, _ = x.shape
        attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, dtype=self.dtype,
                         init_std=cfg.initializer_range, name="self_attn")
        h = RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, name="input_layernorm")(x)
        if self.cross:
            k_p, v_p = prefix
            tp = k_p.shape[1]
            if (cfg.num_kv_heads, cfg.head_dim) != (cfg.prefix_num_kv_heads, cfg.prefix_head_dim):
                out = cfg.num_kv_heads * cfg.head_dim
                proj = lambda name, a: nn.Dense(out, dtype=self.dtype, name=name,
                                                kernel_init=nn.initializers.normal(cfg.initializer_range))(
                    a.reshape(batch, tp, -1)).reshape(batch, tp, cfg.num_kv_heads, cfg.head_dim)
                k_p, v_p = proj("k_cross", k_p), proj("v_cross", v_p)
            mask = jnp.concatenate([jnp.broadcast_to(prefix_vis[:, None, :], (batch, length, tp)),
                                    jnp.zeros((batch, length, length), bool)], axis=-1)
            h, _ = attn(h, cos, sin, mask, (k_p, v_p))
        else:
            h, _ = attn(h, cos, sin, jnp.ones((batch, length, length), bool))
        x = x + h
        mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dtype=self.dtype,
                       init_std=cfg.initializer_range, name="mlp")
        return x + mlp(RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, name="post_attention_layernorm")(x))


class SmolVLACrossAttention(nn.Module):
    """LeRobot's cross layer attention: queries from the chunk, keys/values `k_proj`/`v_proj` of the prefix's."""

    config: FlowExpertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, prefix: KV, mask: jax.Array) -> jax.Array:
        cfg = self.config
        batch, length, _ = x.shape
        k_p, v_p = prefix
        tp = k_p.shape[1]
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype, name=name,
                                         kernel_init=nn.initializers.normal(cfg.initializer_range))
        q = apply_rope(dense(cfg.num_heads * cfg.head_dim, "q_proj")(x).reshape(batch, length, -1, cfg.head_dim),
                       cos, sin)
        width = cfg.num_kv_heads * cfg.head_dim
        k = dense(width, "k_proj")(k_p.reshape(batch, tp, -1).astype(self.dtype)).reshape(batch, tp, -1, cfg.head_dim)
        v = dense(width, "v_proj")(v_p.reshape(batch, tp, -1).astype(self.dtype)).reshape(batch, tp, -1, cfg.head_dim)
        return dense(cfg.hidden_size, "o_proj")(attend(q, k, v, mask))


class SmolVLAExpertLayer(nn.Module):
    """One LeRobot lm_expert layer (mode "smolvla"): self-attention over [prefix, chunk] or cross-attention."""

    config: FlowExpertConfig
    cross: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, rope_own: tuple[jax.Array, jax.Array], rope_cross: tuple[jax.Array, jax.Array],
                 prefix: KV, prefix_vis: jax.Array) -> jax.Array:
        cfg = self.config
        batch, length, _ = x.shape
        tp = prefix[0].shape[1]
        h = RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, name="input_layernorm")(x)
        seen = jnp.broadcast_to(prefix_vis[:, None, :], (batch, length, tp))
        if self.cross:
            h = SmolVLACrossAttention(cfg, self.dtype, name="self_attn")(h, *rope_cross, prefix, seen)
        else:
            causal = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch, length, length))
            attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, dtype=self.dtype,
                             init_std=cfg.initializer_range, name="self_attn")
            h, _ = attn(h, *rope_own, jnp.concatenate([seen, causal], axis=-1), prefix)
        x = x + h
        mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dtype=self.dtype,
                       init_std=cfg.initializer_range, name="mlp")
        return x + mlp(RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, name="post_attention_layernorm")(x))


class FlowExpert(nn.Module):
    """Velocity field of the action chunk given the VLM prefix.

    __call__(x_t [B, H, A], t [B], prefix_kv (one (k, v) per layer), prefix_mask [B, Tp] or None)
      -> (velocity [B, H, A], hidden [B, H, hidden_size]); `hidden` feeds e.g. a noise network.
    """

    config: FlowExpertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x_t: jax.Array, t: jax.Array, prefix_kv: tuple[KV, ...], prefix_mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        batch, chunk, adim = x_t.shape
        if (chunk, adim) != (cfg.chunk, cfg.action_dim):
            raise ValueError(f"action chunk has shape [{chunk}, {adim}]; the expert expects "
                             f"[{cfg.chunk}, {cfg.action_dim}] (chunk, action_dim)")
        if len(prefix_kv) != cfg.num_layers:
            raise ValueError(f"prefix_kv has {len(prefix_kv)} layers; the expert has {cfg.num_layers}")
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name,
                                         kernel_init=nn.initializers.normal(cfg.initializer_range))
        act = dense(cfg.hidden_size, "action_in_proj")(x_t.astype(self.dtype))
        temb = time_embedding(t, cfg.hidden_size, cfg.min_period, cfg.max_period).astype(self.dtype)
        h = jnp.concatenate([act, jnp.broadcast_to(temb[:, None, :], act.shape)], axis=-1)
        h = dense(cfg.hidden_size, "action_time_mlp_out")(nn.swish(dense(cfg.hidden_size, "action_time_mlp_in")(h)))
        prefix_len = prefix_kv[0][0].shape[1]
        positions = jnp.broadcast_to(prefix_len + jnp.arange(chunk), (batch, chunk))
        vis = _prefix_visibility(prefix_mask, batch, prefix_len)
        if cfg.mode == "joint":
            mask = jnp.concatenate([jnp.broadcast_to(vis[:, None, :], (batch, chunk, prefix_len)),
                                    jnp.ones((batch, chunk, chunk), bool)], axis=-1)
            hidden = DecoderLM(cfg.decoder_config(), self.dtype, name="expert")(
                inputs_embeds=h, position_ids=positions, mask=mask, kv_prefix=tuple(prefix_kv))
        elif cfg.mode == "smolvla":
            own = jnp.sum(vis, axis=1, dtype=jnp.int32)[:, None] + jnp.arange(chunk)[None]
            rope_own = rope_cos_sin(own, cfg.head_dim, cfg.rope_theta, self.dtype)
            rope_cross = rope_cos_sin(jnp.broadcast_to(jnp.arange(chunk), (batch, chunk)), cfg.head_dim,
                                      cfg.rope_theta, self.dtype)
            for i, kv in enumerate(prefix_kv):
                h = SmolVLAExpertLayer(cfg, cross=i % cfg.self_attn_every != 0, dtype=self.dtype,
                                       name=f"layers_{i}")(h, rope_own, rope_cross, kv, vis)
            hidden = RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, name="norm")(h)
        else:
            cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, self.dtype)
            for i, kv in enumerate(prefix_kv):
                h = CrossExpertLayer(cfg, cross=i % cfg.self_attn_every != 0, dtype=self.dtype,
                                     name=f"layers_{i}")(h, cos, sin, kv, vis)
            hidden = RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, name="norm")(h)
        velocity = dense(cfg.action_dim, "action_out_proj")(hidden).astype(jnp.float32)
        return velocity, hidden
