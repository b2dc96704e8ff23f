"""VLAPolicy: any Flax model meeting the VLA model protocol, as a Policy.

The VLA model protocol (the seed's VLAModelInterface, in Flax): a
`flax.linen.Module` whose `__call__(obs)` returns `(dist, value)`, where obs is
a dict with keys like "rgb" [B,H,W,3] uint8, "depth", "proprio" [B,P],
"language" [B,L] int32 and "language_mask" [B,L] bool; `dist` is a
DiagGaussian over actions [B, A] (or [B, H, A] for chunks of H actions) and
value is [B] (or [B, 1]). Models usually also offer the seed's methods
`forward(obs)`, `get_value(obs)` and `evaluate_actions(obs, actions)`; the
built-in `jaxrl_vla.models.vla.GPTVLAModel` does.

VLAPolicy adapts such a model to the Policy contract of
`jaxrl_vla.models.policy` (value [B]; for chunks value [B, H], one per chunk
step, all from the chunk's first observation), so the Trainer, both buffers
and both modes use it exactly like ActorCritic.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from flax import traverse_util

from jaxrl_vla.config import ConfigError
from jaxrl_vla.models.lora_policy import (LoraPolicy, add_adapters, check_modules_to_save, lora_config_from_policy,
                                          lora_trainable_mask)

MODEL = "model"  # the wrapped model's scope name inside the policy's variables
AUXILIARY_HEAD = "auxiliary_head"  # the auxiliary head's scope name (policy.auxiliary_target)


class VLAPolicy(nn.Module):
    """`model` as a Policy; with `auxiliary_dim` > 0 also an auxiliary head (see `auxiliary`)."""

    model: nn.Module
    auxiliary_targets: tuple[str, ...] = ()  # the privileged obs keys the auxiliary head predicts, in order
    auxiliary_dim: int = 0

    @property
    def action_chunk(self) -> int:
        return int(getattr(self.model, "action_chunk", 1))

    def setup(self) -> None:
        if self.auxiliary_dim:
            self.auxiliary_head = nn.Dense(self.auxiliary_dim, name=AUXILIARY_HEAD)

    def __call__(self, obs: Any):
        dist, value = self.model(obs)  # flax names the submodule "model"
        value = value.reshape(value.shape[0]).astype(jnp.float32)
        # a chunk [B, H, A] (a Gaussian's mean, or a flow head's chain-sampled chunk): one value per chunk step
        chunk_shape = dist.mean.shape if hasattr(dist, "mean") else tuple(dist.shape)
        if len(chunk_shape) == 3:
            value = jnp.broadcast_to(value[:, None], chunk_shape[:2])
        return dist, value

    def auxiliary(self, obs: Any) -> jax.Array:
        """The auxiliary head's prediction [B, auxiliary_dim] from the model's readout features.

        A linear probe on `model.features(obs)` (the state the action and value
        heads read), trained against a privileged label of the simulator (e.g.
        where the instructed object is) next to PPO's loss: a direct, dense
        gradient for what the policy must work out before its actions can be
        right. Its parameters live beside the model's ("auxiliary_head"), so
        exporting the model back to torch leaves it out.
        """
        return self.auxiliary_head(self.model.features(obs))

    def with_image_features(self, obs: Any) -> Any:
        """`obs` with the pixels replaced by the vision encoder's output (see `frozen_vision_encoder`)."""
        return self.model.with_image_features(obs)


def frozen_vision_encoder(policy: nn.Module, mask: Any) -> Callable[[Any, Any], Any] | None:
    """`encode(variables, obs) -> obs` that precomputes the image features, or None.

    Given when `policy` is a VLAPolicy whose model offers `with_image_features`
    and whose `vision` parameters are all frozen in `mask` (its BatchNorm
    statistics are never trained): the features of a collected observation
    are then a constant that every epoch of the update can reuse, so the
    rollout stores them instead of the pixels. None otherwise, and without a
    mask (everything trains).
    """
    if not isinstance(policy, VLAPolicy) or not hasattr(policy.model, "with_image_features") or mask is None:
        return None
    vision = mask.get("params", {}).get(MODEL, {}).get("vision")
    if vision is None or any(jax.tree_util.tree_leaves(vision)):
        return None

    def encode(variables: Any, obs: Any) -> Any:
        return policy.apply(variables, obs, method=VLAPolicy.with_image_features)

    return encode


