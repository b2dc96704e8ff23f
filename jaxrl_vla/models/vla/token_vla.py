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
"""

from __future__ import annotations

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

    @property
    def action_chunk(self) -> int:
        return int(self.action_shape[0])

    def setup(self) -> None:
        if self.head.vocab_size != self.decoder.vocab_size:
            raise ValueError(f"action head vocab_size {self.head.vocab_size} != the LM's {self.decoder.vocab_size}")
        self.lm = DecoderForCausalLM(self.decoder, self.dtype)
        self.value_head = nn.Dense(1, dtype=jnp.float32, kernel_init=nn.initializers.normal(0.01))

    def __call__(self, obs: Mapping[str, jax.Array]) -> tuple[TokenChainDist, jax.Array]:
        mask = jnp.asarray(obs[self.mask_key]).astype(bool)
        hidden, kv = self.lm.hidden(obs[self.input_key], mask, return_kv=True)
        last = last_real_index(mask)
        readout = take_rows(hidden, last)
        value = self.value_head(readout.astype(jnp.float32))[:, 0]
        first_logits = self.lm.head(readout[:, None])[:, 0].astype(jnp.float32)
        lm = DecoderForCausalLM(self.decoder, self.dtype, parent=None)  # unbound: applied purely by the dist
        params = {"params": self.lm.variables["params"]}
        action_dim = self.action_shape[1]
        low = jnp.broadcast_to(jnp.asarray(self.low, jnp.float32), (action_dim,))
        high = jnp.broadcast_to(jnp.asarray(self.high, jnp.float32), (action_dim,))
        dist = TokenChainDist(params, kv, mask, first_logits, last, low, high, lm, self.head,
                              tuple(self.action_shape))
        return dist, value
