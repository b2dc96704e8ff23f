"""LeRobot policy directories in and out: a SmolVLA directory <-> the Flax twin (jaxrl_vla.models.vla.smolvla).

A LeRobot policy directory (what `PreTrainedPolicy.save_pretrained` writes):

    config.json          {"type": "smolvla", "input_features", "output_features", "normalization_mapping",
                          "chunk_size", "n_action_steps", "max_state_dim", "vlm_model_name", ...}
    model.safetensors    the policy's state_dict: `model.vlm_with_expert.vlm.*` (SmolVLM, text layers cut to
                         num_vlm_layers), `model.vlm_with_expert.lm_expert.*`, `model.state_proj`,
                         `model.action_in_proj`, `model.action_out_proj`, `model.action_time_mlp_{in,out}`
    normaliser statistics, in one of two layouts:
      "processor" (LeRobot >= 0.4): policy_preprocessor.json + policy_preprocessor_step_<i>_normalizer_processor
                 .safetensors (`observation.state.mean`, ...), policy_postprocessor.json +
                 policy_postprocessor_step_<i>_unnormalizer_processor.safetensors (`action.mean`, ...)
      "buffers" (older): `normalize_inputs.buffer_observation_state.mean`, `normalize_targets.buffer_action.*`,
                 `unnormalize_outputs.buffer_action.*` inside model.safetensors

The VLM's shape is not in config.json (LeRobot reads it from `vlm_model_name` on the hub): it comes from
`vlm_model_name` when that is a local directory (absolute, or relative to the working directory or to the
policy directory), else from the Hugging Face cache (`~/.cache/huggingface/hub`); nothing is downloaded.

The name map is `SMOLVLA_ARCH`, an `hf_dir.HFArchitecture` (leaf rules + renames both ways), so reading
and writing are the same table. The twin's PPO additions (value head, Flow-Noise's noise network) are not
LeRobot's: they travel as `RL_HEADS_FILE` beside the directory (LeRobot ignores the file). Export writes
config.json, model.safetensors (the same keys and dtypes) and the statistics in the layout they came in,
the statistics tensors as read (bit for bit), so LeRobot's `from_pretrained` loads the directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from bridge import hf_dir
from bridge.hf_dir import VLM_RULES, HFArchitecture, NameRule, linear_rules
from jaxrl_vla.config import ConfigError

SUPPORTED_TYPES = ("smolvla",)
CONFIG_FILE, MODEL_FILE = "config.json", "model.safetensors"
PRE_FILE, POST_FILE = "policy_preprocessor.json", "policy_postprocessor.json"
NORMALIZER, UNNORMALIZER = "normalizer_processor", "unnormalizer_processor"
RL_HEADS_FILE = "rl_heads.safetensors"  # value head + noise network of the twin (not LeRobot's)
RL_HEADS = ("value_head", "head/noise_head")
_BUFFER_PREFIXES = ("normalize_inputs.", "normalize_targets.", "unnormalize_outputs.")
STATE_KEY, ACTION_KEY = "observation.state", "action"

# LeRobot key <-> twin path: `model.` is the policy's VLAFlowMatching; the lm_expert and the action/time
# projections live in the twin's flow head (`head/expert`), the VLM and state_proj as in LeRobot.
SMOLVLA_ARCH = HFArchitecture(
    factory=lambda config: (None, None),  # unused: read_lerobot_dir builds the twin from both configs
    rules=(*VLM_RULES, *linear_rules(r"(state_proj|action_in_proj|action_out_proj|action_time_mlp_in|"
                                     r"action_time_mlp_out)\.\w+$")),
    renames=((r"^model\.vlm_with_expert\.lm_expert\.", "head.expert."),
             (r"^model\.(action_\w+)\.", r"head.expert.\1."),
             (r"^model\.", "")),
    save_renames=((r"^head\.expert\.(action_\w+)\.", r"model.\1."),
                  (r"^head\.expert\.", "model.vlm_with_expert.lm_expert."),
                  (r"^(?!model\.)", "model.")),
)


class LeRobotDirError(ConfigError):
    """A LeRobot policy directory that cannot become the twin (a ConfigError: the CLI exits 2)."""


@dataclasses.dataclass
class LeRobotDir:
    """What a directory held besides the weights, kept so export writes the same layout back."""

    path: Path
    config: dict[str, Any]
    vlm_config: dict[str, Any]
    layout: str  # "processor" | "buffers"
    stats_files: dict[str, dict[str, np.ndarray]]  # processor layout: state file name -> tensors
    processor_json: dict[str, dict[str, Any]]  # processor layout: json file name -> content
    buffers: dict[str, np.ndarray]  # buffers layout: the normaliser tensors of model.safetensors
    dtypes: dict[str, Any]  # model.safetensors key -> its stored dtype


# ----------------------------------------------------------------------------- config


def read_json(path: Path) -> dict[str, Any]:
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise LeRobotDirError(f"{path}: cannot be read as JSON ({err})") from None
    if not isinstance(out, dict):
        raise LeRobotDirError(f"{path}: expected a JSON object")
    return out


def is_lerobot_dir(path: str | os.PathLike) -> bool:
    """A directory whose config.json has LeRobot's `type` key (a policy type) and no `model_type`."""
    p = Path(path) / CONFIG_FILE
    if not p.is_file():
        return False
    try:
        config = json.loads(p.read_text())
    except ValueError:
        return False
    return isinstance(config, dict) and "type" in config and "model_type" not in config


