"""FlowVLA: a decoder or vision-language prefix + a flow-matching action expert + a value head per chunk.

`__call__(obs)` returns `(FlowChainDist, value [B])` as GPTVLAModel returns
`(dist, value)`; one PPO sample is one action chunk (the value is the chunk's,
read from the prefix's last real token). The distribution scores stored chains:
`dist.log_prob(sample_info)` / `dist.log_prob_and_entropy(sample_info)` with
the `FlowSample` the rollout kept; `dist.sample(key)` draws a chunk.

The distribution holds the head's parameters and the prefix keys/values as
arrays, and the head module as a static field, so its field is a pure function
(`module.apply`) that lax.scan can run outside Flax's bound context.

obs: {"input_ids": [B, T] int, "attention_mask": [B, T]} (the prefix tokens), with `vlm` also
"rgb" [B, H, W, 3] uint8, with `proprio_dim` also "proprio" [B, P].

The prefix is built by `token_vla.prompt_hidden`, as GaussianVLA and TokenVLA build theirs:
[image tokens (the VLM's tower + connector), instruction tokens (right-padded), proprio token
(`proprio_proj(proprio)`)]; the expert reads the first `expert.num_layers` layers' keys/values of
that whole sequence (padding masked), the value head the hidden state at its last real position.
The expert's own tokens take positions Tp .. Tp+H-1 (PaliGemma's prefix counts from 1, so its
expert tokens sit one position closer to the prefix; rotary attention only sees the difference).

The parameters that are not the LM's (head, value_head, proprio_proj) travel beside a Hugging Face
directory as `HEAD_FILE`, flattened Flax names -> arrays (`head_state_dict` / `head_params`), which
is how `bridge.tiny_smolvlm bc --head flow` hands a behaviour-cloned expert to fine-tuning.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

from jaxrl_vla.models.vla.flow_expert import FlowExpertConfig
from jaxrl_vla.models.vla.heads.flow import FlowActionHead, FlowConfig, FlowSample, log_prob_and_entropy, sample
from jaxrl_vla.models.vla.llama import DecoderConfig, DecoderLM
from jaxrl_vla.models.vla.token_vla import last_real_index, prompt_hidden, take_rows, vlm_class

HEAD_FILE = "flow_head.safetensors"  # the flow expert, noise head, value head (and proprio_proj) beside an HF dir


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
    """LM prefix (+ VLM image tokens, + proprio token; its first `expert.num_layers` layers' k/v feed the
    expert) + expert + value head."""

    decoder: DecoderConfig
    expert: FlowExpertConfig
    flow: FlowConfig
    dtype: Any = jnp.float32
    input_key: str = "input_ids"  # the observation keys of the prompt's token ids and its mask
    mask_key: str = "attention_mask"
    vlm: Any = None  # SmolVLMConfig | PaliGemmaConfig: image tokens from its tower before the prompt
    proprio_dim: int = 0  # 0: no proprio token
    image_key: str = "rgb"
    proprio_key: str = "proprio"

    @property
    def action_chunk(self) -> int:
        """Actions per inference (the expert's chunk length H): the trainers execute them in order."""
        return int(self.expert.chunk)

    def setup(self) -> None:
        if self.vlm is None:
            self.lm = DecoderLM(self.decoder, self.dtype)
        else:
            if self.vlm.text != self.decoder:
                raise ValueError("FlowVLA: decoder must be the VLM's text config (vlm.text)")
            self.lm = vlm_class(self.vlm)(self.vlm, self.dtype)
        if self.proprio_dim > 0:
            self.proprio_proj = nn.Dense(self.decoder.hidden_size, dtype=self.dtype)
        self.value_head = nn.Dense(1, dtype=jnp.float32, kernel_init=nn.initializers.normal(0.01))
        self.head = FlowActionHead(self.expert, self.flow, self.dtype)

    def prefix(self, obs: Mapping[str, jax.Array]) -> tuple[jax.Array, Any, jax.Array]:
        """(hidden [B, T', H], first-L-layer kv, mask [B, T']) of the whole prefix (`token_vla.prompt_hidden`)."""
        extra = None
        if self.proprio_dim > 0:
            extra = self.proprio_proj(jnp.asarray(obs[self.proprio_key]).astype(self.dtype))[:, None]
        hidden, kv, mask, _ = prompt_hidden(self.lm, self.vlm, obs[self.input_key], obs[self.mask_key],
                                            None if self.vlm is None else obs[self.image_key], extra)
        if len(kv) < self.expert.num_layers:
            raise ValueError(f"expert has {self.expert.num_layers} layers; the VLM only {len(kv)}")
        return hidden, tuple(kv[: self.expert.num_layers]), mask

    def __call__(self, obs: Mapping[str, jax.Array]) -> tuple[FlowChainDist, jax.Array]:
        dist, value, _ = self.forward(obs)
        return dist, value

    def forward(self, obs: Mapping[str, jax.Array]) -> tuple[FlowChainDist, jax.Array, jax.Array]:
        """(dist, value [B], readout [B, E] float32): `__call__` plus the readout (behaviour cloning's probe)."""
        hidden, kv, mask = self.prefix(obs)
        readout = take_rows(hidden, last_real_index(mask))
        if self.vlm is not None and self.is_initializing():  # the VLM's LM head: loaded and exported with it
            self.lm.head(readout[:, None])
        value = self.value_head(readout.astype(jnp.float32))[:, 0]
        batch = mask.shape[0]
        if self.is_initializing():  # create the head's parameters
            self.head(jnp.zeros((batch, self.expert.chunk, self.expert.action_dim)), jnp.ones((batch,)), kv, mask)
        head_params = {"params": self.head.variables["params"]}
        module = FlowActionHead(self.expert, self.flow, self.dtype, parent=None)  # unbound: applied purely
        return FlowChainDist(head_params, kv, mask, module), value, readout.astype(jnp.float32)


def head_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """FlowVLA's own parameters (the model's "params" without "lm") as {"head.expert....kernel": array} (float32)."""
    flat = traverse_util.flatten_dict({k: v for k, v in params.items() if k != "lm"}, sep=".")
    return {key: np.ascontiguousarray(np.asarray(value, np.float32)) for key, value in flat.items()}


def head_params(state_dict: Mapping[str, Any], fresh: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`head_state_dict`'s inverse onto the fresh parameters `fresh` (the model's "params" without "lm"): the
    same keys and shapes, or ValueError naming `where`, the key and both shapes."""
    want = head_state_dict(fresh)
    missing, extra = sorted(set(want) - set(state_dict)), sorted(set(state_dict) - set(want))
    if missing or extra:
        raise ValueError(f"{where}: the flow head's tensors differ from the config's (missing {missing[:3]}, "
                         f"unexpected {extra[:3]})")
    for key, value in want.items():
        if tuple(np.shape(state_dict[key])) != value.shape:
            raise ValueError(f"{where}: {key} has shape {tuple(np.shape(state_dict[key]))}, the head {value.shape}")
    return traverse_util.unflatten_dict({key: jnp.asarray(state_dict[key], jnp.float32) for key in want}, sep=".")
