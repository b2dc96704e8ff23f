"""SmolVLA (LeRobot's `VLAFlowMatching`) as a Flax twin, with the flow samplers of heads/flow.py for PPO.

LeRobot's maths (`policies/smolvla/modeling_smolvla.py`, `smolvlm_with_expert.py`), here:

    prefix = [image tokens x sqrt(E)] per camera  (SigLIP tower + pixel-shuffle connector of SmolVLM)
             [language embeddings x sqrt(E)]      (the VLM's embed_tokens)
             [state_proj(pad(normalised state, max_state_dim))]          one token
    block attention (make_att_2d_masks): images + language attend to each other
    (bidirectionally, padding masked), the state token sees them all, nothing sees the state
    token; positions cumsum(pad) - 1. The VLM text model, cut to its first `num_vlm_layers`
    layers, runs over the prefix with LeRobot's own rotary embedding (base 10000, whatever the
    VLM's rope_theta) and gives each layer's keys and values.

    velocity(x_t, t) = action_out_proj(lm_expert(action_time_mlp_out(swish(action_time_mlp_in(
                           [action_in_proj(x_t), sincos(t)])))))  (flow_expert.FlowExpert, mode "smolvla")

The chunk lives in the padded, normalised space [chunk_size, max_action_dim]; the env gets its
first `n_action_steps` steps, the first `action_dim` entries, unnormalised (LeRobot's
postprocessor). Time runs from 1 (noise) to 0 (actions) in `num_steps` Euler steps, as LeRobot's
`euler_integrate` (and heads/flow.py) integrate it.

For PPO (additions, not LeRobot's): a value head on the prefix readout (the VLM's final-normed
hidden state of the state token, the last prefix position) and Flow-Noise's noise network
(`head/noise_head`); `__call__(obs)` returns `(SmolVLAChainDist, value [B])` as FlowVLA does.

Normalisation (`Normaliser`): the state and the actions with LeRobot's MEAN_STD / MIN_MAX
formulas, in the form of the layout their statistics came from (the processor steps of LeRobot
>= 0.4, or the older buffers inside model.safetensors, whose MIN_MAX adds eps differently).
The statistics are static (tuples in the config), as the env's action bounds are for TokenVLA.

obs: {image_key: [B, H, W, 3] uint8, state_key: [B, S], lang_key: [B, L] int, mask_key: [B, L]}.
No torch here; `bridge.lerobot_dir` reads and writes LeRobot directories.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxrl_vla.config import ConfigError
from jaxrl_vla.models.vla.flow_expert import FlowExpertConfig
from jaxrl_vla.models.vla.flow_vla import FlowChainDist
from jaxrl_vla.models.vla.heads.flow import FlowActionHead, FlowConfig, FlowSample
from jaxrl_vla.models.vla.layers import block_causal_mask
from jaxrl_vla.models.vla.smolvlm import SmolVLMConfig, SmolVLMForConditionalGeneration

LEROBOT_ROPE_BASE = 10000.0  # smolvlm_with_expert.apply_rope's max_wavelength (the VLM's rope_theta is not used)
NORM_MODES = ("IDENTITY", "MEAN_STD", "MIN_MAX")
STATS_LAYOUTS = ("processor", "buffers")
STATE_KEY, ACTION_KEY = "observation.state", "action"


def expert_intermediate_size(hidden_dim: int, ffn_dim_multiplier: int = 4, multiple_of: int = 256) -> int:
    """LeRobot's `get_intermediate_size` for the expert's MLP width."""
    hidden_dim = int(2 * hidden_dim / 3)
    hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


@dataclasses.dataclass(frozen=True)
class NormStats:
    """One feature's normalisation: its mode and statistics (mean/std or min/max, as float tuples)."""

    mode: str = "IDENTITY"
    a: tuple[float, ...] = ()  # mean (MEAN_STD) or min (MIN_MAX)
    b: tuple[float, ...] = ()  # std or max