def vlm_config_of(config: Mapping[str, Any], policy_dir: Path) -> dict[str, Any]:
    """The VLM's config.json dict from `vlm_model_name` (module docstring), or an error saying what to do."""
    name = str(config.get("vlm_model_name") or "")
    candidates = [Path(name), policy_dir / name] if name else []
    if name and "/" in name and not Path(name).exists():
        cache = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" /
                                                                            "huggingface")) / "hub")
        snapshots = cache / f"models--{name.replace('/', '--')}" / "snapshots"
        candidates += sorted(snapshots.glob("*")) if snapshots.is_dir() else []
    for c in candidates:
        if (c / CONFIG_FILE).is_file():
            return read_json(c / CONFIG_FILE)
    raise LeRobotDirError(
        f"{policy_dir / CONFIG_FILE}: vlm_model_name {name!r} is neither a local directory with config.json nor in "
        f"the Hugging Face cache; nothing is downloaded: fetch it (huggingface-cli download {name or 'ORG/NAME'} "
        f"config.json --local-dir DIR) and set vlm_model_name to DIR"
    )


_REFUSED = {  # LeRobot options the twin does not implement -> predicate "set"
    "add_image_special_tokens": bool, "adapt_to_pi_aloha": bool, "use_delta_joint_actions_aloha": bool,
    "prefix_length": lambda v: v is not None and v > 0, "rtc_config": lambda v: bool(v and v.get("enabled")),
}


def _features(config: Mapping[str, Any], section: str) -> dict[str, dict[str, Any]]:
    feats = config.get(section) or {}
    if not isinstance(feats, Mapping):
        raise LeRobotDirError(f"config.json {section} must be a mapping, got {type(feats).__name__}")
    return dict(feats)