def wrap_variables(model_variables: dict) -> dict:
    """Model variables {collection: tree} -> VLAPolicy variables {collection: {"model": tree}}."""
    return {collection: {MODEL: tree} for collection, tree in model_variables.items()}


def unwrap_variables(policy_variables: dict) -> dict:
    """The inverse of `wrap_variables` (what `bridge.export_to_torch` takes); the auxiliary head is left out,
    LoRA adapters (`policy.lora`) are folded into the kernels they adapt."""
    from jaxrl_vla.models.lora_policy import merged_variables

    return {collection: tree[MODEL] for collection, tree in merged_variables(policy_variables).items()}


def _inner_path(collection_path: str) -> tuple[str, str]:
    """"params/model/language/h_0/..." -> ("params", "language/h_0/..."): the collection and the path
    inside the model (the auxiliary head's parameters read "auxiliary_head/...")."""
    collection, _, rest = collection_path.partition("/")
    return collection, rest.removeprefix(MODEL + "/")


def _under(inner: str, prefix: str) -> bool:
    """Whether parameter path `inner` is `prefix` or lies below it (whole path components only)."""
    return inner == prefix or inner.startswith(prefix.rstrip("/") + "/")


def trainable_mask(variables: dict, freeze_prefixes: list[str]) -> dict:
    """True for parameters the optimiser may change.

    Non-"params" collections (BatchNorm running statistics) are always frozen;
    a "params" leaf is frozen when its path inside the model ("vision/...",
    "language/h_0/...") starts with one of `freeze_prefixes`.
    """
    mask = {}
    for path in traverse_util.flatten_dict(variables, sep="/"):
        collection, inner = _inner_path(path)
        mask[path] = collection == "params" and not any(_under(inner, p) for p in freeze_prefixes)
    return traverse_util.unflatten_dict(mask, sep="/")


def learning_rate_scales(variables: dict, lr_scale: dict[str, float]) -> dict:
    """Per-leaf learning-rate multipliers (a tree shaped like `variables`) from `policy.lr_scale`.

    Why: the step that suits a freshly initialised head is far too large for a
    pretrained transformer whose weights are ~0.01-0.04 (Adam moves every
    weight by about the lr per step, whatever its scale). The longest prefix
    that matches a parameter's path inside the model sets its multiplier, so
    {"language": 0.1, "language/h_3": 1.0} gives the last block the full rate;
    unmatched leaves keep 1.0.
    """
    _check_prefixes(variables, list(lr_scale), "policy.lr_scale")
    by_length = sorted(lr_scale.items(), key=lambda item: len(item[0].rstrip("/")), reverse=True)
    scales = {}
    for path in traverse_util.flatten_dict(variables, sep="/"):
        _, inner = _inner_path(path)
        scales[path] = next((float(scale) for prefix, scale in by_length if _under(inner, prefix)), 1.0)
    return traverse_util.unflatten_dict(scales, sep="/")


def freeze_prefixes(policy_cfg: dict, model_config: dict) -> list[str]:
    prefixes = list(policy_cfg.get("freeze", []))
    if model_config.get("freeze_vision_encoder"):
        prefixes.append("vision")
    if model_config.get("freeze_language_model"):
        prefixes.append("language")
    return prefixes


def _check_action_dim(policy_cfg: dict, model_config: dict, env: Any) -> None:
    env_dim = env.action_space.shape[0] if getattr(env.action_space, "shape", ()) else None
    model_dim = model_config.get("action_dim")
    if env_dim is None:
        raise ConfigError("policy.name 'vla': the env's actions must be continuous (a Box)")
    if model_dim is not None and model_dim != env_dim:
        raise ConfigError(f"policy.vla_config.model_config.action_dim ({model_dim}) != the env's action dimension ({env_dim})")
    if policy_cfg.get("action_dim") is not None and policy_cfg["action_dim"] != env_dim:
        raise ConfigError(f"policy.action_dim ({policy_cfg['action_dim']}) != the env's action dimension ({env_dim})")