@dataclasses.dataclass(frozen=True)
class Normaliser:
    """LeRobot's normalisation of the state (in) and the actions (out); `layout` picks the formula's form."""

    state: NormStats = NormStats()
    action: NormStats = NormStats()
    layout: str = "processor"
    eps: float = 1e-8

    def normalize_state(self, x: jax.Array) -> jax.Array:
        return _apply(self.state, x, self.layout, self.eps, inverse=False)

    def unnormalize_action(self, x: jax.Array) -> jax.Array:
        return _apply(self.action, x, self.layout, self.eps, inverse=True)

    def normalize_action(self, x: jax.Array) -> jax.Array:
        return _apply(self.action, x, self.layout, self.eps, inverse=False)


def _apply(stats: NormStats, x: jax.Array, layout: str, eps: float, inverse: bool) -> jax.Array:
    """normalize_processor._apply_transform (layout "processor") or the old Normalize/Unnormalize ("buffers")."""
    x = jnp.asarray(x, jnp.float32)
    if stats.mode == "IDENTITY":
        return x
    a, b = jnp.asarray(stats.a, jnp.float32), jnp.asarray(stats.b, jnp.float32)
    if stats.mode == "MEAN_STD":  # both layouts: (x - mean) / (std + eps), x * std + mean
        return x * b + a if inverse else (x - a) / (b + jnp.float32(eps))
    if layout == "buffers":  # old normalize.py: (x - min) / (max - min + 1e-8) * 2 - 1, (x + 1) / 2 * (max - min) + min
        return (x + 1) / 2 * (b - a) + a if inverse else (x - a) / (b - a + jnp.float32(1e-8)) * 2 - 1
    denom = b - a
    denom = jnp.where(denom == 0, jnp.float32(eps), denom)
    return (x + 1) / 2 * denom + a if inverse else 2 * (x - a) / denom - 1


@dataclasses.dataclass(frozen=True)
class SmolVLAConfig:
    """The fields of LeRobot's SmolVLAConfig that shape the network, plus the VLM's config and the normaliser."""

    vlm: SmolVLMConfig  # the VLM as LeRobot builds it (all its text layers; `vlm_twin` cuts them)
    state_dim: int
    action_dim: int
    num_cameras: int = 1  # VISUAL input features
    empty_cameras: int = 0
    chunk_size: int = 50
    n_action_steps: int = 50
    max_state_dim: int = 32
    max_action_dim: int = 32
    num_steps: int = 10
    num_vlm_layers: int = 16
    self_attn_every_n_layers: int = 2
    expert_width_multiplier: float = 0.75
    attention_mode: str = "cross_attn"
    min_period: float = 4e-3
    max_period: float = 4.0
    normaliser: Normaliser = Normaliser()

    def __post_init__(self) -> None:
        text = self.vlm.text
        if not 0 < self.layers <= text.num_hidden_layers:
            raise ConfigError(f"num_vlm_layers={self.num_vlm_layers}: the VLM has {text.num_hidden_layers} text layers")
        if self.state_dim > self.max_state_dim or self.action_dim > self.max_action_dim:
            raise ConfigError(f"state/action dims ({self.state_dim}, {self.action_dim}) exceed max_state_dim/"
                              f"max_action_dim ({self.max_state_dim}, {self.max_action_dim})")
        if not 1 <= self.n_action_steps <= self.chunk_size:
            raise ConfigError(f"n_action_steps={self.n_action_steps} must be in 1..chunk_size ({self.chunk_size})")
        if "cross" in self.attention_mode and self.self_attn_every_n_layers <= 0:
            raise ConfigError(f"self_attn_every_n_layers={self.self_attn_every_n_layers} with attention_mode "
                              f"{self.attention_mode!r} (every layer cross-attention) is not implemented by the twin")

    @property
    def layers(self) -> int:
        """VLM text layers kept (LeRobot: the first num_vlm_layers, all of them when <= 0)."""
        return self.num_vlm_layers if self.num_vlm_layers > 0 else self.vlm.text.num_hidden_layers

    @property
    def vlm_twin(self) -> SmolVLMConfig:
        """The VLM twin's config: text layers cut to `layers`, LeRobot's rotary base."""
        text = dataclasses.replace(self.vlm.text, num_hidden_layers=self.layers, rope_theta=LEROBOT_ROPE_BASE)
        return dataclasses.replace(self.vlm, text=text)

    def expert_config(self) -> FlowExpertConfig:
        """LeRobot's lm_expert: the text config at expert_width_multiplier x the width, the VLM's head layout."""
        text = self.vlm.text
        hidden = int(text.hidden_size * self.expert_width_multiplier)
        every = self.self_attn_every_n_layers if "cross" in self.attention_mode else 1
        return FlowExpertConfig(
            chunk=self.chunk_size, action_dim=self.max_action_dim, hidden_size=hidden,
            intermediate_size=expert_intermediate_size(hidden), num_layers=self.layers,
            num_heads=text.num_attention_heads, num_kv_heads=text.num_key_value_heads, head_dim=text.head_dim,
            prefix_num_kv_heads=text.num_key_value_heads, prefix_head_dim=text.head_dim, mode="smolvla",
            self_attn_every=every, rms_norm_eps=text.rms_norm_eps, rope_theta=LEROBOT_ROPE_BASE,
            hidden_act=text.hidden_act, min_period=self.min_period, max_period=self.max_period,
            initializer_range=text.initializer_range,
        )