def twin_config(config: Mapping[str, Any], vlm_config: Mapping[str, Any], normaliser: Any) -> Any:
    """SmolVLAConfig from LeRobot's config.json and the VLM's; options the twin lacks are named."""
    from jaxrl_vla.models.vla.smolvla import SmolVLAConfig
    from jaxrl_vla.models.vla.smolvlm import SmolVLMConfig

    kind = config.get("type")
    if kind not in SUPPORTED_TYPES:
        raise LeRobotDirError(f"config.json: LeRobot policy type {kind!r} has no Flax twin; supported: "
                              f"{list(SUPPORTED_TYPES)}")
    for key, is_set in _REFUSED.items():
        if key in config and is_set(config[key]):
            raise LeRobotDirError(f"config.json {key}={config[key]!r} is not implemented by the SmolVLA twin")
    if int(config.get("n_obs_steps", 1)) != 1:
        raise LeRobotDirError(f"config.json n_obs_steps={config['n_obs_steps']}: the twin reads one observation")
    n_expert = int(config.get("num_expert_layers", -1))
    inputs, outputs = _features(config, "input_features"), _features(config, "output_features")
    if STATE_KEY not in inputs or ACTION_KEY not in outputs:
        raise LeRobotDirError(f"config.json needs input_features[{STATE_KEY!r}] and output_features[{ACTION_KEY!r}] "
                              f"(has {sorted(inputs)} / {sorted(outputs)})")
    cameras = [k for k, f in inputs.items() if f.get("type") == "VISUAL"]
    if not cameras:
        raise LeRobotDirError("config.json input_features has no VISUAL feature (SmolVLA reads at least one image)")
    vlm = SmolVLMConfig.from_hf_dict(vlm_config)
    layers = int(config.get("num_vlm_layers", 16))
    kept = layers if layers > 0 else vlm.text.num_hidden_layers
    if n_expert > 0 and n_expert != kept:
        raise LeRobotDirError(f"config.json num_expert_layers={n_expert} (fewer expert than VLM layers, {kept}) is "
                              f"not implemented by the twin")
    text = vlm_config.get("text_config") or {}
    if text.get("attention_bias") or text.get("mlp_bias"):
        raise LeRobotDirError("the VLM's text_config attention_bias / mlp_bias is not implemented by the SmolVLA expert")
    resize = config.get("resize_imgs_with_padding")
    if resize is not None and tuple(resize) != (vlm.vision.image_size,) * 2:
        raise LeRobotDirError(f"config.json resize_imgs_with_padding={list(resize)}: the twin does not resize; the "
                              f"images go to the tower as given ({vlm.vision.image_size}x{vlm.vision.image_size})")
    try:
        return SmolVLAConfig(
            vlm=vlm, state_dim=int(np.prod(inputs[STATE_KEY]["shape"])),
            action_dim=int(np.prod(outputs[ACTION_KEY]["shape"])), num_cameras=len(cameras),
            empty_cameras=int(config.get("empty_cameras", 0)), chunk_size=int(config.get("chunk_size", 50)),
            n_action_steps=int(config.get("n_action_steps", 50)), max_state_dim=int(config.get("max_state_dim", 32)),
            max_action_dim=int(config.get("max_action_dim", 32)), num_steps=int(config.get("num_steps", 10)),
            num_vlm_layers=layers, self_attn_every_n_layers=int(config.get("self_attn_every_n_layers", 2)),
            expert_width_multiplier=float(config.get("expert_width_multiplier", 0.75)),
            attention_mode=str(config.get("attention_mode", "cross_attn")),
            min_period=float(config.get("min_period", 4e-3)), max_period=float(config.get("max_period", 4.0)),
            normaliser=normaliser,
        )
    except ConfigError as err:
        raise LeRobotDirError(f"config.json: {err}") from None


# ----------------------------------------------------------------------------- statistics