# ----------------------------------------------------------------------------- model inputs vs the env


@dataclasses.dataclass(frozen=True)
class InputRequirement:
    """One thing a model config fixes about one observation key, and the config field that fixes it.

    `axis` is an axis of the per-sample observation shape (no batch axis) whose size
    must equal `size` (or be at most `size` with `at_most`); `axis=None` means the
    observation holds token ids, which must all be below `size` (a vocabulary).
    A key is an error to lack only if one of its requirements is `required`.
    """

    field: str
    size: int
    axis: int | None = None
    at_most: bool = False
    required: bool = True  # False: the model also runs without this key (then nothing is checked)


InputSpecFn = Callable[[dict], dict[str, tuple[InputRequirement, ...]]]
# model class name (the last part of vla_config.model_class) -> its inputs: {obs key: requirements}
INPUT_SPECS: dict[str, InputSpecFn] = {}


def register_input_spec(class_name: str, spec_fn: InputSpecFn) -> None:
    """Teach `check_model_inputs` a model family: `spec_fn(model_config) -> {obs_key: requirements}`.

    `spec_fn` may raise ValueError for a model_config it cannot read (reported as a
    ConfigError naming policy.vla_config.model_config). Families without an entry are
    not checked (their first forward pass is the check).
    """
    INPUT_SPECS[class_name] = spec_fn


def gpt_vla_inputs(model_config: dict) -> dict[str, tuple[InputRequirement, ...]]:
    """GPTVLAModel's inputs: square rgb (and depth) of image_size, proprio of proprio_dim, language ids
    below vocab_size, at most max_instruction_length of them."""
    from jaxrl_vla.models.vla import VLAModelConfig

    cfg = VLAModelConfig.from_dict(model_config)
    image = (InputRequirement("image_size", cfg.image_size, 0), InputRequirement("image_size", cfg.image_size, 1))
    spec = {"rgb": image,
            # without "language" the sequence is just the prefix tokens (gpt_vla.py): optional
            "language": (InputRequirement("vocab_size", cfg.vocab_size, required=False),
                         InputRequirement("max_instruction_length", cfg.max_instruction_length, 0, at_most=True,
                                          required=False))}
    if cfg.use_depth:
        spec["depth"] = image
    if cfg.proprio_dim > 0:
        spec["proprio"] = (InputRequirement("proprio_dim", cfg.proprio_dim, 0),)
    return spec


register_input_spec("GPTVLAModel", gpt_vla_inputs)


def check_model_inputs(model_class: str, model_config: dict, env: Any) -> None:
    """ConfigError naming the model field, the observation key and both sizes when the model config does not
    fit the env's observation space; run before any weight is loaded or anything is written.

    Why: a vocab_size below the env's token ids makes the embedding lookup clamp silently
    (and the run trains to NaN), and an image_size or proprio_dim that differs ends in a
    raw Flax shape traceback from the first forward pass.
    """
    spec_fn = INPUT_SPECS.get(str(model_class).rsplit(".", 1)[-1])
    space = getattr(env, "observation_space", None)
    if spec_fn is None or not isinstance(space, dict):
        return
    try:
        spec = spec_fn(model_config)
    except ValueError as err:
        raise ConfigError(f"policy.vla_config.model_config: {err}") from None
    prefix = "policy.vla_config.model_config"
    for key, requirements in spec.items():
        if key not in space:
            if not any(r.required for r in requirements):
                continue
            fields = ", ".join(sorted({f"{r.field}={r.size}" for r in requirements}))
            raise ConfigError(f"{prefix}: the model reads observation {key!r} ({fields}), which the env does not "
                              f"offer (it offers {', '.join(sorted(space))})")
        shape = tuple(getattr(space[key], "shape", ()))
        for req in requirements:
            if req.axis is None:
                high = _max_token_id(space[key])
                if high is not None and high >= req.size:
                    raise ConfigError(f"{prefix}.{req.field} ({req.size}) is too small for observation {key!r}: the "
                                      f"env's token ids go up to {high} (needs {req.field} >= {high + 1})")
                continue
            if req.axis >= len(shape):
                raise ConfigError(f"{prefix}.{req.field} ({req.size}): observation {key!r} has shape {shape}, "
                                  f"with no axis {req.axis} for it to size")
            got = shape[req.axis]
            if got > req.size if req.at_most else got != req.size:
                relation = "is below" if req.at_most else "!="
                raise ConfigError(f"{prefix}.{req.field} ({req.size}) {relation} observation {key!r}'s size {got} "
                                  f"(its shape is {shape})")


