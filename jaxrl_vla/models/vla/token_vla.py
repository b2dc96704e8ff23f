"""TokenVLA: a decoder LM that writes its actions as bin tokens (RT-2 / OpenVLA), with a value head, for PPO.

`__call__(obs)` returns `(TokenChainDist, value [B])` as FlowVLA does: the prompt
{"input_ids": [B, T], "attention_mask": [B, T]} (right-padded) runs once through
the LM (`DecoderForCausalLM`, its keys/values kept); the H x A action tokens are
then generated autoregressively after it (`heads.tokens.sample`: each step one
LM call over the tokens so far with the prompt as `kv_prefix`). What the rollout
stores is the sampled bins (`Transition.sample_info`), what PPO re-scores is
their teacher-forced log-prob under the current parameters (one LM call over all
D tokens), so the ratio is exact; the env receives the bins' centres.

The value is read from the prompt's last real token by a linear head (a new head
on a pretrained LM; GRPO does without it).

With `vlm` (a `SmolVLMConfig` or `PaliGemmaConfig`) the prompt is a vision-language one:
the image observation (`image_key`, uint8 HWC) goes through the VLM's SigLIP tower and
connector / projector into the image tokens placed before the instruction, exactly as the
VLM twin computes it, and the action tokens follow; the LM is the VLM's text model and head.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxrl_vla.models.vla.heads import tokens
from jaxrl_vla.models.vla.heads.tokens import TokenHeadConfig
from jaxrl_vla.models.vla.llama import DecoderConfig, DecoderForCausalLM


def last_real_index(mask: jax.Array) -> jax.Array:
    """Index [B] of each row's last real token (mask 1) — where a right-padded prompt's readout is."""
    length = mask.shape[1]
    return length - 1 - jnp.argmax(mask[:, ::-1].astype(jnp.int32), axis=1)


def take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[b, index[b]] for x [B, T, ...] -> [B, ...]."""
    return jnp.take_along_axis(x, index.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]