def _norm_map(config: Mapping[str, Any], step: Mapping[str, Any] | None) -> dict[str, str]:
    mapping = dict((step or {}).get("config", {}).get("norm_map") or config.get("normalization_mapping") or
                   {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"})
    return {k: str(v).upper() for k, v in mapping.items()}


def _norm_stats(mode: str, stats: Mapping[str, np.ndarray], where: str, feature: str) -> Any:
    from jaxrl_vla.models.vla.smolvla import NORM_MODES, NormStats

    if mode not in NORM_MODES:
        raise LeRobotDirError(f"{where}: normalisation mode {mode!r} of {feature!r} is not implemented "
                              f"(one of {list(NORM_MODES)})")
    if mode == "IDENTITY":
        return NormStats()
    names = ("mean", "std") if mode == "MEAN_STD" else ("min", "max")
    missing = [n for n in names if n not in stats]
    if missing:
        raise LeRobotDirError(f"{where}: normaliser statistics {[f'{feature}.{n}' for n in missing]} are missing "
                              f"({mode} of {feature!r} needs {list(names)})")
    a, b = (np.asarray(stats[n], np.float32).reshape(-1) for n in names)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise LeRobotDirError(f"{where}: normaliser statistics {feature}.{names[0]}/{names[1]} are not finite "
                              f"(LeRobot's uninitialised buffers are inf)")
    return NormStats(mode, tuple(float(x) for x in a), tuple(float(x) for x in b))


def _pipeline_step(d: Path, file: str, registry: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    content = read_json(d / file)
    steps = content.get("steps") or []
    step = next((s for s in steps if s.get("registry_name") == registry), None)
    return content, step


def _grouped(flat: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, value in flat.items():
        feature, _, stat = key.rpartition(".")
        out.setdefault(feature, {})[stat] = value
    return out


def read_stats(d: Path, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> tuple[Any, str, dict, dict, dict]:
    """(Normaliser, layout, stats files, processor jsons, buffers) of a directory (module docstring)."""
    from jaxrl_vla.models.vla.smolvla import Normaliser

    buffers = {k: v for k, v in tensors.items() if k.startswith(_BUFFER_PREFIXES)}
    if (d / PRE_FILE).is_file() or (d / POST_FILE).is_file():
        for f in (PRE_FILE, POST_FILE):
            if not (d / f).is_file():
                raise LeRobotDirError(f"{d}: normaliser statistics: {f} is missing (the other processor file is there)")
        files, jsons, found = {}, {}, {}
        for f, registry in ((PRE_FILE, NORMALIZER), (POST_FILE, UNNORMALIZER)):
            jsons[f], step = _pipeline_step(d, f, registry)
            if step is None:
                raise LeRobotDirError(f"{d / f}: no {registry!r} step, so no normaliser statistics")
            for s in jsons[f]["steps"]:
                if s.get("state_file"):
                    path = d / s["state_file"]
                    if not path.is_file():
                        raise LeRobotDirError(f"{d}: normaliser statistics file {s['state_file']} (named by {f}) is "
                                              f"missing")
                    files[s["state_file"]] = dict(hf_dir.iter_safetensors(path))
            found[registry] = (step, _grouped(files.get(step.get("state_file"), {})))
        pre_step, pre = found[NORMALIZER]
        post_step, post = found[UNNORMALIZER]
        pre_map, post_map = _norm_map(config, pre_step), _norm_map(config, post_step)
        where_pre = f"{d.name}/{pre_step.get('state_file') or PRE_FILE}"
        where_post = f"{d.name}/{post_step.get('state_file') or POST_FILE}"
        state = _norm_stats(pre_map.get("STATE", "IDENTITY"), pre.get(STATE_KEY, {}), where_pre, STATE_KEY)
        action = _norm_stats(post_map.get("ACTION", "IDENTITY"), post.get(ACTION_KEY, {}), where_post, ACTION_KEY)
        eps = float(pre_step.get("config", {}).get("eps", 1e-8))
        return Normaliser(state, action, "processor", eps), "processor", files, jsons, {}
    mapping = _norm_map(config, None)
    grouped = {p: _grouped({k[len(p):].removeprefix("buffer_"): v for k, v in buffers.items() if k.startswith(p)})
               for p in _BUFFER_PREFIXES}
    feature_state, feature_action = STATE_KEY.replace(".", "_"), ACTION_KEY
    where = f"{d.name}/{MODEL_FILE} (no {PRE_FILE}: the older buffers layout)"
    state = _norm_stats(mapping.get("STATE", "IDENTITY"), grouped["normalize_inputs."].get(feature_state, {}), where,
                        f"normalize_inputs.buffer_{feature_state}")
    action = _norm_stats(mapping.get("ACTION", "IDENTITY"), grouped["unnormalize_outputs."].get(feature_action, {}),
                         where, f"unnormalize_outputs.buffer_{feature_action}")
    return Normaliser(state, action, "buffers"), "buffers", {}, {}, buffers


# ----------------------------------------------------------------------------- reading


def _tied(vlm_config: Mapping[str, Any]) -> bool:
    return bool(vlm_config.get("tie_word_embeddings", False))


def read_lerobot_dir(path: str | os.PathLike, *, param_dtype: Any = None, flow: Any = None,
                     **keys: str) -> tuple[Any, dict[str, Any], LeRobotDir]:
    """(SmolVLA twin, variables, LeRobotDir) of a LeRobot SmolVLA directory; `keys` set the twin's obs keys.

    Every LeRobot tensor fills a twin parameter of the same shape and every twin parameter but the RL
    heads is filled (the errors name the key and both shapes); the RL heads come from RL_HEADS_FILE
    when the directory has one, else they stay freshly initialised. `flow` (FlowConfig) defaults to
    Flow-Noise with LeRobot's num_steps.
    """
    from jaxrl_vla.models.vla.heads.flow import FlowConfig
    from jaxrl_vla.models.vla.smolvla import SmolVLA

    d = Path(path)
    if not (d / CONFIG_FILE).is_file():
        raise LeRobotDirError(f"{d} has no {CONFIG_FILE}: expected a LeRobot policy directory")
    config = read_json(d / CONFIG_FILE)
    if config.get("type") not in SUPPORTED_TYPES:
        raise LeRobotDirError(f"{d / CONFIG_FILE}: LeRobot policy type {config.get('type')!r} has no Flax twin; "
                              f"supported: {list(SUPPORTED_TYPES)}")
    if not (d / MODEL_FILE).is_file():
        raise LeRobotDirError(f"{d} has no {MODEL_FILE}")
    vlm_config = vlm_config_of(config, d)
    tensors = dict(hf_dir.iter_safetensors(d / MODEL_FILE))
    normaliser, layout, files, jsons, buffers = read_stats(d, config, tensors)
    cfg = twin_config(config, vlm_config, normaliser)
    if flow is None:
        flow = FlowConfig(steps=cfg.num_steps)
    model = SmolVLA(cfg, flow, **keys)
    fresh = model.init(jax.random.PRNGKey(0), example_obs(cfg))
    abstract = hf_dir._flatten(fresh)
    params: dict[str, Any] = {}
    filled: set[tuple[str, ...]] = set()
    unexpected, dtypes = [], {}
    tied = _tied(vlm_config)
    for raw, array in tensors.items():
        if raw in buffers:
            continue
        dtypes[raw] = array.dtype
        key = _renamed(raw)
        if tied and key == "vlm_with_expert.vlm.lm_head.weight":
            continue
        target = SMOLVLA_ARCH.flax_target(key)
        if target is None or target[0] not in abstract:
            unexpected.append(raw)
            continue
        flax_path, rule = target
        value = rule.to_flax(array)
        want = abstract[flax_path]
        if tuple(value.shape) != tuple(want.shape):
            raise LeRobotDirError(f"{MODEL_FILE}: tensor {raw!r} has shape {tuple(array.shape)}, the twin's "
                                  f"{'/'.join(flax_path[1:])} needs {tuple(want.shape)} (config.json / the VLM config)")
        if param_dtype is not None and jnp.issubdtype(value.dtype, jnp.floating):
            value = value.astype(param_dtype)
        hf_dir._set_in(params, flax_path, jnp.asarray(value))
        filled.add(flax_path)
    if unexpected:
        raise LeRobotDirError(f"{d / MODEL_FILE}: tensors the SmolVLA twin has no place for: {sorted(unexpected)[:8]}")
    heads = _read_heads(d, fresh)
    missing = sorted("/".join(p[1:]) for p in abstract if p not in filled and not _is_rl_head(p))
    if missing:
        raise LeRobotDirError(f"{d / MODEL_FILE}: the twin's parameters missing from it: {missing[:8]}")
    for path in abstract:
        if _is_rl_head(path):
            hf_dir._set_in(params, path, heads.get(path, hf_dir._flatten(fresh)[path]))
    info = LeRobotDir(d, config, vlm_config, layout, files, jsons, buffers, dtypes)
    return model, params, info


def _renamed(key: str) -> str:
    for pattern, replacement in SMOLVLA_ARCH.renames:
        key = re.sub(pattern, replacement, key, count=1)
    return key


def _is_rl_head(path: tuple[str, ...]) -> bool:
    inner = "/".join(path[1:])
    return any(inner == h or inner.startswith(h + "/") for h in RL_HEADS)


def _read_heads(d: Path, fresh: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    """RL_HEADS_FILE's tensors (Flax paths '/'-joined, as saved), checked against the fresh heads' shapes."""
    f = d / RL_HEADS_FILE
    if not f.is_file():
        return {}
    flat = hf_dir._flatten(fresh)
    out = {}
    for key, array in hf_dir.iter_safetensors(f):
        path = tuple(key.split("/"))
        if path not in flat or not _is_rl_head(path):
            raise LeRobotDirError(f"{f}: tensor {key!r} is not one of the twin's RL heads ({list(RL_HEADS)})")
        if tuple(array.shape) != tuple(flat[path].shape):
            raise LeRobotDirError(f"{f}: {key} has shape {tuple(array.shape)}, the twin {tuple(flat[path].shape)}")
        out[path] = jnp.asarray(array)
    return out


def example_obs(cfg: Any, keys: Mapping[str, str] | None = None) -> dict[str, jax.Array]:
    """A one-row observation of the twin's shape (for init)."""
    k = {"image_key": "rgb", "state_key": "proprio", "lang_key": "language", "mask_key": "language_mask",
         **(keys or {})}
    s = cfg.vlm.vision.image_size
    return {k["image_key"]: jnp.zeros((1, s, s, 3), jnp.uint8), k["state_key"]: jnp.zeros((1, cfg.state_dim)),
            k["lang_key"]: jnp.zeros((1, 1), jnp.int32), k["mask_key"]: jnp.ones((1, 1), bool)}


# ----------------------------------------------------------------------------- writing


def lerobot_tensors(params: Mapping[str, Any], info: LeRobotDir) -> list[tuple[str, np.ndarray]]:
    """model.safetensors' (key, array) list from the twin's params (RL heads left out), stored dtypes kept."""
    out = []
    tied = _tied(info.vlm_config)
    flat = hf_dir._flatten({"params": params["params"] if "params" in params else params})
    for path, leaf in flat.items():
        if _is_rl_head(path):
            continue
        key, rule = SMOLVLA_ARCH.hf_key(path)
        for pattern, replacement in SMOLVLA_ARCH.save_renames:
            key = re.sub(pattern, replacement, key, count=1)
        array = np.ascontiguousarray(rule.to_hf(np.asarray(jax.device_get(leaf))))
        out.append((key, array.astype(info.dtypes.get(key, array.dtype))))
        if tied and key == "model.vlm_with_expert.vlm.model.text_model.embed_tokens.weight":
            out.append(("model.vlm_with_expert.vlm.lm_head.weight", out[-1][1]))
    out += [(k, np.ascontiguousarray(v)) for k, v in info.buffers.items()]
    return sorted(out, key=lambda kv: kv[0])


def save_lerobot_dir(out: str | os.PathLike, params: Mapping[str, Any], info: LeRobotDir, *,
                     overwrite: bool = False) -> Path:
    """Write the directory as LeRobot lays it out (module docstring), atomically; RL heads beside it."""
    target = Path(out)
    if target.exists() and not overwrite:
        raise LeRobotDirError(f"{target} exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(info.config, indent=4) + "\n")
        hf_dir._write_shard(tmp / MODEL_FILE, lerobot_tensors(params, info))
        for name, content in info.processor_json.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        for name, tensors in info.stats_files.items():
            hf_dir._write_shard(tmp / name, sorted(tensors.items()))
        flat = hf_dir._flatten({"params": params["params"] if "params" in params else params})
        heads = [("/".join(p), np.ascontiguousarray(np.asarray(jax.device_get(v)))) for p, v in flat.items()
                 if _is_rl_head(p)]
        if heads:
            hf_dir._write_shard(tmp / RL_HEADS_FILE, sorted(heads))
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ----------------------------------------------------------------------------- the policy (jaxrl_vla.models.vla_policy)

_MODEL_CONFIG_KEYS = ("flow",)


def build_lerobot_model(policy_cfg: Mapping[str, Any], env: Any, master: Any) -> tuple[Any, dict[str, Any]]:
    """(SmolVLA twin, variables) for `policy.vla_config.model_path` a LeRobot SmolVLA directory.

    The env's `rgb` goes to the tower, its `proprio` is LeRobot's observation.state (normalised as LeRobot
    does), its token prompt the language tokens; `policy.vla_config.model_config.flow` ({method, noise_level,
    noise_min, noise_max, steps}; steps default to LeRobot's num_steps) picks the sampler. The action dim,
    the executed chunk (policy.action_chunk = LeRobot's n_action_steps), the state dim, the image size and
    the token ids are checked against the env, each error naming both values.
    """
    from jaxrl_vla.models.lm_policy import prompt_keys
    from jaxrl_vla.models.vla.heads.flow import FlowConfig

    vla = policy_cfg["vla_config"]
    path = Path(vla["model_path"])
    extra = dict(vla.get("model_config") or {})
    unknown = sorted(set(extra) - set(_MODEL_CONFIG_KEYS))
    if unknown:
        raise LeRobotDirError(f"policy.vla_config.model_config.{unknown[0]}: unknown key for a LeRobot directory "
                              f"(known: {list(_MODEL_CONFIG_KEYS)})")
    config = read_json(path / CONFIG_FILE)
    flow = dict(extra.get("flow") or {})
    flow.setdefault("steps", int(config.get("num_steps", 10)))
    flow_cfg = FlowConfig.from_dict(flow)
    space = env.observation_space if isinstance(getattr(env, "observation_space", None), dict) else {}
    for key in ("rgb", "proprio"):
        if key not in space:
            raise LeRobotDirError(f"policy.vla_config.model_path: a LeRobot SmolVLA reads the env's {key!r} "
                                  f"observation, which it lacks (it offers {sorted(space)})")
    ids_key, mask_key = prompt_keys(env)
    model, variables, _ = read_lerobot_dir(path, param_dtype=master, flow=flow_cfg, image_key="rgb",
                                           state_key="proprio", lang_key=ids_key, mask_key=mask_key)
    cfg = model.config
    where = f"{path / CONFIG_FILE}"
    env_action = tuple(getattr(env.action_space, "shape", ()))
    if env_action != (cfg.action_dim,):
        raise LeRobotDirError(f"{where}: output_features.action has dimension {cfg.action_dim}, the env's actions "
                              f"have shape {env_action}")
    chunk = int(policy_cfg.get("action_chunk", 1))
    if chunk != cfg.n_action_steps:
        raise LeRobotDirError(f"policy.action_chunk ({chunk}) != n_action_steps ({cfg.n_action_steps}) of {where}: "
                              f"set policy.action_chunk to {cfg.n_action_steps} (the chunk the policy executes)")
    state = tuple(space["proprio"].shape)
    if state != (cfg.state_dim,):
        raise LeRobotDirError(f"{where}: input_features.observation.state has dimension {cfg.state_dim}, the env's "
                              f"proprio has shape {state}")
    image, size = tuple(space["rgb"].shape), cfg.vlm.vision.image_size
    if image != (size, size, 3):
        raise LeRobotDirError(f"{where}: the VLM's tower takes {size}x{size}x3 images, the env's rgb is "
                              f"{'x'.join(map(str, image))} (set env.image_size)")
    high = int(np.max(np.asarray(getattr(space[ids_key], "high", 0))))
    if high >= cfg.vlm.text.vocab_size:
        raise LeRobotDirError(f"{where}: the env's token ids reach {high}, the VLM's vocabulary has "
                              f"{cfg.vlm.text.vocab_size} (the ids must be the VLM tokenizer's)")
    variables = jax.tree_util.tree_map(lambda x: x.astype(master) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                       variables)
    return model, variables


# ----------------------------------------------------------------------------- export of a trained run


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """A run trained from a LeRobot directory written back as one (its RL heads beside): the source
    directory (the run config's policy.vla_config.model_path) gives the layout, the statistics and config.json;
    the weights are the run's latest checkpoint (LoRA adapters folded in), in the source's stored dtypes.

    Checked before anything is loaded or written (LeRobotDirError, a ConfigError): `out` must not exist unless
    `overwrite`, the run must have a config.json whose model_path is a LeRobot directory."""
    from jaxrl_vla.eval import EvalError, load_run
    from jaxrl_vla.models.vla_policy import unwrap_variables

    run_dir, target = Path(run_dir), Path(out)
    if target.exists() and not overwrite:
        raise LeRobotDirError(f"--out {target} exists; pass --overwrite to replace it")
    run_config = read_json(run_dir / CONFIG_FILE) if (run_dir / CONFIG_FILE).is_file() else None
    if run_config is None:
        raise LeRobotDirError(f"--run {run_dir}: no {CONFIG_FILE} (is it a run directory made by jaxrl_vla.train?)")
    source = ((run_config.get("policy") or {}).get("vla_config") or {}).get("model_path")
    if not source or not is_lerobot_dir(source):
        raise LeRobotDirError(f"--run {run_dir}: policy.vla_config.model_path {source!r} is not a LeRobot directory "
                              f"(a config.json with LeRobot's 'type'; needed for the layout and the statistics)")
    _, _, info = read_lerobot_dir(source)
    try:
        run = load_run(run_dir)
    except EvalError as err:
        raise LeRobotDirError(str(err)) from None
    variables = unwrap_variables(jax.tree_util.tree_map(jnp.asarray, run.params))
    return save_lerobot_dir(target, {"params": variables["params"]}, info, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    """`python -m bridge.lerobot_dir export --run RUN --out DIR [--overwrite]`: exit 0 (prints DIR) or 2 (one line)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m bridge.lerobot_dir",
                                     description="LeRobot SmolVLA directories (bridge.lerobot_dir)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("export", help="write a run trained from a LeRobot directory back as one")
    p.add_argument("--run", required=True, help="a run directory of jaxrl_vla.train (its latest checkpoint)")
    p.add_argument("--out", required=True, help="the LeRobot directory to write (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    try:
        print(export_run(args.run, args.out, overwrite=args.overwrite))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
