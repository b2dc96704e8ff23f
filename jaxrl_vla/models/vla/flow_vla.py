"""FlowVLA: a DecoderLM prefix + a flow-matching action expert + a value head per chunk.

`__call__(obs)` returns `(FlowChainDist, value [B])` as GPTVLAModel returns
`(dist, value)`; one PPO sample is one action chunk (the value is the chunk's,
read from the prefix's last real token). The distribution scores stored chains:
`dist.log_prob(sample_info)` / `dist.log_prob_and_entropy(sample_info)` with
the `FlowSample` the rollout kept; `dist.sample(key)` draws a chunk.

The distribution holds the head's parameters and the prefix keys/values as
arrays, and the head module as a static field, so its field is a pure function
(`module.apply`) that lax.scan can run outside Flax's bound context.

obs: {"input_ids": [B, T] int, "attention_mask": [B, T]} (the prefix tokens).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxrl_vla.models.vla.flow_expert import FlowExpertConfig
from jaxrl_vla.models.vla.heads.flow import FlowActionHead, FlowConfig, FlowSample, log_prob_and_entropy, sample
from jaxrl_vla.models.vla.llama import DecoderConfig, DecoderLM


@struct.dataclass
class FlowChainDist:
    """A flow policy's chunk distribution given a prefix: scores stored chains, samples new ones."""

    head_params: Any
    prefix_kv: Any
    prefix_mask: jax.Array
    head: FlowActionHead = struct.field(pytree_node=False)

    def field(self, x: jax.Array, t: jax.Array):
        return self.head.apply(self.head_params, x, t, self.prefix_kv, self.prefix_mask)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.prefix_mask.shape[0], self.head.expert.chunk, self.head.expert.action_dim)

    def sample(self, key: jax.Array, deterministic: bool = False) -> tuple[jax.Array, jax.Array, FlowSample]:
        """(chunk [B, H, A], log-prob [B], FlowSample to store)."""
        return sample(self.field, key, self.shape, self.head.flow, deterministic)

    def mode(self) -> jax.Array:
        """The ODE chunk from a fixed noise (evaluation)."""
        return sample(self.field, jax.random.PRNGKey(0), self.shape, self.head.flow, True)[0]

    def log_prob_and_entropy(self, sample_info: FlowSample) -> tuple[jax.Array, jax.Array]:
        return log_prob_and_entropy(self.field, sample_info, self.head.flow)

    def log_prob(self, sample_info: FlowSample) -> jax.Array:
        return self.log_prob_and_entropy(sample_info)[0]


class FlowVLA(nn.Module):
    """DecoderLM prefix (its first `expert.num_layers` layers' k/v feed the expert) + expert + value head."""

    decoder: DecoderConfig
    expert: FlowExpertConfig
    flow: FlowConfig
    dtype: Any = jnp.float32
    input_key: str = "input_ids"  # the observation keys of the prompt's token ids and its mask
    mask_key: str = "attention_mask"

    @property
    def action_chunk(self) -> int:
        """Actions per inference (the expert's chunk length H): the trainers execute them in order."""
        return int(self.expert.chunk)

    def setup(self) -> None:
        self.lm = DecoderLM(self.decoder, self.dtype)
        self.value_head = nn.Dense(1, dtype=jnp.float32, kernel_init=nn.initializers.normal(0.01))
        self.head = FlowActionHead(self.expert, self.flow, self.dtype)

    def prefix(self, obs: Mapping[str, jax.Array]) -> tuple[jax.Array, Any, jax.Array]:
        """(hidden [B, T, H], first-L-layer kv, mask [B, T])."""
        mask = jnp.asarray(obs[self.mask_key]).astype(bool)
        hidden, kv = self.lm(obs[self.input_key], mask, return_kv=True)
        if len(kv) < self.expert.num_layers:
            raise ValueError(f"expert has {self.expert.num_layers} layers; the VLM only {len(kv)}")
        return hidden, kv[: self.expert.num_layers], mask

    def __call__(self, obs: Mapping[str, jax.Array]) -> tuple[FlowChainDist, jax.Array]:
        hidden, kv, mask = self.prefix(obs)
        length = mask.shape[1]
        last = length - 1 - jnp.argmax(mask[:, ::-1].astype(jnp.int32), axis=1)
        readout = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
        value = self.value_head(readout)[:, 0]
        batch = mask.shape[0]
        if self.is_initializing():  # create the head's parameters
            self.head(jnp.zeros((batch, self.expert.chunk, self.expert.action_dim)), jnp.ones((batch,)), kv, mask)
        head_params = {"params": self.head.variables["params"]}
        module = FlowActionHead(self.expert, self.flow, self.dtype, parent=None)  # unbound: applied purely
        return FlowChainDist(head_params, kv, mask, module), value