@struct.dataclass
class TokenChainDist:
    """The action-token policy given a prompt: samples bins autoregressively, re-scores stored bins."""

    lm_params: Any
    prefix_kv: Any
    prefix_mask: jax.Array  # [B, T] bool
    first_logits: jax.Array  # [B, V]: the logits for action token 0 (at the prompt's last real token)
    last: jax.Array  # [B] position of the prompt's last real token (action token d sits at last + 1 + d)
    low: jax.Array
    high: jax.Array
    lm: DecoderForCausalLM = struct.field(pytree_node=False)
    head: TokenHeadConfig = struct.field(pytree_node=False)
    action_shape: tuple[int, int] = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.prefix_mask.shape[0],) + tuple(self.action_shape)

    def logits_fn(self, ids: jax.Array) -> jax.Array:
        """Logits [B, D, V] for action tokens 0..D-1 given the prompt and `ids` (causal: position d reads ids < d)."""
        batch, depth = ids.shape
        first = self.first_logits[:, None]
        if depth == 1:
            return first
        follow = ids[:, :-1]
        n = depth - 1
        positions = self.last[:, None] + 1 + jnp.arange(n)[None, :]
        own = jnp.tril(jnp.ones((n, n), bool))
        mask = jnp.concatenate([jnp.broadcast_to(self.prefix_mask[:, None, :], (batch, n, self.prefix_mask.shape[1])),
                                jnp.broadcast_to(own, (batch, n, n))], axis=-1)
        rest = self.lm.apply(self.lm_params, follow, position_ids=positions, mask=mask, kv_prefix=self.prefix_kv)
        return jnp.concatenate([first, rest.astype(first.dtype)], axis=1)

    def _actions(self, bins: jax.Array) -> jax.Array:
        return tokens.bin_centers(bins, self.low, self.high, self.head.n_bins)

    def sample(self, key: jax.Array, deterministic: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(actions [B, H, A] = the bins' centres, log-prob [B], bins [B, H, A] to store)."""
        bins, log_prob, _ = tokens.sample(key, self.logits_fn, self.head, self.shape[0], self.action_shape,
                                          greedy=deterministic)
        return self._actions(bins), log_prob, bins

    def mode(self) -> jax.Array:
        """Greedy decoding's actions [B, H, A]."""
        return self.sample(jax.random.PRNGKey(0), deterministic=True)[0]

    def log_prob_and_entropy(self, bins: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Teacher-forced log-prob [B] of stored bins and the entropy [B] of each token given its prefix, summed."""
        dist = tokens.score(self.logits_fn, bins, self.head)
        return dist.log_prob(bins).sum(-1), dist.entropy().sum(-1)

    def log_prob(self, bins: jax.Array) -> jax.Array:
        return self.log_prob_and_entropy(bins)[0]

    def token_log_probs_and_entropy(self, bins: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Each action token's log-prob [B, H x A] (GRPO's tokens) and the summed entropy [B]."""
        dist = tokens.score(self.logits_fn, bins, self.head)
        per_token = jnp.take_along_axis(jax.nn.log_softmax(dist.bin_logits, axis=-1),
                                        bins.astype(jnp.int32)[..., None], axis=-1)[..., 0]
        return per_token.reshape(per_token.shape[0], -1), dist.entropy().sum(-1)


class TokenVLA(nn.Module):
    """Decoder LM + action tokens + value head; `action_shape` (H, A), actions in [low, high] per dimension."""

    decoder: DecoderConfig
    head: TokenHeadConfig
    action_shape: tuple[int, int]
    low: float | tuple[float, ...] = -1.0
    high: float | tuple[float, ...] = 1.0
    dtype: Any = jnp.float32
    input_key: str = "input_ids"  # the observation keys of the prompt's token ids and its mask
    mask_key: str = "attention_mask"
    vlm: Any = None  # SmolVLMConfig | PaliGemmaConfig: image tokens from its tower before the prompt
    image_key: str = "rgb"

    @property
    def action_chunk(self) -> int:
        return int(self.action_shape[0])

    def setup(self) -> None:
        if self.head.vocab_size != self.decoder.vocab_size:
            raise ValueError(f"action head vocab_size {self.head.vocab_size} != the LM's {self.decoder.vocab_size}")
        if self.vlm is None:
            self.lm = DecoderForCausalLM(self.decoder, self.dtype)
        else:
            if self.vlm.text != self.decoder:
                raise ValueError("TokenVLA: decoder must be the VLM's text config (vlm.text)")
            self.lm = vlm_class(self.vlm)(self.vlm, self.dtype)
        self.value_head = nn.Dense(1, dtype=jnp.float32, kernel_init=nn.initializers.normal(0.01))

    def _prompt(self, obs: Mapping[str, jax.Array]) -> tuple[jax.Array, Any, jax.Array, int]:
        """(hidden [B, T, H], per-layer kv, mask [B, T], position offset) of the whole prompt."""
        return prompt_hidden(self.lm, self.vlm, obs[self.input_key], obs[self.mask_key],
                             None if self.vlm is None else obs[self.image_key])

    def _continuation(self) -> tuple[DecoderForCausalLM, dict]:
        """The unbound causal LM that scores action tokens after the prompt, and its parameters."""
        if self.vlm is None:
            return DecoderForCausalLM(self.decoder, self.dtype, parent=None), {"params": self.lm.variables["params"]}
        params = self.lm.variables["params"]
        text = {"model": params["model"][vlm_text_scope(self.vlm)]}
        if "lm_head" in params:
            text["lm_head"] = params["lm_head"]
        decoder = dataclasses.replace(self.vlm.text, tie_word_embeddings=bool(self.vlm.tie_word_embeddings))
        return DecoderForCausalLM(decoder, self.dtype, parent=None), {"params": text}

    def __call__(self, obs: Mapping[str, jax.Array]) -> tuple[TokenChainDist, jax.Array]:
        hidden, kv, mask, offset = self._prompt(obs)
        last = last_real_index(mask)
        readout = take_rows(hidden, last)
        value = self.value_head(readout.astype(jnp.float32))[:, 0]
        first_logits = self.lm.head(readout[:, None])[:, 0].astype(jnp.float32)
        lm, params = self._continuation()  # unbound: applied purely by the dist
        action_dim = self.action_shape[1]
        low = jnp.broadcast_to(jnp.asarray(self.low, jnp.float32), (action_dim,))
        high = jnp.broadcast_to(jnp.asarray(self.high, jnp.float32), (action_dim,))
        dist = TokenChainDist(params, kv, mask, first_logits, last + offset, low, high, lm, self.head,
                              tuple(self.action_shape))
        return dist, value


def prompt_hidden(lm: nn.Module, vlm: Any, ids: jax.Array, mask: jax.Array, rgb: jax.Array | None = None,
                  extra_embeds: jax.Array | None = None, return_kv: bool = True) -> tuple[jax.Array, Any, jax.Array, int]:
    """(hidden [B, T', H], per-layer kv or None, mask [B, T'], position offset) of a VLA's prefix.

    The one place a prefix-LM VLA builds its sequence (TokenVLA, GaussianVLA): with `vlm` the VLM's image
    tokens (`with_image_tokens`) come first, then the prompt `ids` [B, T] (right-padded, `mask`), then
    `extra_embeds` [B, K, H] if given (GaussianVLA's proprio token), always visible. `lm` is the bound
    VLM twin, or a `DecoderForCausalLM` / `DecoderLM` for a text decoder.
    """
    ids = jnp.asarray(ids).astype(jnp.int32)
    mask = jnp.asarray(mask).astype(bool)
    extra = {} if extra_embeds is None else {"extra_embeds": extra_embeds}
    offset = 0
    if vlm is None:
        trunk = lm.model if isinstance(lm, DecoderForCausalLM) else lm
        if extra_embeds is None:
            out = trunk(ids, mask, return_kv=return_kv)
        else:
            embeds = jnp.concatenate([trunk.embed(ids), extra_embeds.astype(trunk.dtype)], axis=1)
            mask = jnp.concatenate([mask, jnp.ones(extra_embeds.shape[:2], bool)], axis=1)
            out = trunk(inputs_embeds=embeds, attention_mask=mask, return_kv=return_kv)
    else:
        ids, mask, pixels, offset = with_image_tokens(vlm, ids, mask, rgb)
        if extra_embeds is not None:
            mask = jnp.concatenate([mask, jnp.ones(extra_embeds.shape[:2], bool)], axis=1)
        out = lm.hidden(ids, mask, pixels, return_kv=return_kv, **extra)
    hidden, kv = out if return_kv else (out, None)
    return hidden, kv, mask, offset


def vlm_class(vlm: Any) -> type:
    """The *ForConditionalGeneration twin of a VLM config."""
    from jaxrl_vla.models.vla.paligemma import PaliGemmaConfig, PaliGemmaForConditionalGeneration
    from jaxrl_vla.models.vla.smolvlm import SmolVLMConfig, SmolVLMForConditionalGeneration

    if isinstance(vlm, SmolVLMConfig):
        return SmolVLMForConditionalGeneration
    if isinstance(vlm, PaliGemmaConfig):
        return PaliGemmaForConditionalGeneration
    raise TypeError(f"vlm must be a SmolVLMConfig or PaliGemmaConfig, got {type(vlm).__name__}")


def vlm_text_scope(vlm: Any) -> str:
    """Where the VLM twin keeps its text model's parameters (under "model")."""
    from jaxrl_vla.models.vla.smolvlm import SmolVLMConfig

    return "text_model" if isinstance(vlm, SmolVLMConfig) else "language_model"


def with_image_tokens(vlm: Any, ids: jax.Array, mask: jax.Array, rgb: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, int]:
    """(ids with the VLM's image tokens first, their mask, SigLIP-normalised pixels, position offset).

    SigLIP's preprocessing: pixels / 255, then (x - 0.5) / 0.5; SmolVLM takes [B, 1, H, W, C] (one
    image per row), PaliGemma [B, H, W, C] and counts positions from 1.
    """
    from jaxrl_vla.models.vla.smolvlm import SmolVLMConfig

    batch = ids.shape[0]
    pixels = (jnp.asarray(rgb, jnp.float32) / 255.0 - 0.5) / 0.5
    if isinstance(vlm, SmolVLMConfig):
        token, count, pixels, offset = vlm.image_token_id, vlm.image_seq_len, pixels[:, None], 0
    else:
        token, count, offset = vlm.image_token_index, vlm.num_image_tokens, 1
    image_ids = jnp.full((batch, count), token, jnp.int32)
    return (jnp.concatenate([image_ids, ids], axis=1), jnp.concatenate([jnp.ones((batch, count), bool), mask], axis=1),
            pixels, offset)