def _max_token_id(box: Any) -> int | None:
    """The largest id an integer observation can hold (its Box's high), or None if unbounded or not integer."""
    high = getattr(box, "high", None)
    dtype = getattr(box, "dtype", None)
    if high is None or dtype is None or not np.issubdtype(np.dtype(dtype), np.integer):
        return None
    high = np.max(np.asarray(high, np.float64))
    return int(high) if np.isfinite(high) else None


def _check_prefixes(variables: dict, prefixes: list[str], field: str) -> None:
    """ConfigError naming `field` and the prefix when a prefix matches no parameter (a typo would
    otherwise freeze or rescale nothing, silently)."""
    inner = [_inner_path(path)[1] for path in traverse_util.flatten_dict(variables, sep="/") if path.startswith("params/")]
    for prefix in prefixes:
        if not any(_under(p, prefix) for p in inner):
            tops = sorted({p.split("/")[0] for p in inner})
            raise ConfigError(f"{field}: {prefix!r} matches no parameter; top-level paths: {', '.join(tops)}")


def master_weight_dtype(policy_cfg: dict) -> Any:
    """The dtype of the trained copy of the weights (and so of Adam's moments): float32 for every
    `policy.dtype` offered ("float32", and "bfloat16", which only computes in bf16).

    Why not the checkpoint's dtype: a float16/bfloat16 checkpoint kept as is would train
    half-precision master weights, whose updates below about 2^-8 of a weight round to
    nothing, although the config asked for float32.
    """
    return _MASTER_DTYPES[policy_cfg.get("dtype") or "float32"]


# policy.dtype (the trunks' compute dtype) -> the dtype of the master weights and optimiser state
_MASTER_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.float32}


