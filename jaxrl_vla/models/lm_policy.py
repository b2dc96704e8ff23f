"""VLA policies around a decoder language model (Llama / Qwen2 / Gemma twins): `policy.action_head`.

`policy.action_head: {"type": "tokens", "n_bins": 256}` builds a `TokenVLA` (OpenVLA-style
action bins at the end of the vocabulary); `{"type": "flow", "steps": 10, "method":
"flow_noise", ..., "expert": {...}}` a `FlowVLA` (a flow-matching action expert reading the
LM's keys and values, pi0-style). The LM comes from `policy.vla_config.model_path`, a
Hugging Face model directory (`bridge.hf_dir`; a `*ForCausalLM` or a bare `*Model`), or,
without one, from random weights of `policy.vla_config.model_config`, a config.json-style
dict with its `model_type`. The prompt is the env's token observation: `input_ids` /
`attention_mask`, or VLReach-style `language` / `language_mask`. The action chunk is
`policy.action_chunk` steps of the env's action dimension, the bins or flow output span
the env's action bounds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from jaxrl_vla.config import ConfigError

HEAD_TYPES = ("tokens", "flow")
PROMPT_KEYS = (("input_ids", "attention_mask"), ("language", "language_mask"))
_FLOW_KEYS = {"steps", "method", "noise_level", "noise_min", "noise_max"}


def prompt_keys(env: Any) -> tuple[str, str]:
    """The env's (token ids, mask) observation keys, or ConfigError naming what is offered."""
    space = getattr(env, "observation_space", None)
    if isinstance(space, dict):
        for ids, mask in PROMPT_KEYS:
            if ids in space and mask in space:
                return ids, mask
    offered = sorted(space) if isinstance(space, dict) else type(space).__name__
    raise ConfigError(f"policy.action_head: the LM reads a token prompt ({' or '.join(i + ' + ' + m for i, m in PROMPT_KEYS)}); "
                      f"the env offers {offered}")


def _decoder_from(vla_cfg: dict, master: Any) -> tuple[Any, dict | None, dict | None]:
    """(DecoderConfig, causal-LM params {"model", ["lm_head"]} or None, trunk params or None)."""
    from jaxrl_vla.models.vla.llama import DecoderConfig

    path = vla_cfg.get("model_path")
    if not path:
        try:
            return DecoderConfig.from_hf_dict(dict(vla_cfg.get("model_config") or {})), None, None
        except (ConfigError, TypeError, ValueError) as err:
            raise ConfigError(f"policy.vla_config.model_config: {err}") from None
    if not Path(path).is_dir():
        raise ConfigError(f"policy.vla_config.model_path: {path} is not a Hugging Face model directory "
                          "(config.json + *.safetensors), which policy.action_head needs")
    from bridge import hf_dir

    try:
        _, variables, config = hf_dir.load_hf_dir(path, param_dtype=master)
        decoder = DecoderConfig.from_hf_dict(config)
    except (ConfigError, ValueError) as err:
        raise ConfigError(f"policy.vla_config.model_path: {err}") from None
    params = variables["params"]
    if "model" in params and "embed_tokens" in params["model"]:
        return decoder, params, params["model"]
    if "embed_tokens" in params:
        return decoder, None, params
    raise ConfigError(f"policy.vla_config.model_path: {path} holds a {config.get('architectures')}, not a decoder LM")


def _bounds(env: Any) -> tuple[int, Any, Any]:
    space = env.action_space
    shape = tuple(getattr(space, "shape", ()))
    if len(shape) != 1:
        raise ConfigError("policy.action_head: the env's actions must be a continuous vector (a Box of shape [A])")
    low = np.broadcast_to(np.asarray(space.low, np.float32), shape)
    high = np.broadcast_to(np.asarray(space.high, np.float32), shape)
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
        raise ConfigError("policy.action_head: the env's action bounds must be finite (the bins or the flow span them)")
    return shape[0], tuple(float(x) for x in low), tuple(float(x) for x in high)