@struct.dataclass
class SmolVLAChainDist:
    """The chunk distribution: FlowChainDist over the padded, normalised chain; executed actions unnormalised.

    `sample` / `mode` give the env's chunk [B, n_action_steps, action_dim]; `log_prob_and_entropy`
    re-scores the stored chain (FlowSample, [B, K+1, chunk_size, max_action_dim]).
    """

    chain: FlowChainDist
    steps: int = struct.field(pytree_node=False)
    action_dim: int = struct.field(pytree_node=False)
    normaliser: Normaliser = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.chain.prefix_mask.shape[0], self.steps, self.action_dim)

    def to_env(self, chunk: jax.Array) -> jax.Array:
        """LeRobot's output: the first n_action_steps steps, the first action_dim entries, unnormalised."""
        return self.normaliser.unnormalize_action(chunk[:, : self.steps, : self.action_dim])

    def sample(self, key: jax.Array, deterministic: bool = False) -> tuple[jax.Array, jax.Array, FlowSample]:
        chunk, log_prob, info = self.chain.sample(key, deterministic)
        return self.to_env(chunk), log_prob, info

    def mode(self) -> jax.Array:
        return self.to_env(self.chain.mode())

    def log_prob_and_entropy(self, sample_info: FlowSample) -> tuple[jax.Array, jax.Array]:
        return self.chain.log_prob_and_entropy(sample_info)

    def log_prob(self, sample_info: FlowSample) -> jax.Array:
        return self.chain.log_prob(sample_info)


class _VLMWithExpert(nn.Module):
    """LeRobot's `vlm_with_expert` scope: the SmolVLM twin as `vlm` (its lm_expert lives in the flow head)."""

    config: SmolVLMConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.vlm = SmolVLMForConditionalGeneration(self.config, self.dtype)