def build_vla_policy(policy_cfg: dict, env: Any, value_head_optional: bool = False) -> tuple[VLAPolicy, dict, dict | None]:
    """(policy, initial variables, trainable mask) from the seed's `policy` section.

    With `vla_config.model_path` the weights come from the torch checkpoint via
    `bridge.load_vla_model`; without it the Flax twin starts from random
    weights (the from-scratch baseline). `policy.dtype` "bfloat16" runs the
    trunks in bf16 while keeping float32 master weights and heads.
    `value_head_optional` (critic-free GRPO): the checkpoint may lack the value head.
    """
    vla = policy_cfg["vla_config"]
    model_config = dict(vla.get("model_config") or {})
    dtype = jnp.bfloat16 if policy_cfg.get("dtype") == "bfloat16" else jnp.float32
    master = master_weight_dtype(policy_cfg)
    if policy_cfg.get("action_head"):  # a decoder LM with a token or flow head (models.lm_policy)
        from jaxrl_vla.models.lm_policy import build_lm_model

        model, variables = build_lm_model(policy_cfg, env, master)
        return _finish_policy(policy_cfg, model_config, env, model, variables, dtype)
    if vla.get("model_path") and _is_lerobot_dir(vla["model_path"]):  # a LeRobot policy directory (SmolVLA)
        from bridge.lerobot_dir import build_lerobot_model

        model, variables = build_lerobot_model(policy_cfg, env, master)
        return _finish_policy(policy_cfg, {}, env, model, variables, dtype)
    if policy_cfg.get("action_chunk", 1) != 1:
        model_config.setdefault("action_chunk", policy_cfg["action_chunk"])
        if model_config["action_chunk"] != policy_cfg["action_chunk"]:
            raise ConfigError("policy.action_chunk differs from policy.vla_config.model_config.action_chunk")
    _check_action_dim(policy_cfg, model_config, env)
    check_model_inputs(vla["model_class"], model_config, env)
    path = vla.get("model_path")
    if path:
        from pathlib import Path

        if Path(path).is_dir():  # a Hugging Face model directory: the architecture comes from its config.json
            from bridge import hf_dir

            try:
                model, variables, _ = hf_dir.load_hf_dir(path, param_dtype=master)
            except ValueError as err:
                raise ConfigError(f"policy.vla_config.model_path: {err}") from None
        elif not Path(path).is_file():
            hint = f"; create it with: {vla['make_checkpoint']}" if vla.get("make_checkpoint") else ""
            raise ConfigError(f"policy.vla_config.model_path: {path} does not exist{hint}")
        else:
            import bridge

            try:
                model, variables = bridge.load_vla_model(path, vla["model_class"], model_config, param_dtype=master,
                                                         value_head_optional=value_head_optional)
            except (ValueError, ImportError) as err:
                raise ConfigError(f"policy.vla_config: {err}") from None
    else:
        model, variables = _random_twin(vla["model_class"], model_config)
    return _finish_policy(policy_cfg, model_config, env, model, variables, dtype)


def _is_lerobot_dir(path: str) -> bool:
    """A directory whose config.json is LeRobot's (a policy `type`, no `model_type`): bridge.lerobot_dir reads it."""
    from bridge.lerobot_dir import is_lerobot_dir

    return is_lerobot_dir(path)


def _finish_policy(policy_cfg: dict, model_config: dict, env: Any, model: nn.Module, variables: dict,
                   dtype: Any) -> tuple[Any, dict, dict | None]:
    """The policy around `model`: compute dtype, auxiliary head, freezing or LoRA, and the trainable mask."""
    if dtype != jnp.float32:
        model = model.clone(dtype=dtype)
    policy = VLAPolicy(model)
    variables = wrap_variables(variables)
    targets = auxiliary_targets(policy_cfg)
    if targets:
        policy, variables = add_auxiliary_head(policy, variables, targets, env)
    prefixes = freeze_prefixes(policy_cfg, model_config)
    _check_prefixes(variables, prefixes, "policy.freeze")
    lora = lora_config_from_policy(policy_cfg)
    if lora is not None:  # frozen base + adapters: only the adapters and modules_to_save train
        if prefixes:
            raise ConfigError("policy.freeze: with policy.lora the whole base is frozen; name what trains in "
                              "policy.lora.modules_to_save instead")
        lora_cfg, modules_to_save = lora
        check_modules_to_save(variables, modules_to_save)
        variables = add_adapters(variables, lora_cfg, jax.random.PRNGKey(0x10A))
        return LoraPolicy(policy, lora_cfg), variables, lora_trainable_mask(variables, modules_to_save)
    return policy, variables, trainable_mask(variables, prefixes)


