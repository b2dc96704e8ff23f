"""GaussianVLA: a prefix-LM VLA (decoder or vision-language model) with a Gaussian action-chunk head, for PPO.

    [image tokens (VLM tower + connector)] [instruction tokens (right-padded)] [proprio token]
        -> the LM (causal, padding masked) -> hidden state at the last position (the readout)
        -> action_mean (Dense, H x A) + log_std (a learned, state-independent [A], GPTVLAModel's head)
        -> value_head (Dense, 1)

The sequence is built by `token_vla.prompt_hidden`, the code TokenVLA builds its prompt with;
the proprio token is `proprio_proj(proprio)`, a linear map of the env's proprio into the LM
width, appended after the padded instruction, so the readout is always the last position and
attends to the image, every real instruction token and the proprio state. Without proprio the
readout is the instruction's last real token. `__call__(obs)` returns `(DiagGaussian, value [B])`
as GPTVLAModel does (mean [B, A], or [B, H, A] for chunks), so the Trainer, PPO and the
exploration-noise options treat it exactly like GPTVLAModel.

The LM's own head (`lm_head` of a VLM directory) is kept in the parameters although the Gaussian
head does not read it, so a fine-tuned VLM exports back as the directory it was loaded from.
The new parameters (proprio_proj, action_mean, log_std, value_head) travel next to that
directory as `HEAD_FILE`, in torch's names and layout (`head_state_dict` / `head_params`), which
is how `bridge.tiny_smolvlm bc` hands a behaviour-cloned head to fine-tuning.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_vla.models.distributions import DiagGaussian
from jaxrl_vla.models.vla.llama import DecoderConfig, DecoderLM
from jaxrl_vla.models.vla.token_vla import last_real_index, prompt_hidden, take_rows, vlm_class

HEAD_FILE = "action_head.safetensors"  # the Gaussian head's parameters beside a Hugging Face directory
HEAD_MODULES = ("proprio_proj", "action_mean", "value_head")  # torch nn.Linear <-> flax nn.Dense


class GaussianVLA(nn.Module):
    """LM prefix (+ VLM image tokens, + proprio token) -> Gaussian action chunk and value; `action_shape` (H, A)."""

    decoder: DecoderConfig
    action_shape: tuple[int, int]
    proprio_dim: int = 0  # 0: no proprio token
    init_log_std: float = 0.0
    dtype: Any = jnp.float32
    input_key: str = "input_ids"  # the observation keys of the prompt's token ids and its mask
    mask_key: str = "attention_mask"
    vlm: Any = None  # SmolVLMConfig | PaliGemmaConfig: image tokens from its tower before the prompt
    image_key: str = "rgb"
    proprio_key: str = "proprio"

    @property
    def action_chunk(self) -> int:
        return int(self.action_shape[0])

    def setup(self) -> None:
        if self.vlm is None:
            self.lm = DecoderLM(self.decoder, self.dtype)
        else:
            if self.vlm.text != self.decoder:
                raise ValueError("GaussianVLA: decoder must be the VLM's text config (vlm.text)")
            self.lm = vlm_class(self.vlm)(self.vlm, self.dtype)
        if self.proprio_dim > 0:
            self.proprio_proj = nn.Dense(self.decoder.hidden_size, dtype=self.dtype)
        chunk, action_dim = self.action_shape
        self.action_mean = nn.Dense(chunk * action_dim, kernel_init=nn.initializers.normal(0.01))
        self.log_std = self.param("log_std", nn.initializers.constant(self.init_log_std), (action_dim,))
        self.value_head = nn.Dense(1, dtype=jnp.float32, kernel_init=nn.initializers.normal(0.01))

    def features(self, obs: Mapping[str, jax.Array]) -> jax.Array:
        """The readout [B, E] (float32): the LM's final hidden state at the sequence's last real position."""
        extra = None
        if self.proprio_dim > 0:
            extra = self.proprio_proj(jnp.asarray(obs[self.proprio_key]).astype(self.dtype))[:, None]
        hidden, _, mask, _ = prompt_hidden(self.lm, self.vlm, obs[self.input_key], obs[self.mask_key],
                                           None if self.vlm is None else obs[self.image_key], extra, return_kv=False)
        readout = take_rows(hidden, last_real_index(mask))
        if self.vlm is not None and self.is_initializing():  # the VLM's LM head: loaded and exported with it
            self.lm.head(readout[:, None])
        return readout.astype(jnp.float32)

    def _heads(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(action means [B, A] or [B, H, A], value [B]) from the readout."""
        chunk, action_dim = self.action_shape
        mean = self.action_mean(h)
        if chunk > 1:
            mean = mean.reshape(mean.shape[0], chunk, action_dim)
        return mean, self.value_head(h)[:, 0]

    def __call__(self, obs: Mapping[str, jax.Array]) -> tuple[DiagGaussian, jax.Array]:
        mean, value = self._heads(self.features(obs))
        return DiagGaussian(mean, self.log_std), value


def head_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """GaussianVLA's own parameters (the model's "params", without "lm") in torch's names and layout:
    `proprio_proj.weight` [E, P], `.bias`, `action_mean.*`, `value_head.*`, `log_std` [A]."""
    out = {"log_std": np.asarray(params["log_std"], np.float32)}
    for name in HEAD_MODULES:
        if name in params:
            out[f"{name}.weight"] = np.ascontiguousarray(np.asarray(params[name]["kernel"], np.float32).T)
            out[f"{name}.bias"] = np.asarray(params[name]["bias"], np.float32)
    return out


def head_params(state_dict: Mapping[str, Any], fresh: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`head_state_dict`'s inverse onto the fresh head parameters `fresh` (the model's "params" without "lm"):
    the same keys and shapes, or ValueError naming `where`, the key and both shapes."""
    want = head_state_dict(fresh)
    missing, extra = sorted(set(want) - set(state_dict)), sorted(set(state_dict) - set(want))
    if missing or extra:
        raise ValueError(f"{where}: the Gaussian head's tensors differ from the config's (missing {missing}, "
                         f"unexpected {extra})")
    for key, value in want.items():
        if tuple(np.shape(state_dict[key])) != value.shape:
            raise ValueError(f"{where}: {key} has shape {tuple(np.shape(state_dict[key]))}, the head {value.shape}")
    out = {"log_std": jnp.asarray(state_dict["log_std"], jnp.float32)}
    for name in HEAD_MODULES:
        if name in fresh:
            out[name] = {"kernel": jnp.asarray(np.asarray(state_dict[f"{name}.weight"]).T, jnp.float32),
                         "bias": jnp.asarray(state_dict[f"{name}.bias"], jnp.float32)}
    return out