class SmolVLA(nn.Module):
    """LeRobot SmolVLA twin + value head + Flow-Noise noise network (module docstring)."""

    config: SmolVLAConfig
    flow: FlowConfig
    dtype: Any = jnp.float32
    image_key: str = "rgb"
    state_key: str = "proprio"
    lang_key: str = "language"
    mask_key: str = "language_mask"

    @property
    def action_chunk(self) -> int:
        return int(self.config.n_action_steps)

    def setup(self) -> None:
        cfg = self.config
        self.vlm_with_expert = _VLMWithExpert(cfg.vlm_twin, self.dtype)
        self.state_proj = nn.Dense(cfg.vlm.text.hidden_size, dtype=self.dtype)
        self.head = FlowActionHead(cfg.expert_config(), self.flow, self.dtype)
        self.value_head = nn.Dense(1, dtype=jnp.float32, kernel_init=nn.initializers.normal(0.01))

    def embed_images(self, rgb: jax.Array) -> jax.Array:
        """[B, H, W, 3] uint8 -> image tokens [B, P', E] x sqrt(E) (LeRobot's embed_image and its scale)."""
        model = self.vlm_with_expert.vlm.model
        pixels = (jnp.asarray(rgb, jnp.float32) / 255.0) * 2.0 - 1.0
        hidden, _ = model.vision_model(pixels.astype(self.dtype))
        emb = model.connector(hidden)
        return emb * jnp.asarray(emb.shape[-1] ** 0.5, emb.dtype)

    def prefix(self, obs: Mapping[str, jax.Array]) -> tuple[jax.Array, tuple, jax.Array]:
        """(final-normed prefix hidden [B, Tp, E], the kept layers' (k, v), pad mask [B, Tp])."""
        cfg = self.config
        text = self.vlm_with_expert.vlm.model.text_model
        img = self.embed_images(obs[self.image_key])
        batch, n_img, width = img.shape
        embs, pads = [img], [jnp.ones((batch, n_img), bool)]
        n_empty = min(cfg.num_cameras - 1, cfg.empty_cameras)
        for _ in range(n_empty):  # LeRobot's missing cameras: masked out, so their rows never reach a real token
            embs.append(jnp.zeros_like(img))
            pads.append(jnp.zeros((batch, n_img), bool))
        ids = jnp.asarray(obs[self.lang_key]).astype(jnp.int32)
        lang = text.embed(ids)
        embs.append(lang * jnp.asarray(math.sqrt(lang.shape[-1]), lang.dtype))
        pads.append(jnp.asarray(obs[self.mask_key]).astype(bool))
        state = jnp.asarray(obs[self.state_key], jnp.float32).reshape(batch, -1)
        state = cfg.normaliser.normalize_state(state)
        state = jnp.pad(state, ((0, 0), (0, cfg.max_state_dim - state.shape[-1])))
        embs.append(self.state_proj(state.astype(self.dtype))[:, None])
        pads.append(jnp.ones((batch, 1), bool))
        embs = jnp.concatenate([e.astype(self.dtype) for e in embs], axis=1)
        pad = jnp.concatenate(pads, axis=1)
        ar = jnp.zeros((pad.shape[1],), jnp.int32).at[-1].set(1)  # only the state token starts a new block
        positions = jnp.cumsum(pad.astype(jnp.int32), axis=1) - 1
        hidden, kv = text(inputs_embeds=embs, position_ids=positions, mask=block_causal_mask(pad, ar), return_kv=True)
        if self.is_initializing():  # the VLM's lm_head (unused by SmolVLA, kept so the directory exports whole)
            self.vlm_with_expert.vlm.head(hidden[:, -1:])
        return hidden, kv, pad

    def features(self, obs: Mapping[str, jax.Array]) -> jax.Array:
        """The readout [B, E]: the state token's final-normed hidden state (it sees the whole prefix)."""
        return self.prefix(obs)[0][:, -1].astype(jnp.float32)

    def __call__(self, obs: Mapping[str, jax.Array]) -> tuple[SmolVLAChainDist, jax.Array]:
        cfg = self.config
        hidden, kv, pad = self.prefix(obs)
        value = self.value_head(hidden[:, -1].astype(jnp.float32))[:, 0]
        expert = cfg.expert_config()
        if self.is_initializing():
            batch = pad.shape[0]
            self.head(jnp.zeros((batch, expert.chunk, expert.action_dim)), jnp.ones((batch,)), kv, pad)
        module = FlowActionHead(expert, self.flow, self.dtype, parent=None)  # unbound: applied purely
        chain = FlowChainDist({"params": self.head.variables["params"]}, kv, pad, module)
        return SmolVLAChainDist(chain, cfg.n_action_steps, cfg.action_dim, cfg.normaliser), value


def velocity(model: SmolVLA, variables: Any, obs: Mapping[str, jax.Array], x_t: jax.Array,
             t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(velocity [B, chunk_size, max_action_dim], noise std) of the twin at (x_t, t): LeRobot's denoise_step."""
    dist, _ = model.apply(variables, obs)
    return dist.chain.field(x_t, t)