def auxiliary_targets(policy_cfg: dict) -> tuple[str, ...]:
    """`policy.auxiliary_target` (null, one key or a list of keys) as a tuple of keys."""
    target = policy_cfg.get("auxiliary_target")
    if not target:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def add_auxiliary_head(policy: VLAPolicy, variables: dict, targets: tuple[str, ...], env: Any) -> tuple[VLAPolicy, dict]:
    """`policy` with an auxiliary head predicting the env's privileged obs `targets`, and its fresh parameters.

    The head's width is the targets' total size (their entries concatenated in
    order); its input is the model's readout (`features`), whose width is found
    by tracing, not assumed.
    """
    from jaxrl_vla.envs.base import PRIVILEGED_PREFIX

    space = getattr(env, "observation_space", None)
    if len(set(targets)) != len(targets):
        raise ConfigError(f"policy.auxiliary_target: {list(targets)} names a key twice")
    for target in targets:
        if not target.startswith(PRIVILEGED_PREFIX):
            raise ConfigError(f"policy.auxiliary_target: {target!r} is not a privileged observation key "
                              f"(those start with {PRIVILEGED_PREFIX!r}: a policy input cannot be a training label)")
        if not isinstance(space, dict) or target not in space:
            offered = sorted(k for k in space if k.startswith(PRIVILEGED_PREFIX)) if isinstance(space, dict) else []
            hint = (f"; it offers {', '.join(offered)}" if offered else
                    " (VLReach-v0 offers privileged_target_xy with env.privileged_target: true and "
                    "privileged_waypoint_xy with env.privileged_waypoint: true)")
            raise ConfigError(f"policy.auxiliary_target: the env has no observation {target!r}{hint}")
    if not hasattr(policy.model, "features"):
        raise ConfigError(f"policy.auxiliary_target: {type(policy.model).__name__} has no features(obs) method "
                          "(the readout the auxiliary head reads)")
    dim = sum(int(np.prod(space[target].shape)) for target in targets)
    from jaxrl_vla.models.policy import zeros_like_obs

    readout = jax.eval_shape(lambda v, o: policy.apply(v, o, method=lambda m, x: m.model.features(x)),
                             variables, zeros_like_obs(space))
    # zero weights: the head starts predicting 0 and sends no gradient into the pretrained trunk until it has
    # learned which direction of the readout to ask for (a random head's first gradients are large and
    # arbitrary: they tripped target_kl on the first iteration)
    head = {"kernel": jnp.zeros((readout.shape[-1], dim), jnp.float32), "bias": jnp.zeros((dim,), jnp.float32)}
    variables = {**variables, "params": {**variables["params"], AUXILIARY_HEAD: head}}
    return policy.clone(auxiliary_targets=tuple(targets), auxiliary_dim=dim), variables


def auxiliary_loss(policy: nn.Module) -> Callable[[Any, Any, Any], jax.Array] | None:
    """`loss(variables, inputs, obs)`: mean squared error of the auxiliary head on `inputs` (what the policy
    sees, e.g. normalised) against the raw privileged labels `obs[key]` of `policy.auxiliary_targets`
    (concatenated), summed over their entries; None for a policy without an auxiliary head (the learner then
    adds nothing)."""
    targets = getattr(policy, "auxiliary_targets", ())
    if not targets:
        return None

    def loss(variables: Any, inputs: Any, obs: Any) -> jax.Array:
        prediction = policy.apply(variables, inputs, method=VLAPolicy.auxiliary)
        label = auxiliary_label(obs, targets).reshape(prediction.shape)
        return jnp.mean(jnp.sum(jnp.square(prediction - label), axis=-1))

    return loss


def auxiliary_label(obs: Any, targets: tuple[str, ...]) -> jax.Array:
    """The labels `obs[key]` of `targets` flattened per sample and concatenated: [B, auxiliary_dim]."""
    parts = [jnp.asarray(obs[t], jnp.float32) for t in targets]
    return jnp.concatenate([p.reshape(p.shape[0], -1) for p in parts], axis=-1)


def _random_twin(model_class: str, model_config: dict) -> tuple[nn.Module, dict]:
    """The built-in Flax twin with random weights (no torch needed)."""
    if model_class.rsplit(".", 1)[-1] != "GPTVLAModel":
        raise ConfigError(
            f"policy.vla_config.model_path: required for {model_class} (random init is built in only for GPTVLAModel)"
        )
    from jaxrl_vla.models.vla import GPTVLAModel, VLAModelConfig, dummy_obs

    try:
        cfg = VLAModelConfig.from_dict(model_config)
    except ValueError as err:
        raise ConfigError(f"policy.vla_config.model_config: {err}") from None
    model = GPTVLAModel(cfg)
    return model, model.init(jax.random.PRNGKey(0), dummy_obs(cfg, 1))
