"""VLA policies around a decoder language model (Llama / Qwen2 / Gemma twins): `policy.action_head`.

`policy.action_head: {"type": "tokens", "n_bins": 256}` builds a `TokenVLA` (OpenVLA-style
action bins at the end of the vocabulary); `{"type": "flow", "steps": 10, "method":
"flow_noise", ..., "expert": {...}}` a `FlowVLA` (a flow-matching action expert reading the
LM's keys and values, pi0-style); `{"type": "gaussian", "init_log_std": 0.0, "proprio": true}` a
`GaussianVLA` (GPTVLAModel's Gaussian action-chunk head on the prefix's last position, the env's
proprio as one more token). The LM comes from `policy.vla_config.model_path`, a
Hugging Face model directory (`bridge.hf_dir`; a `*ForCausalLM` or a bare `*Model`), or,
without one, from random weights of `policy.vla_config.model_config`, a config.json-style
dict with its `model_type`. A vision-language model (SmolVLM / Idefics3 / PaliGemma, as
`*ForConditionalGeneration`) takes any of the three heads with the env's `rgb` image as its
image tokens; the Gaussian and flow heads add the env's proprio as one token after the instruction
(`"proprio": false` leaves it out) and load their behaviour-cloned parameters from the directory's
head file when it has one (`action_head.safetensors` / `flow_head.safetensors`). The prompt is the env's token observation: `input_ids` /
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

HEAD_TYPES = ("tokens", "flow", "gaussian")
PROMPT_KEYS = (("input_ids", "attention_mask"), ("language", "language_mask"))
_FLOW_KEYS = {"steps", "method", "noise_level", "noise_min", "noise_max", "proprio"}


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


VLM_TYPES = ("smolvlm", "idefics3", "paligemma")


def _vlm_config(config: dict) -> Any:
    from jaxrl_vla.models.vla.paligemma import PaliGemmaConfig
    from jaxrl_vla.models.vla.smolvlm import SmolVLMConfig

    return (PaliGemmaConfig if config.get("model_type") == "paligemma" else SmolVLMConfig).from_hf_dict(config)


def _lm_from(vla_cfg: dict, master: Any) -> tuple[Any, Any, dict | None, dict | None]:
    """(DecoderConfig, VLM config or None, causal-LM / VLM params {"model", ["lm_head"]} or None, trunk or None).

    A vision-language model (model_type smolvlm / idefics3 / paligemma) gives its text config as the
    decoder and its *ForConditionalGeneration parameters."""
    from jaxrl_vla.models.vla.llama import DecoderConfig

    path = vla_cfg.get("model_path")
    if not path:
        config = dict(vla_cfg.get("model_config") or {})
        try:
            if config.get("model_type") in VLM_TYPES:
                vlm = _vlm_config(config)
                return vlm.text, vlm, None, None
            return DecoderConfig.from_hf_dict(config), None, None, None
        except (ConfigError, TypeError, ValueError) as err:
            raise ConfigError(f"policy.vla_config.model_config: {err}") from None
    if not Path(path).is_dir():
        raise ConfigError(f"policy.vla_config.model_path: {path} is not a Hugging Face model directory "
                          "(config.json + *.safetensors), which policy.action_head needs")
    from bridge import hf_dir

    try:
        _, variables, config = hf_dir.load_hf_dir(path, param_dtype=master)
        vlm = _vlm_config(config) if config.get("model_type") in VLM_TYPES else None
        decoder = vlm.text if vlm is not None else DecoderConfig.from_hf_dict(config)
    except (ConfigError, ValueError) as err:
        raise ConfigError(f"policy.vla_config.model_path: {err}") from None
    params = variables["params"]
    if vlm is not None:
        if not any(k in params.get("model", {}) for k in ("text_model", "language_model")):
            raise ConfigError(f"policy.vla_config.model_path: {path} holds a bare {config.get('architectures')}; "
                              "the action tokens need the *ForConditionalGeneration directory (its LM head)")
        return decoder, vlm, params, None
    if "model" in params and "embed_tokens" in params["model"]:
        return decoder, None, params, params["model"]
    if "embed_tokens" in params:
        return decoder, None, None, params
    raise ConfigError(f"policy.vla_config.model_path: {path} holds a {config.get('architectures')}, not a decoder LM")


def _check_vlm_fits(vlm: Any, env: Any, top: int) -> None:
    """The env's image fits the VLM's tower and its token ids leave the image token alone."""
    image = env.observation_space.get("rgb") if isinstance(env.observation_space, dict) else None
    if image is None:
        raise ConfigError("policy.action_head: a vision-language model reads the env's 'rgb' image, which it lacks")
    size, want = tuple(image.shape[:2]), (vlm.vision.image_size, vlm.vision.image_size)
    if size != want:
        raise ConfigError(f"policy.vla_config.model_config.vision_config.image_size: the VLM's tower takes "
                          f"{want[0]}x{want[1]} images, the env's rgb is {size[0]}x{size[1]} (env.image_size)")
    token = getattr(vlm, "image_token_id", None)
    token = getattr(vlm, "image_token_index", None) if token is None else token
    if token is not None and token <= top:
        raise ConfigError(f"policy.vla_config.model_config: the image token id {token} lies among the env's token "
                          f"ids (0..{top})")


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
    decoder, vlm, causal, trunk = _lm_from(policy_cfg["vla_config"], master)
    ids_key, mask_key = prompt_keys(env)
    space = env.observation_space[ids_key]
    top = int(np.max(np.asarray(getattr(space, "high", 0))))
    if vlm is not None:
        _check_vlm_fits(vlm, env, top)
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
                         low, high, input_key=ids_key, mask_key=mask_key, vlm=vlm)
        pretrained = causal if vlm is not None else None if trunk is None else ({"model": trunk} if causal is None else causal)
        if pretrained is not None and vlm is None and causal is None and not decoder.tie_word_embeddings:
            raise ConfigError("policy.vla_config.model_path: a bare decoder without lm_head and with untied "
                              "embeddings: the action tokens need the LM head; give the *ForCausalLM directory")
    elif kind == "gaussian":
        model, pretrained = _gaussian_model(head, decoder, vlm, causal, trunk, env, top, (chunk, action_dim),
                                            ids_key, mask_key)
    else:
        from jaxrl_vla.models.vla.flow_expert import FlowExpertConfig
        from jaxrl_vla.models.vla.flow_vla import FlowVLA
        from jaxrl_vla.models.vla.heads.flow import FlowConfig

        expert = dict(head.pop("expert", {}) or {})
        proprio_dim = _proprio_dim(head.pop("proprio", True), env)
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
        model = FlowVLA(decoder, expert_cfg, FlowConfig.from_dict(head), input_key=ids_key, mask_key=mask_key,
                        vlm=vlm, proprio_dim=proprio_dim)
        pretrained = causal if vlm is not None else trunk
    example = {ids_key: jnp.zeros((1,) + tuple(space.shape), jnp.int32),
               mask_key: jnp.ones((1,) + tuple(env.observation_space[mask_key].shape), jnp.int32)}
    if vlm is not None:
        example["rgb"] = jnp.zeros((1,) + tuple(env.observation_space["rgb"].shape), jnp.uint8)
    if getattr(model, "proprio_dim", 0):
        example["proprio"] = jnp.zeros((1,) + tuple(env.observation_space["proprio"].shape), jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), example)
    variables = jax.tree_util.tree_map(lambda x: x.astype(master) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                       variables)
    if pretrained is not None:
        _check_same_shapes(variables["params"]["lm"], pretrained)
        variables = {**variables, "params": {**variables["params"], "lm": pretrained}}
    if kind == "gaussian":
        variables = _with_head_file(variables, policy_cfg["vla_config"].get("model_path"))
    elif kind == "flow":
        variables = _with_head_file(variables, policy_cfg["vla_config"].get("model_path"), flow=True)
    return model, variables


_GAUSSIAN_KEYS = {"init_log_std", "proprio"}


def _gaussian_model(head: dict, decoder: Any, vlm: Any, causal: dict | None, trunk: dict | None, env: Any, top: int,
                    action_shape: tuple[int, int], ids_key: str, mask_key: str) -> tuple[nn.Module, dict | None]:
    """(GaussianVLA, its pretrained LM parameters or None) for `policy.action_head` type 'gaussian'."""
    from jaxrl_vla.models.vla.gaussian_vla import GaussianVLA

    unknown = sorted(set(head) - _GAUSSIAN_KEYS)
    if unknown:
        raise ConfigError(f"policy.action_head.{unknown[0]}: unknown key for type 'gaussian' "
                          f"({', '.join(sorted(_GAUSSIAN_KEYS))})")
    if top >= decoder.vocab_size:
        raise ConfigError(f"policy.vla_config.model_config.vocab_size ({decoder.vocab_size}): the env's token ids "
                          f"reach {top}")
    init_log_std = head.get("init_log_std", 0.0)
    if isinstance(init_log_std, bool) or not isinstance(init_log_std, (int, float)):
        raise ConfigError(f"policy.action_head.init_log_std must be a number, got {init_log_std!r}")
    proprio_dim = _proprio_dim(head.get("proprio", True), env)
    model = GaussianVLA(decoder, action_shape, proprio_dim, float(init_log_std), input_key=ids_key, mask_key=mask_key,
                        vlm=vlm)
    return model, (causal if vlm is not None else trunk)


def _proprio_dim(use_proprio: Any, env: Any) -> int:
    """The proprio token's input size for `policy.action_head.proprio` (0: none, or the env has no proprio)."""
    if not isinstance(use_proprio, bool):
        raise ConfigError(f"policy.action_head.proprio must be true or false, got {use_proprio!r}")
    space = env.observation_space
    proprio = space.get("proprio") if use_proprio and isinstance(space, dict) else None
    if proprio is not None and len(proprio.shape) != 1:
        raise ConfigError(f"policy.action_head.proprio: the env's proprio must be a vector, it has shape {proprio.shape}")
    return int(np.prod(proprio.shape)) if proprio is not None else 0


def _with_head_file(variables: dict, path: str | None, flow: bool = False) -> dict:
    """`variables` with the Gaussian head from `<model_path>/action_head.safetensors` (`flow`: the flow head from
    `flow_head.safetensors`) when the directory has one (a behaviour-cloned head, `bridge.tiny_smolvlm bc`);
    unchanged otherwise."""
    if flow:
        from jaxrl_vla.models.vla.flow_vla import HEAD_FILE, head_params
    else:
        from jaxrl_vla.models.vla.gaussian_vla import HEAD_FILE, head_params

    file = Path(path) / HEAD_FILE if path else None
    if file is None or not file.is_file():
        return variables
    from safetensors.numpy import load_file

    params = variables["params"]
    fresh = {k: v for k, v in params.items() if k != "lm"}
    try:
        head = head_params(load_file(str(file)), fresh, f"policy.vla_config.model_path: {file}")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return {**variables, "params": {**params, **head}}


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