def build_lm_model(policy_cfg: dict, env: Any, master: Any) -> tuple[nn.Module, dict]:
    """(model, model variables) for `policy.action_head` (module docstring)."""
    head = dict(policy_cfg["action_head"])
    kind = head.pop("type", None)
    if kind not in HEAD_TYPES:
        raise ConfigError(f"policy.action_head.type must be one of {list(HEAD_TYPES)}, got {kind!r}")
    decoder, causal, trunk = _decoder_from(policy_cfg["vla_config"], master)
    ids_key, mask_key = prompt_keys(env)
    space = env.observation_space[ids_key]
    top = int(np.max(np.asarray(getattr(space, "high", 0))))
    action_dim, low, high = _bounds(env)
    chunk = int(policy_cfg.get("action_chunk", 1))
    if kind == "tokens":
        from jaxrl_vla.models.vla.heads.tokens import TokenHeadConfig
        from jaxrl_vla.models.vla.token_vla import TokenVLA

        unknown = sorted(set(head) - {"n_bins"})
        if unknown:
            raise ConfigError(f"policy.action_head.{unknown[0]}: unknown key for type 'tokens' (n_bins)")
        n_bins = head.get("n_bins", 256)
        if top >= decoder.vocab_size - n_bins:
            raise ConfigError(f"policy.action_head.n_bins ({n_bins}): the env's token ids reach {top}, which would "
                              f"collide with the action bins (the last {n_bins} of the LM's {decoder.vocab_size} ids)")
        model = TokenVLA(decoder, TokenHeadConfig(vocab_size=decoder.vocab_size, n_bins=n_bins), (chunk, action_dim),
                         low, high, input_key=ids_key, mask_key=mask_key)
        pretrained = None if trunk is None else ({"model": trunk} if causal is None else causal)
        if pretrained is not None and causal is None and not decoder.tie_word_embeddings:
            raise ConfigError("policy.vla_config.model_path: a bare decoder without lm_head and with untied "
                              "embeddings: the action tokens need the LM head; give the *ForCausalLM directory")
    else:
        from jaxrl_vla.models.vla.flow_expert import FlowExpertConfig
        from jaxrl_vla.models.vla.flow_vla import FlowVLA
        from jaxrl_vla.models.vla.heads.flow import FlowConfig

        expert = dict(head.pop("expert", {}) or {})
        unknown = sorted(set(head) - _FLOW_KEYS)
        if unknown:
            raise ConfigError(f"policy.action_head.{unknown[0]}: unknown key for type 'flow' "
                              f"({', '.join(sorted(_FLOW_KEYS | {'expert'}))})")
        if top >= decoder.vocab_size:
            raise ConfigError(f"policy.vla_config.model_config.vocab_size ({decoder.vocab_size}): the env's token ids "
                              f"reach {top}")
        expert.setdefault("num_layers", decoder.num_hidden_layers)
        expert.setdefault("num_kv_heads", decoder.num_key_value_heads)
        expert.setdefault("head_dim", decoder.head_dim)
        try:
            expert_cfg = FlowExpertConfig(chunk=chunk, action_dim=action_dim, prefix_num_kv_heads=decoder.num_key_value_heads,
                                          prefix_head_dim=decoder.head_dim, **expert)
        except TypeError as err:
            raise ConfigError(f"policy.action_head.expert: {err}") from None
        model = FlowVLA(decoder, expert_cfg, FlowConfig.from_dict(head), input_key=ids_key, mask_key=mask_key)
        pretrained = trunk
    example = {ids_key: jnp.zeros((1,) + tuple(space.shape), jnp.int32),
               mask_key: jnp.ones((1,) + tuple(env.observation_space[mask_key].shape), jnp.int32)}
    variables = model.init(jax.random.PRNGKey(0), example)
    variables = jax.tree_util.tree_map(lambda x: x.astype(master) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                       variables)
    if pretrained is not None:
        _check_same_shapes(variables["params"]["lm"], pretrained)
        variables = {**variables, "params": {**variables["params"], "lm": pretrained}}
    return model, variables


def _check_same_shapes(fresh: Any, loaded: Any) -> None:
    """The loaded LM fills exactly the twin's LM parameters (a named error otherwise)."""
    from flax import traverse_util

    want, got = traverse_util.flatten_dict(fresh, sep="/"), traverse_util.flatten_dict(loaded, sep="/")
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise ConfigError(f"policy.vla_config.model_path: the LM's parameters differ from the twin's "
                          f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for key in sorted(want):
        if tuple(want[key].shape) != tuple(got[key].shape):
            raise ConfigError(f"policy.vla_config.model_path: {key} has shape {tuple(got[key].shape)}, the twin "
                              f"{tuple(want[key].shape)}")
